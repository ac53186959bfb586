"""Persistence for the SPI platform.

    mlflow_store.tracking   MLflow experiments, parent/child runs, metrics, artifacts (explicit run ids)
    mlflow_store.registry   value models in the MLflow model registry: register, promote, load
    mlflow_store.store      SQLAlchemy store of prompts, rollouts, rewards, datasets, generations, judgements

Import the submodule you need; this package imports nothing heavy itself. Layer rule: may import
spi, mlflow and sqlalchemy; never prefect, flows or evaluation.
"""
