"""The registered guided policy is an MLflow Model: ``mlflow.pyfunc.load_model("models:/NAME@champion")``
and ``mlflow models serve`` answer prompts exactly as the experiment's spi-k did (same prompts, same
seeds: row i gets the seed of evaluation prompt i). Reads the session's tiny experiment."""

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.servers import free_port, serving

NAME = "tiny-value"
ROOT = Path(__file__).resolve().parents[2]


def experiment_decode(workdir: Path, plan) -> tuple[list[str], dict]:
    """The evaluation prompts of the experiment and its decode stage's file of the plan's system, found by
    its key (the work directory also holds a rerun with other settings, which may hold the champion)."""
    from spi.pipeline import decode_key
    from spi.stagefiles import output_digest

    eval_dir = workdir / "tiny" / "eval"
    for eval_set in (p for p in eval_dir.glob("eval-set-*.json") if p.name.count(".") == 1):
        key = decode_key(plan.recipe, plan.system, list(plan.value_dirs), output_digest(eval_set))
        decoded = eval_dir / f"{plan.system}-{key}.json"
        if decoded.exists():
            return [e["instruction"] for e in json.loads(eval_set.read_text())], json.loads(decoded.read_text())
    raise AssertionError(f"{eval_dir} holds no decode of {plan.system} as registered")


@pytest.fixture
def champion(experiment, monkeypatch, tmp_path):
    """(the champion's plan, 2 prompts, the experiment's answers to them, its decode file) with MLflow
    pointed at the run's store (the champion may be a version of the rerun, or registered again by the
    promotion test: its folder says which)."""
    from mlflow_store.registry import load_registered_value_model
    from spi.generate import policy_plan

    workdir, summary, _ = experiment
    uri = summary["tracking_uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    plan = policy_plan(load_registered_value_model(NAME, "champion", uri, tmp_path / "champion"))
    prompts, decoded = experiment_decode(workdir, plan)
    answers = [o["output"] for o in decoded["outputs"]][:2]
    assert len(set(answers)) == 2  # two different answers: a swap or a repeat would show
    return plan, prompts[:2], answers, decoded


def test_load_model_predicts_the_experiments_spi_k(champion):
    import mlflow.pyfunc
    import pandas as pd

    from mlflow_store.policy_model import INPUT_EXAMPLE, model_reference

    plan, prompts, answers, _ = champion
    system = plan.system
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


def test_nightly_evaluation_decodes_the_champion_as_registered(experiment, champion):
    """The evaluate flow run with other search settings still decodes the version as it was registered
    (the champion's recorded seed, search and reward): the experiment's spi-k decode, found by its key."""
    from flows.model_flows import evaluate_value_model
    from tests.flows.conftest import TINY

    workdir, _, _ = experiment
    result = evaluate_value_model(recipe=str(TINY), overrides={"search": {"width": 1, "successors": 1}},
                                  workdir=str(workdir), alias="champion")
    plan, _, _, decoded = champion
    assert result["guided_system"] == plan.system
    assert result["mean_reward"] == decoded["mean_reward"]
    assert result["policy_tokens"] == decoded["compute"]["policy_tokens"]


def test_a_changed_base_model_is_refused(experiment, tmp_path):
    """load_context compares the base model's digest with the one recorded at registration."""
    import mlflow.pyfunc

    from mlflow_store.policy_model import ARTIFACT, BaseModelChanged, GuidedPolicyModel, model_reference

    workdir, _, _ = experiment
    folder = next(p for p in (workdir / "tiny" / "registry").glob("spi-1-*") if p.is_dir())
    recorded = {**model_reference("tiny-llama"), "digest": "sha256:" + "0" * 64}
    mlflow.pyfunc.save_model(tmp_path / "model", python_model=GuidedPolicyModel(), artifacts={ARTIFACT: str(folder)},
                             pip_requirements=[], model_config={"base_model": recorded})
    with pytest.raises(BaseModelChanged, match="tiny-llama"):
        mlflow.pyfunc.load_model(str(tmp_path / "model"))


def test_model_reference_digests_a_local_folder(tmp_path):
    from mlflow_store.policy_model import model_reference

    (tmp_path / "config.json").write_text("{}")
    before = model_reference(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    after = model_reference(str(tmp_path))
    assert before["kind"] == after["kind"] == "folder" and before["digest"] != after["digest"]
    assert model_reference("random:tiny")["digest"] == model_reference("random:tiny")["digest"]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_mlflow_models_serve_answers_as_the_experiment(champion, tmp_path):
    _, prompts, answers, _ = champion
    uri = os.environ["MLFLOW_TRACKING_URI"]
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,  # the server runs `uvicorn`:
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # the venv's
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
            "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    base = f"http://127.0.0.1:{port}"
    with serving(argv, f"{base}/ping", tmp_path / "serve.log", env, timeout=240):
        listed = _post(f"{base}/invocations", {"inputs": prompts})
        assert [row["response"] for row in listed["predictions"]] == answers
        split = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in prompts]}})
        assert [row["response"] for row in split["predictions"]] == answers
