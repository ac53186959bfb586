"""The same tracking and registry calls against a real `mlflow server` on 127.0.0.1 (slow: the
server takes seconds to start)."""

import os
import sys

import pytest

from mlflow_store import registry as R
from mlflow_store import tracking as T
from tests.servers import free_port, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "1"}
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
            str(root / "artifacts"), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with serving(argv, url + "/health", root / "server.log", env, timeout=90):
        yield url


def test_runs_registry_and_load_over_http(mlflow_server, value_folder, tmp_path):
    parent = T.start_experiment_run(mlflow_server, "http-exp", {"a": {"b": 1}}, "dig", "v")
    child = T.find_or_create_child_run(mlflow_server, parent, "spi", 1)
    assert T.find_or_create_child_run(mlflow_server, parent, "spi", 1) == child
    T.log_metrics(mlflow_server, child, {"win_rate": 42.0})
    version = R.register_value_model(
        mlflow_server, "http-value", child, value_folder("a"), {"win_rate": 42.0}
    )
    assert R.promote(mlflow_server, "http-value", margin=1.0).promoted
    out = R.load_registered_value_model("http-value", "champion", mlflow_server, tmp_path / "dl")
    src = value_folder("a")
    for f in src.rglob("*"):
        if f.is_file():
            assert (out / f.relative_to(src)).read_bytes() == f.read_bytes()
    assert version == "1"
    T.finish_run(mlflow_server, child)
    T.finish_run(mlflow_server, parent)


def test_guided_policy_is_an_mlflow_model_over_http(mlflow_server, tmp_path, monkeypatch):
    """The pyfunc guided policy through the server (proxied artifacts): registered, loaded with
    mlflow.pyfunc.load_model (metadata, the base model check) and its folder downloaded intact."""
    import json
    from pathlib import Path

    import mlflow.pyfunc

    from spi.config import load_recipe
    from spi.stagefiles import tree_digest
    from spi.systems import write_guided_policy

    value = tmp_path / "V"  # a stand-in value model: loading the policy does not read it, decoding would
    value.mkdir()
    (value / "value.json").write_text(json.dumps({"kind": "test", "checksums": {"head": "0" * 16}}))
    recipe = load_recipe(Path(__file__).parents[1] / "flows" / "tiny.yaml")
    folder = write_guided_policy(tmp_path / "policy", "spi-1", recipe, [value])
    run = T.start_experiment_run(mlflow_server, "http-policy", {}, "dig", "v")
    assert R.register_guided_policy(mlflow_server, "http-policy", run, folder, {"win_rate": 1.0}) == "1"
    assert R.register_guided_policy(mlflow_server, "http-policy", run, folder) == "1"  # idempotent

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model = mlflow.pyfunc.load_model("models:/http-policy@candidate")
    assert model.metadata.metadata["spi_system"] == "spi-1"
    assert [v["beta"] for v in model.metadata.metadata["value_models"]] == [1.0]
    out = R.load_registered_value_model("http-policy", "candidate", mlflow_server, tmp_path / "dl")
    assert tree_digest(out) == tree_digest(folder)
