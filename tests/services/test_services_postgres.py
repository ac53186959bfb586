"""`spi up --db postgresql://... --prefect-db postgresql://...` against a throwaway PostgreSQL cluster
(slow: ~2 minutes; the compose stack's database layout, without docker): MLflow tracking and registry
on one database, Prefect on another, and a run plus a registered model written through the server
land in that database."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import STANDIN, start_stack, stop_stack

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "mlflow_store"))
import pg_cluster as pg  # noqa: E402  (tests/mlflow_store/pg_cluster.py)


@pytest.fixture(scope="module")
def postgres():
    yield from pg.server_or_skip()


def test_up_on_postgresql(postgres, tmp_path, value_folder):
    mlflow_db = pg.create_database(postgres, "spi_mlflow")
    prefect_db = pg.create_database(postgres, "spi_prefect")
    plain = lambda url: url.replace("postgresql+psycopg://", "postgresql://")  # noqa: E731  (as a user types it)
    stack = start_stack(
        tmp_path / "home", STANDIN, extra=("--db", plain(mlflow_db), "--prefect-db", plain(prefect_db))
    )
    try:
        assert stack.up.returncode == 0, stack.up.stdout + stack.up.stderr
        print(stack.up.stdout)
        argv = stack.state["services"]["mlflow-server"]["argv"]
        assert argv[argv.index("--backend-store-uri") + 1] == mlflow_db
        assert argv[argv.index("--registry-store-uri") + 1] == mlflow_db

        from mlflow_store import registry, tracking

        run = tracking.start_experiment_run(stack.mlflow, "pg-exp", {"a": 1}, "digest", "v")
        tracking.log_metrics(stack.mlflow, run, {"win_rate": 55.0})
        version = registry.register_value_model(
            stack.mlflow, "pg-value", run, value_folder("a"), {"win_rate": 55.0}
        )
        assert registry.promote(stack.mlflow, "pg-value", margin=0.0).promoted

        import psycopg
        from sqlalchemy.engine import make_url

        def rows(url: str, sql: str):
            u = make_url(url)
            with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database) as conn:
                return conn.execute(sql).fetchall()

        assert ("pg-exp",) in rows(mlflow_db, "select name from experiments")
        aliases = sorted(rows(mlflow_db, "select alias, version from registered_model_aliases"))
        assert aliases == [("candidate", int(version)), ("champion", int(version))]
        assert ("standin-nightly-eval",) in rows(prefect_db, "select name from deployment")
    finally:
        stop_stack(stack)


@pytest.fixture
def value_folder(tmp_path):
    def make(tag: str = "a"):
        folder = tmp_path / f"value_{tag}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "value.json").write_text('{"kind": "test"}\n')
        (folder / "head.safetensors").write_bytes(bytes(range(256)) + tag.encode())
        return folder

    return make
