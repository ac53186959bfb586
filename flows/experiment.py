"""Prefect flows of an SPI experiment.

    spi_iteration         one iteration k: rollouts -> labels -> value fit (a subflow of the experiment)
    spi_experiment        K iterations, then the baselines and spi-1..spi-K decoded on the evaluation
                          instructions, judged against references (AlpacaEval style), tracked in MLflow,
                          rows in the SQL store, value models registered and promoted, a comparison
    evaluate_value_model  score a registered value model (models:/NAME@ALIAS) or a file of outputs
    fit_local_judge       train the local Bradley-Terry judge (evaluation.trained_judge)
    promote_value_model   move ``champion`` to ``candidate`` when it wins by the margin

``run_plain`` runs the experiment's stages as plain calls (no engine, no MLflow, no store): the
baseline ``spi bench flow`` measures the orchestration overhead against.

Every flow takes the recipe (built-in name or YAML path) and an ``overrides`` dict
(``{"search": {"width": 2}}``), so a run can be started from the Prefect UI form with overrides.

Work directory layout (``--workdir`` / ``execution.workdir``)::

    <root>/mlflow.db, mlartifacts/    MLflow tracking + registry (default tracking URI)
    <root>/store.db                   the SQL store (default store URL)
    <root>/judgements.sqlite          judge cache
    <root>/.prefect-results/          persisted task results (the Prefect cache)
    <root>/<recipe>/iteration-K/      rollouts-<key>.jsonl, labels-<key>.jsonl, value-<key>/
    <root>/<recipe>/eval/             eval set, references, <system>-<key>.json, judge-<system>-<key>.json
    <root>/<recipe>/report-<digest>.md / summary-<digest>.json
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from evaluation import report
from evaluation.judges import judge_fingerprint
from flows import distributed
from flows import tasks as T
from spi.config import Recipe, digest_of, load_recipe

VALUE_SYSTEMS_PREFIX = "spi-"


# --------------------------------------------------------------------------- context and helpers


class Context:
    """Where one experiment's files, tracking and store live (plain, not passed to tasks)."""

    def __init__(
        self,
        recipe: Recipe,
        workdir: str | None = None,
        source: str | None = None,
        overrides: dict | None = None,
        orchestrated: bool = True,
    ):
        from mlflow_store.store import default_store_url
        from mlflow_store.tracking import default_tracking_uri

        self.recipe = recipe
        self.source, self.overrides = source or recipe.name, overrides or None
        self.data = recipe.model_dump(mode="json")
        self.root = Path(workdir or recipe.execution.workdir).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.dir = self.root / recipe.name
        self.results = self.root / ".prefect-results"
        # The recipe wins; then the services' environment (spi up, compose); then files in the workdir.
        self.tracking_uri = (recipe.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or default_tracking_uri(self.root))
        self.store_url = recipe.tracking.store_url or os.environ.get("SPI_STORE_URL") or default_store_url(self.root)
        self.experiment = recipe.tracking.experiment or recipe.name
        self.registered_model = recipe.tracking.registered_model or f"{recipe.name}-value"
        self.judge_cache = str(self.root / "judgements.sqlite")
        self.run_key = f"{recipe.name}:{recipe.digest}"
        self.reward_name = f"{recipe.reward.kind}:{recipe.reward.model}:{recipe.section_digest('reward')[:8]}"
        self.stages: dict[str, str] = {}
        # False: stages are plain calls of the task functions (no Prefect engine), for run_plain
        self.orchestrated = orchestrated

    def run_stage(self, label: str, task, **params) -> dict:
        """Run a stage task with results persisted in the work directory; check a cached output."""
        if not self.orchestrated:
            result = task.fn(**params)
            self.stages.setdefault(label, "computed" if result["computed"] else "reused")
            return result
        state = task.with_options(result_storage=self.results)(**params, return_state=True)
        result = state.result()
        cached = state.name == "Cached"
        if cached:
            path = Path(result["path"])
            if not path.exists():  # output deleted since: recompute it
                state = task.with_options(result_storage=self.results, refresh_cache=True)(
                    **params, return_state=True
                )
                result, cached = state.result(), False
            elif T.digest(path) != result["digest"]:
                raise T.StageError(
                    f"{path} changed after it was written (digest {T.digest(path)}, recorded {result['digest']}); "
                    f"delete it and its .key file to recompute it"
                )
        # a stage asked for twice in one run (the reference generator's decode) keeps its first state
        self.stages.setdefault(
            label, "cached" if cached else ("computed" if result["computed"] else "reused")
        )
        return result


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "spi"


def _load(recipe: str, overrides: dict | None) -> Recipe:
    return load_recipe(recipe, overrides or None)


def _experiment_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    try:
        r = _load(p["recipe"], p.get("overrides"))
        return f"{r.name}-{r.digest[:8]}"
    except Exception:
        return f"{Path(str(p.get('recipe', 'spi'))).stem}-invalid"


def _iteration_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    try:
        name = _load(p["recipe"], p.get("overrides")).name
    except Exception:
        name = Path(str(p.get("recipe", "spi"))).stem
    return f"{name}-iter{p.get('iteration')}"


def _finite(x):
    return x if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else None


# --------------------------------------------------------------------------- one iteration


@flow(name="spi-iteration", flow_run_name=_iteration_run_name, persist_result=False)
def spi_iteration(
    recipe: str = "smoke",
    overrides: dict | None = None,
    iteration: int = 1,
    value_dirs: list[str] | None = None,
    workdir: str | None = None,
) -> dict:
    """Iteration k of SPI: rollouts of pi_{k-1} -> reward labels -> fit V_k.

    ``value_dirs``: the folders of V_1..V_{k-1} (from earlier iterations).
    """
    r = _load(recipe, overrides)
    ctx = Context(r, workdir)
    return _iteration(ctx, iteration, list(value_dirs or []))


def _iteration(ctx: Context, k: int, value_dirs: list[str]) -> dict:
    r, log = ctx.recipe, T.run_logger()
    if len(value_dirs) != k - 1:
        raise ValueError(
            f"iteration {k} needs the {k - 1} value models of the earlier iterations, got {len(value_dirs)}"
        )
    stage = ctx.dir / f"iteration-{k}"
    log.info("iteration %d/%d of %s", k, r.iterations.count, r.name)
    key = T.stage_key(
        "rollouts",
        r.section_digest("policy", "sampling", "search", "prompts", "iterations", "reward"),
        r.seed,
        k,
        [T.digest(d) for d in value_dirs],
    )
    rollouts = ctx.run_stage(
        f"iteration-{k}/rollouts",
        T.rollouts_task,
        recipe=ctx.data,
        iteration=k,
        value_dirs=value_dirs,
        out=str(stage / f"rollouts-{key}.jsonl"),
        key=key,
    )
    key = T.stage_key("labels", r.section_digest("reward"), rollouts["digest"])
    labels = ctx.run_stage(
        f"iteration-{k}/labels",
        T.labels_task,
        recipe=ctx.data,
        iteration=k,
        rollouts=rollouts["path"],
        out=str(stage / f"labels-{key}.jsonl"),
        key=key,
    )
    key = T.stage_key(
        "value", r.section_digest("policy", "value"), r.seed, k, rollouts["digest"], labels["digest"]
    )
    value = ctx.run_stage(
        f"iteration-{k}/value",
        T.value_fit_task,
        recipe=ctx.data,
        iteration=k,
        rollouts=rollouts["path"],
        labels=labels["path"],
        out=str(stage / f"value-{key}"),
        key=key,
    )
    rep = value["report"]
    log.info(
        "iteration %d done: reward mean %.4f (best-of-leaves %.4f), V_%d loss %.5f, held-out EV %s",
        k,
        labels["stats"]["reward_mean"],
        labels["stats"]["reward_best_mean"],
        k,
        rep.get("final_loss", float("nan")),
        rep.get("holdout_explained_variance"),
    )
    return {
        "iteration": k,
        "rollouts": rollouts,
        "labels": labels,
        "value": value,
        "stages": dict(ctx.stages),
    }


def iteration_metrics(it: dict) -> dict:
    """MLflow metrics of one iteration's stages (reward stats, value fit, compute, seconds per stage)."""
    m = {f"rollout_{k}": v for k, v in it["labels"]["stats"].items()}
    m.update({f"value_{k}": v for k, v in it["value"]["report"].items()})
    m.update(
        {f"rollout_{k}": v for k, v in it["rollouts"]["compute"].items() if not k.startswith("seconds_")}
    )
    for name in ("rollouts", "labels", "value"):
        m[f"seconds_{name}"] = it[name]["seconds"]
    return m


# --------------------------------------------------------------------------- evaluation stages


def _prepare_eval(ctx: Context) -> tuple[dict, dict]:
    """(eval set, eval set with references) stage results: the instructions every system answers
    (decode keys depend on them only) and the references the judge compares with (the user's, or
    written by ``evaluation.reference_generator``, whose decode is shared with that baseline)."""
    r = ctx.recipe
    ev = r.evaluation
    source = Path(ev.eval_set).expanduser()
    source_digest = T.digest(source) if source.is_file() else None
    key = T.stage_key(
        "eval-set", digest_of([ev.eval_set, ev.n_instructions, ev.subset]), r.seed, source_digest
    )
    eval_set = ctx.run_stage(
        "eval/eval-set",
        T.eval_set_task,
        recipe=ctx.data,
        out=str(ctx.dir / "eval" / f"eval-set-{key}.json"),
        key=key,
    )
    if eval_set["has_references"]:
        return eval_set, eval_set
    generator = ev.reference_generator
    if generator.startswith(VALUE_SYSTEMS_PREFIX) or generator == "blockwise-cd":
        raise ValueError(
            f"evaluation.reference_generator '{generator}' needs value models; name a baseline system"
        )
    generated = _decode(ctx, generator, [], eval_set)
    key = T.stage_key("references", generator, eval_set["digest"], generated["digest"])
    return eval_set, ctx.run_stage(
        "eval/references",
        T.references_task,
        eval_set=eval_set["path"],
        generated=generated["path"],
        generator=generator,
        out=str(ctx.dir / "eval" / f"references-{key}.json"),
        key=key,
    )


def _decode(ctx: Context, system: str, value_dirs: list[str], eval_set: dict) -> dict:
    r = ctx.recipe
    if ctx.orchestrated and distributed.is_sharded(r.execution):
        return distributed.decode_body(ctx, system, value_dirs, eval_set["path"])
    key = T.stage_key(
        "decode",
        system,
        r.section_digest("policy", "sampling", "search", "baselines", "iterations", "reward"),
        r.seed,
        eval_set["digest"],
        [T.digest(d) for d in value_dirs],
    )
    return ctx.run_stage(
        f"eval/decode-{system}",
        T.decode_task,
        recipe=ctx.data,
        system=system,
        value_dirs=value_dirs,
        eval_set=eval_set["path"],
        out=str(ctx.dir / "eval" / f"{system.replace(':', '-')}-{key}.json"),
        key=key,
    )


def _judge(ctx: Context, system: str, references: dict, decoded: dict, allow_reward_judge: bool) -> dict:
    spec = ctx.recipe.evaluation.judge
    reward = ctx.data["reward"]
    if ctx.orchestrated and distributed.is_sharded(ctx.recipe.execution):
        return distributed.judge_body(ctx, system, references["path"], decoded["path"], allow_reward_judge)
    key = T.stage_key(
        "judge",
        system,
        judge_fingerprint(spec, reward),
        references["digest"],
        decoded["digest"],
        allow_reward_judge,
    )
    return ctx.run_stage(
        f"eval/judge-{system}",
        T.judge_task,
        system=system,
        eval_set=references["path"],
        outputs=decoded["path"],
        judge=spec,
        reward=reward,
        out=str(ctx.dir / "eval" / f"judge-{system}-{key}.json"),
        key=key,
        cache=ctx.judge_cache,
        allow_reward_judge=allow_reward_judge,
    )


def system_row(system: str, iteration: int | None, decoded: dict, judged: dict) -> dict:
    m = judged["metrics"]
    return {
        "system": system,
        "iteration": iteration,
        "mean_reward": decoded["mean_reward"],
        "win_rate": m["win_rate"],
        "win_rate_ci_low": m.get("win_rate_ci_low"),
        "win_rate_ci_high": m.get("win_rate_ci_high"),
        "standard_error": _finite(m.get("standard_error")),
        "length_controlled_winrate": m.get("length_controlled_winrate"),
        "policy_tokens": int(decoded["compute"].get("policy_tokens", 0)),
        "generated_tokens": int(decoded["compute"].get("generated_tokens", 0)),
        "avg_length": m.get("avg_length"),
        "seconds_decode": decoded["seconds"],
        "seconds_judge": judged["seconds"],
    }


def format_table(rows: list[dict]) -> str:
    """The comparison table printed at the end of ``spi run``."""

    def num(x, fmt):
        return format(x, fmt) if x is not None else "n/a"

    lines = [
        f"{'system':<16}{'iter':>5}{'mean reward':>13}{'win rate [95% CI]':>26}{'LC win':>9}{'policy tokens':>15}"
    ]
    for row in rows:
        ci = f"{row['win_rate']:6.2f} [{num(row['win_rate_ci_low'], '5.1f')}, {num(row['win_rate_ci_high'], '5.1f')}]"
        lines.append(
            f"{row['system']:<16}{('-' if row['iteration'] is None else row['iteration']):>5}"
            f"{row['mean_reward']:>13.4f}{ci:>26}{num(row['length_controlled_winrate'], '9.2f'):>9}"
            f"{row['policy_tokens']:>15d}"
        )
    return "\n".join(lines)


def _report_head(ctx: Context, judge: str, run_id: str, paired: list[dict]) -> list[str]:
    r = ctx.recipe
    beyond = [f"{p['system']} vs {p['against']} ({p['mean_difference']:+.2f})" for p in paired if not p["within_noise"]]
    verdict = (
        "Differences beyond noise (95% paired interval excludes 0): " + "; ".join(beyond) + "."
        if beyond
        else "No SPI iteration differs from the baselines it is paired with beyond noise (every 95% paired "
        "interval holds 0)." if paired else ""
    )
    return [
        f"# SPI experiment `{r.name}` ({r.digest})",
        "",
        f"Judge: `{judge}`; reward model (used for training, not for judging): `{ctx.reward_name}`.",
        f"MLflow: `{ctx.tracking_uri}`, experiment `{ctx.experiment}`, run `{run_id}`.",
        "",
        verdict,
    ]


def _matched_best_of_n(ctx: Context, rows: list[dict], eval_set: dict, n_eval: int):
    """(system, decode, "spi-k, ...") for Best-of-N at each spi-k's generated tokens (training included):
    the widest is decoded, the others are its first N rows (the rows they would sample themselves)."""
    s = ctx.recipe.search
    sizes = report.matched_sizes(rows, s.width * s.successors, n_eval)
    if not sizes:
        return []
    widest = max(sizes.values())
    decoded = _decode(ctx, f"best-of-n:{widest}", [], eval_set)
    out = []
    for n in sorted(set(sizes.values())):
        name = f"best-of-n:{n}"
        matches = ", ".join(f"spi-{k}" for k in sorted(sizes) if sizes[k] == n)
        if n == widest:
            out.append((name, decoded, matches))
            continue
        key = T.stage_key("best-of-first", n, decoded["digest"])
        out.append((name, ctx.run_stage(
            f"eval/decode-{name}", T.best_of_first_task, source=decoded["path"], n=n,
            out=str(ctx.dir / "eval" / f"{name.replace(':', '-')}-{key}.json"), key=key,
        ), matches))
    return out


# --------------------------------------------------------------------------- the experiment


@flow(name="spi-experiment", flow_run_name=_experiment_run_name, persist_result=False)
def spi_experiment(
    recipe: str = "smoke",
    overrides: dict | None = None,
    workdir: str | None = None,
    allow_reward_judge: bool = False,
) -> dict:
    """A whole SPI experiment: K iterations, baselines and spi-1..spi-K judged, tracked and compared.

    recipe: built-in recipe name (smoke, paper) or a YAML path; overrides: nested dict merged over it
    (e.g. {"search": {"width": 2}}); workdir: root for files, MLflow and the store (default
    execution.workdir); allow_reward_judge: permit judging with the training reward model.
    """
    from evaluation.judges import check_independent, check_judge_available
    from mlflow_store import tracking

    log = get_run_logger()
    r = _load(recipe, overrides)
    if distributed.is_sharded(r.execution) and not distributed.on_cluster():  # again, on the Dask runner
        on_dask = distributed.with_runner(spi_experiment, recipe, overrides)
        return on_dask(recipe, overrides, workdir, allow_reward_judge)
    ctx = Context(r, workdir, recipe, overrides)
    check_judge_available(r.evaluation.judge)  # fail before hours of iterations, not after
    check_independent(r.evaluation.judge, ctx.data["reward"], allow_reward_judge)
    log.info(
        "experiment %s (%s): %d iterations, baselines %s, judge %s; files in %s",
        r.name,
        r.digest,
        r.iterations.count,
        ", ".join(r.baselines.names) or "none",
        r.evaluation.judge,
        ctx.dir,
    )

    run_id = tracking.find_experiment_run(ctx.tracking_uri, ctx.experiment, r.digest)
    if run_id:
        log.info("resuming MLflow run %s of experiment %s", run_id, ctx.experiment)
        tracking.client_for(ctx.tracking_uri).update_run(run_id, status="RUNNING")
    else:
        run_id = tracking.start_experiment_run(
            ctx.tracking_uri,
            ctx.experiment,
            ctx.data,
            r.digest,
            tracking.code_version(),
            run_name=f"{r.name}-{r.digest[:8]}",
        )
        log.info("started MLflow run %s in experiment %s", run_id, ctx.experiment)
    try:
        summary = _experiment_body(ctx, run_id, allow_reward_judge)
    except BaseException:
        try:
            tracking.finish_run(ctx.tracking_uri, run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    tracking.finish_run(ctx.tracking_uri, run_id)
    return summary


def run_iterations(ctx: Context, on_iteration=None) -> tuple[list[dict], list[str]]:
    """The K iterations in order (each V_k steers the next rollouts): subflows, or stages sharded on
    the flow's Dask runner, under the engine; plain calls otherwise. ``on_iteration(it)`` after each."""
    r = ctx.recipe
    iterations, value_dirs = [], []
    for k in range(1, r.iterations.count + 1):
        if not ctx.orchestrated:
            it = _iteration(ctx, k, list(value_dirs))
        elif distributed.is_sharded(r.execution):
            it = distributed.iteration_body(ctx, k, list(value_dirs))
        else:
            it = spi_iteration.with_options(flow_run_name=f"{r.name}-iter{k}")(
                recipe=ctx.source,
                overrides=ctx.overrides,
                iteration=k,
                value_dirs=list(value_dirs),
                workdir=str(ctx.root),
            )
        iterations.append(it)
        ctx.stages.update(it["stages"])
        value_dirs.append(it["value"]["path"])
        if on_iteration:
            on_iteration(it)
    return iterations, value_dirs


@dataclass
class Evaluation:
    """Every system decoded and judged: one row each, the (decode, judgement) stage results by system."""

    rows: list[dict]
    judged: dict[str, tuple[dict, dict]]
    judge: str | None
    references: dict


def evaluate_systems(
    ctx: Context, iterations: list[dict], value_dirs: list[str], allow_reward_judge: bool, on_judged=None
) -> Evaluation:
    """Baselines and spi-1..spi-K (then Best-of-N at their budgets) decoded on the eval set and judged
    against the references; ``on_judged(row, decoded, judgement)`` after each system."""
    r = ctx.recipe
    eval_set, references = _prepare_eval(ctx)
    systems = [(name, None, value_dirs[:1] if name == "blockwise-cd" else []) for name in r.baselines.names]
    systems += [(f"spi-{k}", k, value_dirs[:k]) for k in range(1, r.iterations.count + 1)]
    ev = Evaluation([], {}, None, references)
    n_eval = len(json.loads(Path(references["path"]).read_text()))

    def judge(name, k, decoded, **extra):
        judgement = _judge(ctx, name, references, decoded, allow_reward_judge)
        ev.judge = judgement["judge"]
        ev.judged[name] = (decoded, judgement)
        row = system_row(name, k, decoded, judgement)
        row.update(report.cost_fields(row, decoded, iterations, n_eval), **extra)
        ev.rows.append(row)
        if on_judged:
            on_judged(row, decoded, judgement)

    for name, k, dirs in systems:
        judge(name, k, _decode(ctx, name, dirs, eval_set))
    if r.baselines.budget_matched_best_of_n:
        for name, decoded, matches in _matched_best_of_n(ctx, ev.rows, eval_set, n_eval):
            judge(name, None, decoded, matches=matches)
    return ev


def write_report(ctx: Context, ev: Evaluation, iterations: list[dict], run_id: str, promotions: list[dict]) -> dict:
    """The comparison: table, plots, paired differences and the markdown report file."""
    r = ctx.recipe
    plot_dir = ctx.dir / f"report-{r.digest[:12]}-plots"
    plots = report.write_plots(ev.rows, plot_dir, f"{r.name} ({ev.judge})") if ev.rows else []
    paired = report.paired_rows(ev.rows, ev.judged)
    markdown = report.render(
        _report_head(ctx, ev.judge, run_id, paired), ev.rows, iterations, paired,
        [f"{plot_dir.name}/{p.name}" for p in plots], report.examples(ev.rows, ev.judged), promotions,
    )
    report_file = ctx.dir / f"report-{r.digest[:12]}.md"
    report_file.write_text(markdown)
    return {"table": format_table(ev.rows), "markdown": markdown, "file": report_file, "plots": plots,
            "plot_dir": plot_dir, "paired": paired}


def _experiment_body(ctx: Context, run_id: str, allow_reward_judge: bool) -> dict:
    from mlflow_store import tracking

    r, log = ctx.recipe, get_run_logger()
    slug = _slug(r.name)

    # 1. K iterations (subflows), store rows as each finishes
    steps = 2 * r.iterations.count + len(r.baselines.names) + 1
    progress = {"done": 0, "id": create_progress_artifact(
        0.0, key=f"{slug}-progress", description=f"{r.name}: iterations, then systems decoded and judged"
    )}

    def advance():
        progress["done"] += 1
        update_progress_artifact(progress["id"], min(100.0, 100.0 * progress["done"] / steps))

    def after_iteration(it):
        advance()
        T.store_rollouts_task(ctx.store_url, ctx.run_key, it["iteration"], it["rollouts"]["path"],
                              it["labels"]["path"], ctx.reward_name)

    iterations, value_dirs = run_iterations(ctx, after_iteration)
    if iterations:
        create_table_artifact(
            key=f"{slug}-iterations",
            table=[
                {
                    "iteration": it["iteration"],
                    **{
                        k: _round(v)
                        for k, v in iteration_metrics(it).items()
                        if not k.startswith("rollout_seconds")
                    },
                }
                for it in iterations
            ],
            description=f"SPI iterations of {r.name} ({r.digest})",
        )

    # 2. evaluation: references, decode every system, judge; store rows as each is judged
    def after_system(row, decoded, judgement):
        if "matches" not in row:  # the budget-matched Best-of-N reuse one decode: not a step of their own
            advance()
        T.store_generations_task(ctx.store_url, ctx.run_key, row["system"], row["iteration"] or 0,
                                 decoded["path"], judgement["path"], ctx.reward_name)

    ev = evaluate_systems(ctx, iterations, value_dirs, allow_reward_judge, after_system)
    rows, judged_by, references = ev.rows, ev.judge, ev.references

    # 3. tracking: a child run per baseline and per iteration; register and promote value models
    promotions = []
    for row in rows:
        name, k = row["system"], row["iteration"]
        decoded, judgement = ev.judged[name]
        metrics = {
            key: v for key, v in row.items() if key not in ("system", "iteration") and _finite(v) is not None
        }
        artifacts = {"generations": decoded["path"], "judge_annotations": judgement["path"]}
        tags = {"spi.judge": judged_by, "spi.reward_model": ctx.reward_name}
        if k is None:
            tracking_system, iteration = name, 0
        else:
            it = iterations[k - 1]
            metrics.update({key: v for key, v in iteration_metrics(it).items() if _finite(v) is not None})
            artifacts.update(rollouts=it["rollouts"]["path"], labels=it["labels"]["path"])
            tracking_system, iteration = "spi", k
        child = T.track_child_task(
            ctx.tracking_uri, run_id, tracking_system, iteration, metrics, artifacts, tags
        )
        row["run_id"] = child
        if k is not None:
            tracking.log_metrics(
                ctx.tracking_uri,
                run_id,
                {"spi_win_rate": row["win_rate"], "spi_mean_reward": row["mean_reward"]},
                step=k,
            )
            version = T.register_task(
                ctx.tracking_uri,
                ctx.registered_model,
                child,
                iterations[k - 1]["value"]["path"],
                {**metrics, "iteration": k},
            )
            decision = T.promote_task(ctx.tracking_uri, ctx.registered_model, r.tracking.promotion_margin)
            promotions.append({"iteration": k, **decision})
            row["registered_version"] = version

    # 4. comparison: table, markdown, Prefect artifacts, parent-run artifacts, summary
    rep = write_report(ctx, ev, iterations, run_id, promotions)
    create_table_artifact(
        key=f"{slug}-comparison",
        table=[{k: _round(v) for k, v in row.items()} for row in rows],
        description=f"Systems of {r.name} judged by {judged_by}",
    )
    create_markdown_artifact(key=f"{slug}-report", markdown=rep["markdown"], description=f"SPI experiment {r.name}")
    advance()
    summary = {
        "recipe": r.name,
        "digest": r.digest,
        "workdir": str(ctx.root),
        "tracking_uri": ctx.tracking_uri,
        "store_url": ctx.store_url,
        "experiment": ctx.experiment,
        "experiment_run_id": run_id,
        "registered_model": ctx.registered_model if r.iterations.count else None,
        "judge": judged_by,
        "reward_model": ctx.reward_name,
        "eval_set": references["path"],
        "systems": {row["system"]: {k: v for k, v in row.items() if k != "system"} for row in rows},
        "paired": rep["paired"],
        "promotions": promotions,
        "stages": dict(ctx.stages),
        "table": rep["table"],
        "report": str(rep["file"]),
    }
    summary_file = ctx.dir / f"summary-{r.digest[:12]}.json"
    summary_file.write_text(json.dumps(summary, indent=1))
    tracking.log_artifacts(ctx.tracking_uri, run_id, rep["file"], "report")
    tracking.log_artifacts(ctx.tracking_uri, run_id, summary_file, "report")
    for plot in rep["plots"]:
        tracking.log_artifacts(ctx.tracking_uri, run_id, plot, f"report/{rep['plot_dir'].name}")
    tracking.log_artifacts(ctx.tracking_uri, run_id, references["path"], "eval")
    log.info("comparison (judge %s):\n%s", judged_by, rep["table"])
    return summary


def run_plain(recipe: str, overrides: dict | None = None, workdir: str | None = None,
              allow_reward_judge: bool = False) -> dict:
    """The experiment's work (iterations, decoding, judging, report) as plain calls of the same stage
    functions: no Prefect engine, no MLflow, no store. ``spi bench flow`` measures the flow against it."""
    from evaluation.judges import check_independent, check_judge_available

    r = _load(recipe, overrides)
    ctx = Context(r, workdir, recipe, overrides, orchestrated=False)
    check_judge_available(r.evaluation.judge)
    check_independent(r.evaluation.judge, ctx.data["reward"], allow_reward_judge)
    iterations, value_dirs = run_iterations(ctx)
    ev = evaluate_systems(ctx, iterations, value_dirs, allow_reward_judge)
    rep = write_report(ctx, ev, iterations, "none (plain calls)", [])
    return {"recipe": r.name, "digest": r.digest, "systems": {row["system"]: row for row in ev.rows},
            "stages": dict(ctx.stages), "table": rep["table"], "report": str(rep["file"])}


def _round(v):
    return round(v, 4) if isinstance(v, float) and math.isfinite(v) else (None if isinstance(v, float) else v)


# --------------------------------------------------------------------------- evaluation, judge, promotion


def _evaluate_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    if p.get("outputs"):
        return f"evaluate-{Path(str(p['outputs'])).stem}"
    return f"evaluate-{p.get('registered_model') or Path(str(p.get('recipe', 'spi'))).stem + '-value'}-{p.get('alias')}"


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
    """Score the value model ``models:/NAME@ALIAS`` (decoded as spi-1 with it) or, with ``outputs``, an
    AlpacaEval-format file of outputs for the recipe's eval set. Logs a child run of the recipe's
    experiment and, for a registered model, ``eval_*`` tags on the version. Returns the metrics."""
    from mlflow_store import tracking
    from mlflow_store.registry import get_version, load_registered_value_model

    r = _load(recipe, overrides)
    ctx = Context(r, workdir)
    name = registered_model or ctx.registered_model
    eval_set, references = _prepare_eval(ctx)
    rows = json.loads(Path(references["path"]).read_text())
    if outputs:
        from evaluation.data import read_model_outputs

        given = read_model_outputs(outputs, rows)
        missing = [e["index"] for e in rows if e["index"] not in given]
        if missing:
            raise ValueError(
                f"{outputs}: no output for {len(missing)} eval instructions (indices {missing[:5]})"
            )
        label = f"outputs-{T.digest(outputs)[:8]}"
        path = ctx.dir / "eval" / f"{label}.json"
        T._write_json(
            path,
            {
                "system": label,
                "outputs": [given[e["index"]] for e in rows],
                "compute": {},
                "mean_reward": float("nan"),
            },
        )
        decoded = {
            "path": str(path),
            "digest": T.digest(path),
            "mean_reward": float("nan"),
            "compute": {},
            "seconds": 0.0,
        }
        system, version = label, None
    else:
        mv = get_version(ctx.tracking_uri, name, alias)
        version = str(mv.version)
        folder = load_registered_value_model(
            name, version, ctx.tracking_uri, ctx.dir / "registry" / f"{name}-v{version}"
        )
        system = "spi-1"
        decoded = _decode(ctx, system, [str(folder)], eval_set)
        label = f"{alias}-v{version}"
    judgement = _judge(ctx, label, references, decoded, allow_reward_judge)
    row = system_row(label, None, decoded, judgement)
    run_id = tracking.find_experiment_run(
        ctx.tracking_uri, ctx.experiment, r.digest
    ) or tracking.start_experiment_run(
        ctx.tracking_uri, ctx.experiment, ctx.data, r.digest, tracking.code_version()
    )
    metrics = {k: v for k, v in row.items() if k not in ("system", "iteration") and _finite(v) is not None}
    T.track_child_task(
        ctx.tracking_uri,
        run_id,
        f"evaluate-{label}",
        0,
        metrics,
        {"generations": decoded["path"], "judge_annotations": judgement["path"]},
        {"spi.judge": judgement["judge"], "spi.registered_model": name},
    )
    if version is not None:
        client = tracking.client_for(ctx.tracking_uri)
        for key in ("win_rate", "length_controlled_winrate", "mean_reward"):
            if _finite(row.get(key)) is not None:
                client.set_model_version_tag(name, version, f"eval_{key}", repr(float(row[key])))
    create_markdown_artifact(
        key=f"{_slug(r.name)}-evaluate-{_slug(alias if not outputs else 'outputs')}",
        markdown=f"# Evaluation of {label}\n\n```\n{format_table([row])}\n```\n",
    )
    return {"system": label, "registered_model": name if version else None, "version": version, **row}


@flow(name="fit-local-judge", persist_result=False)
def fit_local_judge(
    name: str = "minilm-bt",
    data_dir: str | None = None,
    n_instructions: int | None = 100,
    backbone: str = "minilm-l6",
    out: str | None = None,
    refit: bool = False,
) -> dict:
    """Train the local Bradley-Terry judge on AlpacaEval preference data (default: the folder of
    SPI_ALPACA_DATA) and save it where ``local:NAME`` finds it ($SPI_CACHE_DIR/judges/NAME)."""
    import shutil

    from evaluation.judging import ensure_local_judge, local_judge_folder

    folder = Path(out) if out else local_judge_folder(name)
    if refit and folder.exists():
        shutil.rmtree(folder)
    folder = ensure_local_judge(name, data_dir, n_instructions, backbone, out=folder)
    meta = json.loads((folder / "judge_head.json").read_text())
    get_run_logger().info("local judge %s at %s (%s pairs)", name, folder, meta["meta"].get("n_pairs"))
    return {"name": name, "folder": str(folder), "backbone": meta["backbone"], "meta": meta["meta"]}


@flow(name="promote-value-model", flow_run_name="promote-{registered_model}", persist_result=False)
def promote_value_model(
    registered_model: str,
    tracking_uri: str | None = None,
    workdir: str = "runs",
    margin: float = 0.0,
    metric: str = "win_rate",
    use_stages: bool = False,
) -> dict:
    """Move ``champion`` to the ``candidate`` version iff it beats the champion's ``metric`` by more
    than ``margin`` points. tracking_uri default: the SQLite file of ``workdir``."""
    from mlflow_store.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri(workdir)
    return T.promote_task(uri, registered_model, margin, metric, use_stages)
