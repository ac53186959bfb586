"""The registered guided policy as an MLflow Model: a pyfunc flavor that answers prompts as spi-k does.

    GuidedPolicyModel          the ``mlflow.pyfunc.PythonModel``: ``load_context`` reads the guided policy
                               folder (``spi.generate.policy_plan``, as ``spi generate`` does), ``predict``
                               decodes with ``spi.generate.decode_batches`` (the experiment's own decode)
    policy_metadata(folder)    what the model records: the base model with its digest, V_1..V_k with their
                               betas, the search settings and the reward reference
    log_guided_policy(...)     the folder as a LoggedModel of a run (MLmodel, signature, input example)

    mlflow.pyfunc.load_model("models:/NAME@champion").predict(["Name three colours."])["response"]

Row ``i`` of a call is decoded with the experiment's seed of evaluation prompt ``i``
(``seed_for(seed, "eval", i)``), so the evaluation set, in order, gets the experiment's answers.

Logging: ``mlflow.pyfunc.log_model`` reads the process-wide tracking URI and active run, which Prefect's
task threads must not share (see ``mlflow_store.tracking``). ``log_guided_policy`` does the same steps
with explicit ids: ``mlflow.pyfunc.save_model`` writes the MLflow Model (pyfunc flavor, signature, input
example, metadata, pinned requirements: nothing is resolved over the network), then the client creates
the LoggedModel of the run, uploads the folder and links it to the run as an output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc

ARTIFACT = "guided_policy"  # the folder's key in the model's artifacts (artifacts/guided_policy)
INPUT_EXAMPLE = ["Name three primary colours."]


class BaseModelChanged(RuntimeError):
    """The base model a guided policy was registered on is not the one this machine would load."""


def model_reference(name: str) -> dict:
    """{"name", "kind", "digest"} of a model name (``spi.models.resolve``): a folder (built-in alias or
    local path) by the sha256 of its files, a hub id by the commit of its cached snapshot (None when not
    cached), a ``random:`` model by its name (built from seed 0)."""
    from spi.config import digest_of
    from spi.models import resolve
    from spi.stagefiles import tree_digest

    if name.startswith("random:"):
        return {"name": name, "kind": "random", "digest": f"name:{digest_of(name)}"}
    source = resolve(name)
    if isinstance(source, Path):
        return {"name": name, "kind": "folder", "digest": f"sha256:{tree_digest(source)}"}
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(source, "config.json")
    commit = Path(hit).parent.name if isinstance(hit, str) else None
    return {"name": name, "kind": "hub", "digest": f"revision:{commit}" if commit else None}


def policy_metadata(folder: str | os.PathLike) -> dict:
    """The MLmodel metadata of the guided policy in ``folder``."""
    from spi.generate import policy_plan
    from spi.stagefiles import output_digest, tree_digest
    from spi.systems import read_guided_policy

    plan = policy_plan(folder)
    _, value_dirs, meta = read_guided_policy(Path(folder))
    r = plan.recipe
    reward = r.reward.model_dump(mode="json")
    if r.reward.kind != "verifier":  # a verifier reads no model
        reward["reference"] = model_reference(r.reward.model)
    if r.reward.head:
        reward["head_digest"] = f"sha256:{tree_digest(r.reward.head)}"
    return {
        "spi_system": plan.system,
        "spi_recipe": {"name": r.name, "digest": r.digest, "seed": r.seed},
        "base_model": {**model_reference(r.policy.model), "dtype": r.policy.dtype},
        "value_models": [{"name": f"V_{i}", "folder": v["folder"], "beta": v["beta"], "weight": v["weight"],
                          "digest": output_digest(d)} for i, (v, d) in enumerate(zip(meta["values"], value_dirs,
                                                                                          strict=True), 1)],
        "search": {**r.search.model_dump(mode="json"), "sampling": r.sampling.model_dump(mode="json"),
                   "backend": r.execution.backend},
        "reward": reward,
        "decode_digest": plan.digest,
    }


class GuidedPolicyModel(mlflow.pyfunc.PythonModel):
    """Answers a list of strings (or a one-column DataFrame, ``prompt`` in the input example) with a
    DataFrame of one column ``response``."""

    def load_context(self, context) -> None:
        from spi import pipeline
        from spi.generate import policy_plan

        self.plan = policy_plan(context.artifacts[ARTIFACT])
        recorded = (context.model_config or {}).get("base_model", {})
        if recorded.get("digest"):
            here = model_reference(self.plan.recipe.policy.model)
            if here["digest"] != recorded["digest"]:
                raise BaseModelChanged(
                    f"guided policy registered on base model '{recorded['name']}' with digest {recorded['digest']}"
                    f", but '{here['name']}' here has digest {here['digest']}: its answers would differ")
        pipeline.load_policy(self.plan.recipe)  # load before the first request, not during it

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from spi.generate import decode_batches, prepare
        from spi.prompt_sets import PromptSet

        texts = _prompts(model_input)
        prepare(self.plan, PromptSet("the model's input", "alpaca", [{"instruction": t} for t in texts]))
        responses: list[str] = []
        for _, rows in decode_batches(self.plan, texts, list(range(len(texts)))):
            responses.extend(row["output"] for row in rows)
        return pd.DataFrame({"response": responses})


def _prompts(model_input) -> list[str]:
    """The prompts of a list of strings, or of a DataFrame's column ``prompt`` (or its only column)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        columns = list(model_input.columns)
        if "prompt" not in columns and len(columns) != 1:
            raise ValueError(f"input has no column 'prompt' (columns: {', '.join(map(str, columns))})")
        model_input = model_input["prompt" if "prompt" in columns else columns[0]]
    texts = list(model_input)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"prompt at row {bad[0]} is not a non-empty string: {texts[bad[0]]!r}")
    return texts


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    # the input column is unnamed so that a plain list of strings passes MLflow's schema check
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string", "response")]))


def requirements() -> list[str]:
    """Pinned from this environment (never inferred: inference loads the model and may reach the network)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("mlflow", "torch", "transformers", "pandas", "spi-platform"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


def log_guided_policy(tracking_uri: str, run_id: str, folder: str | os.PathLike, name: str = ARTIFACT) -> str:
    """Log the guided policy in ``folder`` as a LoggedModel of ``run_id`` (pyfunc flavor, signature,
    input example, ``policy_metadata``); returns its model id (``models:/<id>`` is its URI)."""
    import pandas as pd
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    from mlflow_store.tracking import client_for

    client = client_for(tracking_uri)
    meta = policy_metadata(folder)
    params = {"system": meta["spi_system"], "base_model": meta["base_model"]["name"],
              "base_model.digest": str(meta["base_model"]["digest"]),
              **{f"beta_{i}": str(v["beta"]) for i, v in enumerate(meta["value_models"], 1)},
              **{f"search.{k}": str(v) for k, v in meta["search"].items() if k != "sampling"}}
    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id,
                                       params=params, tags={"spi.system": meta["spi_system"]},
                                       model_type="spi-guided-policy")
    try:
        with tempfile.TemporaryDirectory(prefix="spi-pyfunc-") as tmp:
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                local, python_model=GuidedPolicyModel(), artifacts={ARTIFACT: str(folder)}, signature=signature(),
                input_example=pd.DataFrame({"prompt": INPUT_EXAMPLE}), pip_requirements=requirements(),
                metadata=meta, model_config={"base_model": meta["base_model"]},
                mlflow_model=Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                                   model_id=model.model_id))
            client.log_model_artifacts(model.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


def policy_folder_of(tracking_uri: str, location: str, dest: str | os.PathLike) -> Path:
    """Download the guided policy folder of the MLflow Model at ``location`` (a registered version's
    source) into ``dest``: the folder its ``load_context`` reads (named in its MLmodel file)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    location = location.rstrip("/")
    Path(dest).mkdir(parents=True, exist_ok=True)
    mlmodel = download_artifacts(artifact_uri=f"{location}/MLmodel", dst_path=str(dest), tracking_uri=tracking_uri)
    relative = Model.load(mlmodel).flavors["python_function"]["artifacts"][ARTIFACT]["path"]
    Path(mlmodel).unlink()
    shutil.rmtree(Path(dest) / Path(relative).name, ignore_errors=True)  # never mix files of two versions
    return Path(download_artifacts(artifact_uri=f"{location}/{relative}", dst_path=str(dest),
                                   tracking_uri=tracking_uri))
