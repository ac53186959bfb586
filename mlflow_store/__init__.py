"""Persistence for the SPI platform.

    mlflow_store.tracking   MLflow experiments, parent/child runs, metrics, artifacts (explicit run ids)
    mlflow_store.registry   guided policies and value models in the MLflow model registry: register,
                            promote, load
    mlflow_store.policy_model  the registered guided policy as an MLflow pyfunc model (load_model/predict,
                            mlflow models serve)
    mlflow_store.store      SQLAlchemy store of prompts, rollouts, rewards, datasets, generations, judgements

Import the submodule you need; this package imports nothing heavy itself. Layer rule: may import
spi, mlflow and sqlalchemy; never prefect, flows or evaluation.
"""
