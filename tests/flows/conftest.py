"""Fixtures of the flow tests: ONE Prefect test harness for the session, tiny models, one thread.

``experiment`` runs ``spi run tests/flows/tiny.yaml`` once per session (two iterations, one
baseline, length judge); most tests read what it left behind.
"""

import json
import shutil
from pathlib import Path

import pytest

TINY = Path(__file__).parent / "tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    """One temporary Prefect API + database for every flow test; yields its URL."""
    import torch
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    torch.set_num_threads(1)
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def run_cli(*argv: str) -> int:
    from flows.commands import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory):
    """An empty MLflow SQLite database (its schema migrations take ~20 s here), made once."""
    from mlflow_store.tracking import client_for, default_tracking_uri

    uri = default_tracking_uri(tmp_path_factory.mktemp("mlflow_template"))
    client_for(uri)
    return Path(uri[len("sqlite:///") :])


@pytest.fixture
def new_workdir(tmp_path, mlflow_db_template):
    """A work directory holding a copy of the empty MLflow database."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copyfile(mlflow_db_template, workdir / "mlflow.db")
    return workdir


@pytest.fixture(scope="session")
def experiment(tmp_path_factory, mlflow_db_template):
    """``spi run tiny.yaml`` in a fresh work directory: (workdir, summary JSON, full summary)."""
    workdir = tmp_path_factory.mktemp("experiment")
    shutil.copyfile(mlflow_db_template, workdir / "mlflow.db")
    summary_file = workdir / "summary.json"
    assert run_cli("run", TINY, "--workdir", workdir, "--summary-json", summary_file) == 0
    summary = json.loads(summary_file.read_text())
    full = json.loads(next((workdir / "tiny").glob("summary-*.json")).read_text())
    return workdir, summary, full


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
