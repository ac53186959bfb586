-- Run once by the postgres image on an empty data volume (POSTGRES_DB=mlflow already exists).
-- Prefect and MLflow each keep an alembic_version table, so each gets a database of its own;
-- spi_store holds the project's store (rollouts, labels, generations, judgements).
CREATE DATABASE prefect OWNER spi;
CREATE DATABASE spi_store OWNER spi;
