"""Fixtures for the mlflow_store tests: a real MLflow on a SQLite file in tmp_path."""

import json
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def _mlflow_db_template(tmp_path_factory):
    """An empty MLflow SQLite database, created (schema migrations: ~2 s) once per session."""
    from mlflow_store.tracking import client_for, default_tracking_uri

    uri = default_tracking_uri(tmp_path_factory.mktemp("mlflow_template"))
    client_for(uri)
    return uri[len("sqlite:///") :]


@pytest.fixture
def tracking_uri(tmp_path, _mlflow_db_template):
    """A fresh MLflow tracking + registry URI: sqlite:///<tmp_path>/work/mlflow.db."""
    import shutil

    from mlflow_store.tracking import default_tracking_uri

    uri = default_tracking_uri(tmp_path / "work")
    shutil.copyfile(_mlflow_db_template, uri[len("sqlite:///") :])
    return uri


@pytest.fixture
def value_folder(tmp_path):
    """An opaque stand-in for a saved value model: value.json + a small binary file + a subfolder."""

    def make(tag: str = "a"):
        folder = tmp_path / f"value_{tag}"
        (folder / "backbone").mkdir(parents=True, exist_ok=True)
        (folder / "value.json").write_text(json.dumps({"kind": "test", "tag": tag}) + "\n")
        (folder / "head.safetensors").write_bytes(bytes(range(256)) * 4 + tag.encode())
        (folder / "backbone" / "config.json").write_text("{}")
        return folder

    return make


@pytest.fixture(scope="session")
def pg_server():
    """URL of a throwaway PostgreSQL server (session-wide); skips when no server binaries are here."""
    import pg_cluster as pg

    yield from pg.server_or_skip()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty store database: a SQLite file, then a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    import uuid

    import pg_cluster as pg

    server = request.getfixturevalue("pg_server")
    name = "t_" + uuid.uuid4().hex[:12]
    yield pg.create_database(server, name)
    pg.drop_database(server, name)
