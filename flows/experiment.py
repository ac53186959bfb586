"""The experiment flow: the SPI loop, then every system judged, tracked, registered and reported.

    spi_experiment   K iterations (``spi.loop.iterate``), then the baselines and spi-1..spi-K decoded
                     on the evaluation instructions and judged against references (AlpacaEval style),
                     tracked in MLflow, rows in the SQL store, spi-k registered as a guided policy and
                     promoted, a comparison report. Its body reads as its steps: iterate, evaluate,
                     track, register, report.
    run_plain        the same loop and evaluation as plain calls of the same stage functions (no engine,
                     no MLflow, no store): the baseline ``spi bench flow`` measures the flow against

The flow takes the recipe (built-in name or YAML path) and an ``overrides`` dict
(``{"search": {"width": 2}}``), so a run can be started from the Prefect UI form with overrides; the
recipe is parsed once (``flows.context.load_run_recipe``) and passed on as an object. With
``execution.task_runner: dask`` the flow starts itself once more on the recipe's Dask runner and its
stages run sharded (``flows.sharded``). Other flows (evaluate, promote, fit a judge): flows.model_flows.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows import records, sharded
from flows.compare import Evaluation, evaluate_systems, finite, write_report
from flows.context import RunContext, load_run_recipe, typed_run_name
from flows.preflight import check_inputs
from flows.stages import FlowStages
from spi import loop
from spi.config import digest_of
from spi.stagefiles import output_digest
from spi.systems import system_params, write_guided_policy


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "spi"


def _experiment_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    try:
        r = load_run_recipe(p["recipe"], p.get("overrides"))
        return typed_run_name(f"{r.name}-{r.digest[:8]}")
    except Exception:
        return typed_run_name(f"{Path(str(p.get('recipe', 'spi'))).stem}-invalid")


def _round(v):
    return round(v, 4) if isinstance(v, float) and math.isfinite(v) else (None if isinstance(v, float) else v)


def iteration_metrics(it: dict) -> dict:
    """MLflow metrics of one iteration's stages (reward stats, value fit, compute, seconds per stage)."""
    m = {f"rollout_{k}": v for k, v in it["labels"]["stats"].items()}
    m.update({f"value_{k}": v for k, v in it["value"]["report"].items()})
    m.update({f"rollout_{k}": v for k, v in it["rollouts"]["compute"].items() if not k.startswith("seconds_")})
    m.update({f"labels_{k}": v for k, v in (it["labels"].get("compute") or {}).items() if not k.startswith("seconds_")})
    for name in ("rollouts", "labels", "value"):
        m[f"seconds_{name}"] = it[name]["seconds"]
    return m


def headline_metric(ctx: RunContext) -> str:
    """The number spi-k is promoted and plotted by: the win rate, or IFEval's prompt-level strict accuracy."""
    return "prompt_level_strict_acc" if ctx.recipe.evaluation.task == "ifeval" else "win_rate"


def value_fits(iterations: list[dict]) -> dict:
    """Per iteration ("1", "2", ...: JSON keys): V_k's fit report (held-out pair accuracy, explained variance, ...)."""
    return {str(it["iteration"]): it["value"]["report"] for it in iterations}


def run_params(ctx: RunContext) -> dict:
    """The parent run's params: the recipe as it was run (overrides applied), with the places it really
    used: ``execution.workdir`` the folder of this run (``--workdir`` or the form's), ``tracking.*`` the
    tracking URI and store URL (passwords hidden), experiment and registered model that were resolved."""
    data = json.loads(json.dumps(ctx.data))
    data["execution"]["workdir"] = str(ctx.root)
    data["tracking"].update(tracking_uri=_hide_password(ctx.tracking_uri), store_url=_hide_password(ctx.store_url),
                            experiment=ctx.experiment, registered_model=ctx.registered_model)
    return data


def _hide_password(url: str) -> str:
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)  # user:password@host -> user:***@host


def check_judge(ctx: RunContext, allow_reward_judge: bool) -> None:
    """Fail before hours of iterations, not after: the judge exists and is not the reward model."""
    from evaluation.judges import check_independent, check_judge_available

    if ctx.recipe.evaluation.task == "ifeval":  # scored by the verifiers, not by a judge
        return
    check_judge_available(ctx.recipe.evaluation.judge)
    check_independent(ctx.recipe.evaluation.judge, ctx.data["reward"], allow_reward_judge)


class Progress:
    """The run's progress artifact: one step per iteration, per system judged, and the report."""

    def __init__(self, ctx: RunContext):
        r = ctx.recipe
        self.steps, self.done = 2 * r.iterations.count + len(r.baselines.names) + 1, 0
        self.id = create_progress_artifact(0.0, key=f"{slug(r.name)}-progress",
                                           description=f"{r.name}: iterations, then systems decoded and judged")

    def advance(self) -> None:
        self.done += 1
        update_progress_artifact(self.id, min(100.0, 100.0 * self.done / self.steps))


# --------------------------------------------------------------------------- the steps


def iterate(ctx: RunContext, progress: Progress) -> tuple[list[dict], list[str]]:
    """Step 1: the K iterations (the one loop), each iteration's rows into the store as it finishes."""
    r, log = ctx.recipe, get_run_logger()

    def after(it):
        progress.advance()
        stats, rep = it["labels"]["stats"], it["value"]["report"]
        log.info("iteration %d done: reward mean %.4f (best-of-leaves %.4f), V_%d loss %.5f, held-out EV %s",
                 it["iteration"], stats["reward_mean"], stats["reward_best_mean"], it["iteration"],
                 rep.get("final_loss", float("nan")), rep.get("holdout_explained_variance"))
        records.store_rollouts_task(ctx.store_url, ctx.run_key, it["iteration"], it["rollouts"]["path"],
                                    it["labels"]["path"], ctx.reward_name)

    iterations, value_dirs = loop.iterate(r, FlowStages(ctx), after)
    if iterations:
        create_table_artifact(
            key=f"{slug(r.name)}-iterations",
            table=[{"iteration": it["iteration"], **{k: _round(v) for k, v in iteration_metrics(it).items()
                                                     if not k.startswith("rollout_seconds")}} for it in iterations],
            description=f"SPI iterations of {r.name} ({r.digest})",
        )
    return iterations, value_dirs


def evaluate(ctx: RunContext, iterations, value_dirs, allow_reward_judge: bool, progress: Progress) -> Evaluation:
    """Step 2: references, every system decoded and judged; its rows into the store as each is judged."""

    def after(row, decoded, judgement):
        if "matches" not in row:  # the budget-matched Best-of-N reuse one decode: not a step of their own
            progress.advance()
        records.store_generations_task(ctx.store_url, ctx.run_key, row["system"], row["iteration"] or 0,
                                       decoded["path"], judgement["path"], ctx.reward_name)

    return evaluate_systems(ctx, iterations, value_dirs, allow_reward_judge, after)


def child_params(ctx: RunContext, row: dict, iterations: list[dict]) -> dict:
    """The child run's params: what the system is (spi.systems.system_params: W, K, L, N, sampling, its
    guide, V_1..V_m by folder and digest with their weights and betas), its iteration, and the
    Best-of-N's budget match."""
    values = [(Path(it["value"]["path"]).name, it["value"]["digest"]) for it in iterations]
    params = system_params(row["system"], ctx.recipe, values)
    params["iteration"] = str(row["iteration"]) if row["iteration"] is not None else "none (baseline)"
    if row.get("matches"):
        params["matches_tokens_of"] = row["matches"]
        params["matches_unit"] = row.get("matched_unit", "generated_tokens")
    return params


def stage_times(stages: list[dict]) -> tuple[float | None, float | None]:
    """(start, end) in epoch seconds of the stages a child run describes, as they ran (a cached stage:
    when it was computed); None where no stage recorded them."""
    starts = [s["started_at"] for s in stages if s.get("started_at") is not None]
    ends = [s["ended_at"] for s in stages if s.get("ended_at") is not None]
    return (min(starts) if starts else None), (max(ends) if ends else None)


def track(ctx: RunContext, run_id: str, ev: Evaluation, iterations: list[dict]) -> None:
    """Step 3: a child run per baseline and per iteration (the system's params, metrics, generations,
    judgements, rollouts), timed by the stages it describes; a metric that is not available is a tag
    with the reason, not a metric."""
    from mlflow_store import tracking

    for row in ev.rows:
        name, k = row["system"], row["iteration"]
        decoded, judgement = ev.judged[name]
        metrics = {key: v for key, v in row.items() if key not in ("system", "iteration") and finite(v) is not None}
        artifacts = {"generations": decoded["path"], "judge_annotations": judgement["path"]}
        stages = [decoded, judgement]
        if k is not None:
            it = iterations[k - 1]
            metrics.update({key: v for key, v in iteration_metrics(it).items() if finite(v) is not None})
            artifacts.update(rollouts=it["rollouts"]["path"], labels=it["labels"]["path"])
            stages += [it["rollouts"], it["labels"], it["value"]]
        started, ended = stage_times(stages)
        row["run_id"] = records.track_child_task(
            ctx.tracking_uri, run_id, name if k is None else "spi", k or 0, metrics, artifacts,
            {"spi.judge": ev.judge, "spi.reward_model": ctx.reward_name}, child_params(ctx, row, iterations),
            row.get("not_available"), started, ended)
        if k is not None:
            headline = headline_metric(ctx)
            tracking.log_metrics(ctx.tracking_uri, run_id,
                                 {f"spi_{headline}": row[headline], "spi_mean_reward": row["mean_reward"]}, step=k)


def register(ctx: RunContext, ev: Evaluation, iterations: list[dict], value_dirs: list[str]) -> list[dict]:
    """Step 4: each spi-k registered as the whole guided policy (base model, V_1..V_k and their betas),
    tagged with its evaluation numbers, then promoted when it beats the champion by the margin."""
    r, promotions = ctx.recipe, []
    for row in ev.rows:
        k = row["iteration"]
        if k is None:
            continue
        key = digest_of([r.policy.model, r.iterations.betas[:k], [output_digest(d) for d in value_dirs[:k]]])
        folder = ctx.dir / "registry" / f"spi-{k}-{key}"
        if not (folder / "policy.json").exists():
            write_guided_policy(folder, f"spi-{k}", r, value_dirs[:k])
        metrics = {key: v for key, v in {**row, **iteration_metrics(iterations[k - 1])}.items()
                   if key not in ("system", "iteration", "run_id") and finite(v) is not None}
        row["registered_version"] = records.register_task(ctx.tracking_uri, ctx.registered_model, row["run_id"],
                                                          str(folder), {**metrics, "iteration": k})
        decision = records.promote_task(ctx.tracking_uri, ctx.registered_model, r.tracking.promotion_margin)
        promotions.append({"iteration": k, **decision})
    return promotions


def table_row(row: dict) -> dict:
    """A system's row as the Prefect table shows it: rounded numbers, "n/a (why)" for a missing metric."""
    from evaluation.report import shown, why_not

    return {k: shown(None, "", why_not(row, k)) if v is None and why_not(row, k) else _round(v)
            for k, v in row.items() if k != "not_available"}


def report(ctx: RunContext, run_id: str, ev: Evaluation, iterations, promotions, progress: Progress) -> dict:
    """Step 5: the comparison (table, markdown, Prefect artifacts, parent-run artifacts) and the summary."""
    from mlflow_store import tracking

    r = ctx.recipe
    rep = write_report(ctx, ev, iterations, run_id, promotions)
    create_table_artifact(key=f"{slug(r.name)}-comparison", table=[table_row(row) for row in ev.rows],
                          description=f"Systems of {r.name} judged by {ev.judge}")
    create_markdown_artifact(key=f"{slug(r.name)}-report", markdown=rep["markdown"], description=f"SPI experiment {r.name}")
    progress.advance()
    summary = {
        "recipe": r.name, "digest": r.digest, "workdir": str(ctx.root), "tracking_uri": ctx.tracking_uri,
        "store_url": ctx.store_url, "experiment": ctx.experiment, "experiment_run_id": run_id,
        "registered_model": ctx.registered_model if r.iterations.count else None, "judge": ev.judge,
        "reward_model": ctx.reward_name, "eval_set": ev.references["path"],
        "systems": {row["system"]: {k: v for k, v in row.items() if k != "system"} for row in ev.rows},
        "task": r.evaluation.task, "first_iteration": r.value.first_iteration,
        "later_iterations": r.value.later_iterations, "value_fits": value_fits(iterations),
        "paired": rep["paired"], "promotions": promotions, "stages": dict(ctx.stages), "table": rep["table"],
        "report": str(rep["file"]),
    }
    experiment_id = tracking.client_for(ctx.tracking_uri).get_run(run_id).info.experiment_id
    summary["mlflow_ui"] = tracking.ui_url(ctx.tracking_uri, experiment_id)  # None for a database URI
    summary_file = ctx.dir / f"summary-{r.digest[:12]}.json"
    summary_file.write_text(json.dumps(summary, indent=1))
    for path, folder in [(rep["file"], "report"), (summary_file, "report"), (ev.references["path"], "eval")]:
        tracking.log_artifacts(ctx.tracking_uri, run_id, path, folder)
    for plot in rep["plots"]:
        tracking.log_artifacts(ctx.tracking_uri, run_id, plot, f"report/{rep['plot_dir'].name}")
    get_run_logger().info("comparison (judge %s):\n%s", ev.judge, rep["table"])
    if summary["mlflow_ui"]:
        get_run_logger().info("MLflow UI, the runs of experiment %s: %s", ctx.experiment, summary["mlflow_ui"])
    return summary


# --------------------------------------------------------------------------- the flow and its plain twin


@flow(name="spi-experiment", flow_run_name=_experiment_run_name, persist_result=False)
def spi_experiment(
    recipe: str = "smoke",
    overrides: dict | None = None,
    workdir: str | None = None,
    allow_reward_judge: bool = False,
) -> dict:
    """A whole SPI experiment: K iterations, baselines and spi-1..spi-K judged, tracked and compared.

    Args:
        recipe: Built-in recipe name (smoke, paper) or the path of a recipe YAML file.
        overrides: Nested recipe fields merged over the recipe, e.g. {"search": {"width": 2}}.
        workdir: Root for stage files, MLflow and the store; default the recipe's execution.workdir.
        allow_reward_judge: Permit judging with the reward model the experiment trained on (reported as such).
    """
    from mlflow_store import tracking

    log = get_run_logger()
    r = load_run_recipe(recipe, overrides)
    if r.execution.task_runner == "dask" and not sharded.on_cluster():  # again, on the Dask runner
        return sharded.with_runner(spi_experiment, r)(recipe, overrides, workdir, allow_reward_judge)
    ctx = RunContext(r, workdir)
    check_judge(ctx, allow_reward_judge)
    check_inputs(r)  # every model resolves, every data file parses, before the first stage
    scoring = "the verifiers (ifeval)" if r.evaluation.task == "ifeval" else f"judge {r.evaluation.judge}"
    log.info("experiment %s (%s): %d iterations, baselines %s, scored by %s; files in %s", r.name, r.digest,
             r.iterations.count, ", ".join(r.baselines.names) or "none", scoring, ctx.dir)
    run_id = tracking.find_experiment_run(ctx.tracking_uri, ctx.experiment, r.digest)
    if run_id:
        log.info("resuming MLflow run %s of experiment %s", run_id, ctx.experiment)
        tracking.client_for(ctx.tracking_uri).update_run(run_id, status="RUNNING")
    else:
        given = json.dumps(overrides or {}, sort_keys=True, default=str)  # the --set / form overrides
        run_id = tracking.start_experiment_run(ctx.tracking_uri, ctx.experiment, run_params(ctx), r.digest,
                                               tracking.code_version(), run_name=f"{r.name}-{r.digest[:8]}",
                                               tags={tracking.TAG_OVERRIDES: given})
        log.info("started MLflow run %s in experiment %s", run_id, ctx.experiment)
    try:
        progress = Progress(ctx)
        iterations, value_dirs = iterate(ctx, progress)
        ev = evaluate(ctx, iterations, value_dirs, allow_reward_judge, progress)
        track(ctx, run_id, ev, iterations)
        promotions = register(ctx, ev, iterations, value_dirs)
        summary = report(ctx, run_id, ev, iterations, promotions, progress)
    except BaseException:
        try:
            tracking.finish_run(ctx.tracking_uri, run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    tracking.finish_run(ctx.tracking_uri, run_id)
    return summary


def run_plain(recipe: str, overrides: dict | None = None, workdir: str | None = None,
              allow_reward_judge: bool = False) -> dict:
    """The experiment's work (iterations, decoding, judging, report) as plain calls of the same stage
    functions through the same loop: no Prefect engine, no MLflow, no store."""
    r = load_run_recipe(recipe, overrides)
    ctx = RunContext(r, workdir, runner="plain")
    check_judge(ctx, allow_reward_judge)
    iterations, value_dirs = loop.iterate(r, FlowStages(ctx))
    ev = evaluate_systems(ctx, iterations, value_dirs, allow_reward_judge)
    rep = write_report(ctx, ev, iterations, "none (plain calls)", [])
    return {"recipe": r.name, "digest": r.digest, "systems": {row["system"]: row for row in ev.rows},
            "paired": rep["paired"], "value_fits": value_fits(iterations), "stages": dict(ctx.stages),
            "table": rep["table"], "report": str(rep["file"]),
            "outputs": {name: {"decoded": d["path"], "judged": j["path"]} for name, (d, j) in ev.judged.items()}}
