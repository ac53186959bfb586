"""Flows around the model registry and the judge, outside an experiment.

    evaluate_value_model  score a registered guided policy (models:/NAME@ALIAS: the promoted system,
                          spi-k with all its value models) or a file of outputs
    fit_local_judge       train the local Bradley-Terry judge (evaluation.trained_judge)
    promote_value_model   move ``champion`` to ``candidate`` when its paired interval clears the margin
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import records
from flows.compare import finite, format_table, prepare_eval, system_row
from flows.context import RunContext, load_run_recipe, resolve_tracking_uri, typed_run_name
from flows.experiment import run_params, slug, stage_times
from flows.stages import FlowStages
from spi.generate import decoding_recipe, policy_plan
from spi.stagefiles import output_digest, write_json
from spi.systems import system_params


def _evaluate_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    if p.get("outputs"):
        return typed_run_name(f"evaluate-{Path(str(p['outputs'])).stem}")
    model = p.get("registered_model") or Path(str(p.get("recipe", "spi"))).stem + "-value"
    return typed_run_name(f"evaluate-{model}-{p.get('alias')}")


def _promote_run_name() -> str:
    from prefect.runtime import flow_run

    return typed_run_name(f"promote-{flow_run.parameters.get('registered_model')}")


@flow(name="evaluate-value-model", flow_run_name=_evaluate_run_name, persist_result=False)
def evaluate_value_model(
    recipe: str = "smoke",
    overrides: dict | None = None,
    workdir: str | None = None,
    registered_model: str | None = None,
    alias: str = "champion",
    outputs: str | None = None,
    allow_reward_judge: bool = False,
) -> dict:
    """Score the registered guided policy ``models:/NAME@ALIAS`` (the system it was registered as,
    e.g. spi-k with all of V_1..V_k and their betas, decoded exactly as its pyfunc model decodes: with
    the seed, policy, search and reward it recorded) or, with ``outputs``, an AlpacaEval-format file of
    outputs for the recipe's eval set. Logs a child run of the recipe's experiment and, for a
    registered model, ``eval_*`` tags on the version. Returns the metrics.

    Args:
        recipe: Built-in recipe name or recipe YAML path: the eval set, judge and experiment to log to.
        overrides: Nested recipe fields merged over the recipe, e.g. {"evaluation": {"judge": "length"}}.
        workdir: Root for stage files (and MLflow when no server is configured); default execution.workdir.
        registered_model: Registered model name; default the recipe's tracking.registered_model.
        alias: Alias or version number of the registered model to score, e.g. champion.
        outputs: An AlpacaEval-format file of outputs to score instead of a registered model.
        allow_reward_judge: Permit judging with the reward model the experiment trained on.
    """
    from mlflow_store import tracking
    from mlflow_store.registry import get_version, load_registered_value_model

    r = load_run_recipe(recipe, overrides)
    ctx = RunContext(r, workdir)
    stages = FlowStages(ctx)
    name = registered_model or ctx.registered_model
    eval_set, references = prepare_eval(ctx, stages)
    if outputs:
        decoded, label = _given_outputs(ctx, references, outputs)
        system, version = label, None
        params = {"system": label, "outputs": str(outputs), "outputs.digest": decoded["digest"]}
    else:
        resolve_tracking_uri(r.tracking.tracking_uri, ctx.root, must_exist=True)  # a look-up creates no database
        mv = get_version(ctx.tracking_uri, name, alias)
        version = str(mv.version)
        folder = load_registered_value_model(name, version, ctx.tracking_uri, ctx.dir / "registry" / f"{name}-v{version}")
        plan = policy_plan(folder)  # what the version's pyfunc model loads: it decodes with the recipe it recorded
        champion = FlowStages(RunContext(decoding_recipe(r, plan), workdir))
        system = plan.system
        decoded = champion.decode(system, [str(d) for d in plan.value_dirs], eval_set)
        label = f"{alias}-v{version}"
        values = [(Path(d).name, output_digest(d)) for d in plan.value_dirs]
        params = {**system_params(system, plan.recipe, values), "registered_model": name, "version": version}
    judgement = stages.judge(label, references, decoded, allow_reward_judge)
    row = system_row(label, None, decoded, judgement)
    run_id = tracking.find_experiment_run(ctx.tracking_uri, ctx.experiment, r.digest) or tracking.start_experiment_run(
        ctx.tracking_uri, ctx.experiment, run_params(ctx), r.digest, tracking.code_version())
    metrics = {k: v for k, v in row.items() if k not in ("system", "iteration") and finite(v) is not None}
    started, ended = stage_times([decoded, judgement])  # when the decode and the judge ran (or were cached)
    records.track_child_task(ctx.tracking_uri, run_id, f"evaluate-{label}", 0, metrics,
                             {"generations": decoded["path"], "judge_annotations": judgement["path"]},
                             {"spi.judge": judgement["judge"], "spi.registered_model": name}, params,
                             row.get("not_available"), started, ended)
    if version is not None:
        client = tracking.client_for(ctx.tracking_uri)
        for key in ("win_rate", "length_controlled_winrate", "mean_reward"):
            if finite(row.get(key)) is not None:
                client.set_model_version_tag(name, version, f"eval_{key}", repr(float(row[key])))
    create_markdown_artifact(key=f"{slug(r.name)}-evaluate-{slug(alias if not outputs else 'outputs')}",
                             markdown=f"# Evaluation of {label}\n\n```\n{format_table([row])}\n```\n")
    return {"system": label, "guided_system": None if outputs else system,
            "registered_model": name if version else None, "version": version, **row}


def _given_outputs(ctx: RunContext, references: dict, outputs: str) -> tuple[dict, str]:
    """A file of outputs for the eval set as a decode stage's result (no model runs)."""
    from evaluation.data import read_model_outputs

    rows = json.loads(Path(references["path"]).read_text())
    given = read_model_outputs(outputs, rows)
    missing = [e["index"] for e in rows if e["index"] not in given]
    if missing:
        raise ValueError(f"{outputs}: no output for {len(missing)} eval instructions (indices {missing[:5]})")
    label = f"outputs-{output_digest(outputs)[:8]}"
    path = write_json(ctx.dir / "eval" / f"{label}.json", {"system": label, "outputs": [given[e["index"]] for e in rows],
                                                           "compute": {}, "mean_reward": float("nan")})
    return {"path": str(path), "digest": output_digest(path), "mean_reward": float("nan"), "compute": {},
            "seconds": 0.0}, label


@flow(name="fit-local-judge", persist_result=False)
def fit_local_judge(
    name: str = "text-bt",
    data_dir: str | None = None,
    n_instructions: int | None = None,
    backbone: str | None = None,
    out: str | None = None,
    refit: bool = False,
    tracking_uri: str | None = None,
    workdir: str = "runs",
    registered_model: str | None = None,
) -> dict:
    """Train the local Bradley-Terry judge on AlpacaEval preference data (default: the folder of
    SPI_ALPACA_DATA) and save it where ``local:NAME`` finds it first ($SPI_CACHE_DIR/judges/NAME, before
    the copy the package ships for text-bt and minilm-bt). The judge folder is logged as an artifact of a
    run of the MLflow experiment ``local-judges`` and registered as a version of ``registered_model`` (alias
    candidate) with its fingerprint (the identity in judgement-cache keys) as the tag ``spi.judge``.

    Args:
        name: The judge's name, used as local:NAME.
        data_dir: Folder of AlpacaEval data (eval set, outputs, preferences); default $SPI_ALPACA_DATA.
        n_instructions: Instructions whose preferences train the judge; null for the judge's own setting
            (text-bt: all; minilm-bt: 100).
        backbone: Sentence-embedding model under the head (built-in alias, folder or hub id); null for the
            judge's own (text-bt: none, it reads text statistics; minilm-bt: minilm-l6).
        out: Folder to save the judge in; default $SPI_CACHE_DIR/judges/NAME.
        refit: Train again even when the judge exists.
        tracking_uri: MLflow tracking/registry URI; default MLFLOW_TRACKING_URI, the running stack's
            server, else the SQLite file of workdir.
        workdir: Work directory whose mlflow.db is used when no server is configured.
        registered_model: Registered model name of the judge; default judge-NAME.
    """
    import shutil

    from evaluation.judging import embedded_judge_folder, ensure_local_judge, judges_dir, local_judge_folder

    folder = Path(out) if out else local_judge_folder(name)
    if folder == embedded_judge_folder(name):  # never retrain over the package's own copy
        folder = judges_dir() / name
    if refit and folder.exists():
        shutil.rmtree(folder)
    given = {"n_instructions": n_instructions, "backbone": backbone}
    folder = ensure_local_judge(name, data_dir, out=folder, **{k: v for k, v in given.items() if v is not None})
    meta = json.loads((folder / "judge_head.json").read_text())
    uri = resolve_tracking_uri(tracking_uri, workdir)
    model = registered_model or f"judge-{slug(name)}"
    registered = _register_judge(uri, model, name, folder, meta)
    get_run_logger().info("local judge %s at %s (%s pairs), registered as %s version %s (%s)", name, folder,
                          meta["meta"].get("n_pairs"), model, registered["version"], registered["fingerprint"])
    return {"name": name, "folder": str(folder), "backbone": meta["backbone"], "meta": meta["meta"],
            "registered_model": model, "tracking_uri": uri, **registered}


JUDGE_EXPERIMENT = "local-judges"
TAG_JUDGE = "spi.judge"


def _register_judge(uri: str, model: str, name: str, folder: Path, meta: dict) -> dict:
    """Log ``folder`` as the artifact ``judge`` of a run of JUDGE_EXPERIMENT and register it as a
    version of ``model`` tagged with its fingerprint; the same folder again gives the same version."""
    from evaluation.judges import judge_fingerprint
    from mlflow_store import tracking
    from mlflow_store.registry import register_value_model

    fingerprint = judge_fingerprint(f"local:{folder}")
    client = tracking.client_for(uri)
    experiment_id = tracking.get_or_create_experiment(uri, JUDGE_EXPERIMENT)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_JUDGE}` = '{fingerprint}'", max_results=1)
    if runs:
        run_id = runs[0].info.run_id
    else:
        run_id = client.create_run(experiment_id, tags={TAG_JUDGE: fingerprint}, run_name=f"judge-{slug(name)}").info.run_id
        tracking.log_params(uri, run_id, {"name": name, "backbone": meta.get("backbone"),
                                          **{f"meta.{k}": v for k, v in meta.get("meta", {}).items()
                                             if isinstance(v, (int, float, str, bool))}})
        tracking.finish_run(uri, run_id)
    version = register_value_model(uri, model, run_id, folder, artifact_path="judge",
                                   description=f"local judge {name}: {fingerprint}")
    client.set_model_version_tag(model, version, TAG_JUDGE, fingerprint)
    return {"version": version, "run_id": run_id, "fingerprint": fingerprint}


@flow(name="promote-value-model", flow_run_name=_promote_run_name, persist_result=False)
def promote_value_model(
    registered_model: str,
    tracking_uri: str | None = None,
    workdir: str = "runs",
    margin: float = 0.0,
    use_stages: bool = False,
) -> dict:
    """Move ``champion`` to the ``candidate`` version iff the lower bound of the 95% paired bootstrap
    interval of their win-rate difference (same instructions, same judge) exceeds ``margin`` points (>= 0).

    Args:
        registered_model: Registered model name, e.g. smoke-value.
        tracking_uri: MLflow registry URI; default MLFLOW_TRACKING_URI, else the running stack's server,
            else the SQLite file of workdir (which must exist).
        workdir: Work directory whose mlflow.db holds the registry when no server is configured.
        margin: Win-rate points (>= 0) the lower bound of the paired interval must exceed.
        use_stages: Also mirror the deprecated registry stages (Staging, Production).
    """
    from evaluation.metrics import check_margin
    from flows.context import resolve_tracking_uri

    margin = check_margin(margin)  # a clear error before anything is looked up
    uri = resolve_tracking_uri(tracking_uri, workdir, must_exist=True)  # when it runs; never creates a database
    return records.promote_task(uri, registered_model, margin, use_stages)
