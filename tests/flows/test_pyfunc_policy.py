"""The registered guided policy is an MLflow Model: ``mlflow.pyfunc.load_model("models:/NAME@champion")``
and ``mlflow models serve`` answer prompts exactly as the experiment's spi-k did (same prompts, same
seeds: row i gets the seed of evaluation prompt i). Reads the session's tiny experiment."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

NAME = "tiny-value"
ROOT = Path(__file__).resolve().parents[2]


def experiment_answers(workdir: Path, system: str, n: int) -> tuple[list[str], list[str]]:
    """The first n evaluation prompts of the experiment and its decode stage's answers for ``system``."""
    eval_dir = workdir / "tiny" / "eval"
    rows = json.loads(next(p for p in eval_dir.glob("eval-set-*.json") if p.name.count(".") == 1).read_text())
    decoded = json.loads(next(p for p in eval_dir.glob(f"{system}-*.json") if p.name.count(".") == 1).read_text())
    return [e["instruction"] for e in rows][:n], [o["output"] for o in decoded["outputs"]][:n]


@pytest.fixture
def champion(experiment, monkeypatch, tmp_path):
    """(uri, champion's system, prompts, the experiment's answers) with MLflow pointed at the run's store
    (the champion is a guided policy this experiment fitted, possibly registered again by a promotion test)."""
    from mlflow_store.registry import load_registered_value_model
    from spi.systems import read_guided_policy

    workdir, summary, _ = experiment
    uri = summary["tracking_uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    system, _, _ = read_guided_policy(load_registered_value_model(NAME, "champion", uri, tmp_path / "champion"))
    prompts, answers = experiment_answers(workdir, system, 2)
    assert len(set(answers)) == 2  # two different answers: a swap or a repeat would show
    return uri, system, prompts, answers


def test_load_model_predicts_the_experiments_spi_k(champion):
    import mlflow.pyfunc
    import pandas as pd

    from mlflow_store.policy_model import INPUT_EXAMPLE, model_reference

    uri, system, prompts, answers = champion
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert model.predict(prompts)["response"].tolist() == answers
    assert model.predict(pd.DataFrame({"prompt": prompts}))["response"].tolist() == answers
    meta = model.metadata.metadata
    assert meta["spi_system"] == system
    assert meta["base_model"]["digest"] == model_reference("tiny-llama")["digest"] is not None
    k = int(system.split("-")[1])
    assert [v["beta"] for v in meta["value_models"]] == [1.0, 2.0][:k]
    assert meta["search"]["width"] == 2 and meta["reward"]["reference"]["name"] == "tiny-reward"
    assert [t.name for t in model.metadata.get_input_schema().input_types()] == ["string"]
    assert model.metadata.get_output_schema().input_names() == ["response"]
    assert model.input_example["prompt"].tolist() == INPUT_EXAMPLE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_answers_as_the_experiment(champion, tmp_path):
    uri, _, prompts, answers = champion
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,  # the server runs `uvicorn`:
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # the venv's
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no /ping in 240 s: " + (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        listed = _post(f"{base}/invocations", {"inputs": prompts})
        assert [row["response"] for row in listed["predictions"]] == answers
        split = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in prompts]}})
        assert [row["response"] for row in split["predictions"]] == answers
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()
