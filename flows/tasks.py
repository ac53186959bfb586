"""Prefect tasks of the compute stages: thin wrappers over spi.pipeline and the judging of outputs.

Tasks pass small things only: the recipe (parsed once per run), paths, keys and content digests (never
models or DataFrames).

Caching. The caller computes each stage's key from the table of stages (``spi.stages``: the recipe
fields it reads, its inputs' digests, the code version) and names the output file after the key
(``rollouts-<key>.jsonl``). The task's ``cache_key_fn`` is that key, results are persisted under the
work directory, so a rerun with the same settings gets ``Cached`` states and a changed setting
recomputes exactly the stages whose key it enters. Beneath Prefect, every spi stage also skips itself
when its output and ``.key`` sidecar match the same key (a kill between the write and Prefect's record
loses nothing). ``flows.context.RunContext.run_stage`` checks a cached result's output is still there
and unchanged: a deleted output is recomputed, a modified one is an error that names the file.

No retries on deterministic compute (flows.records retries the I/O).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from flows.context import StageError
from spi import pipeline
from spi.config import Recipe
from spi.stagefiles import output_digest, read_jsonl, write_json


def stage_cache_key(context: TaskRunContext, parameters: dict) -> str:
    """Prefect cache key of a stage task: the ``key`` the caller computed for it."""
    return f"{context.task.name}-{parameters['key']}"


def run_logger():
    try:
        return get_run_logger()
    except Exception:  # called outside a run (plain Python)
        return logging.getLogger("flows")


def stage_result(stage: str, out: Path, key: str, started: float, computed: bool, **extra) -> dict:
    """Result of a stage; the run that computed it is kept beside the output: its wall time and when it
    started and ended (epoch seconds; None for sidecars written before they were recorded)."""
    meta = Path(str(out) + ".stage.json")
    if computed or not meta.exists():
        seconds, ended = time.perf_counter() - started, time.time()
        meta.write_text(json.dumps({"stage": stage, "seconds": seconds, "key": key, "started_at": ended - seconds,
                                    "ended_at": ended}))
    ran = json.loads(meta.read_text())
    return {"stage": stage, "path": str(out), "digest": output_digest(out), "key": key, "seconds": ran["seconds"],
            "started_at": ran.get("started_at"), "ended_at": ran.get("ended_at"), "computed": computed, **extra}


def _check_jsonl(path: Path, what: str) -> list[dict]:
    try:
        return read_jsonl(path)
    except ValueError as err:
        raise StageError(f"{what} file is corrupt: {err}") from None


# --------------------------------------------------------------------------- SPI stages


@task(name="rollouts", cache_key_fn=stage_cache_key, task_run_name="rollouts-iter{iteration}")
def rollouts_task(recipe: Recipe, iteration: int, value_dirs: list[str], out: str, key: str) -> dict:
    """Iteration k's rollouts: pi_0 samples (k = 1) or CBS guided by V_1..V_{k-1}."""
    r, out, t0 = recipe, Path(out), time.perf_counter()
    computed = not out.exists()
    run_logger().info(
        "iteration %d: rollouts (%d prompts, %d leaves each) -> %s",
        iteration,
        r.iterations.prompts_per_iteration,
        r.search.width * r.search.successors,
        out.name,
    )
    pipeline.generate_rollouts(r, iteration, [Path(d) for d in value_dirs], out, progress=False, key=key)
    records = _check_jsonl(out, "rollouts")
    return stage_result("rollouts", out, key, t0, computed, n_prompts=len(records), compute=stage_compute(out))


def stage_compute(out: Path) -> dict:
    """The compute a stage wrote beside its output (``<out>.compute.json``), {} when it wrote none."""
    compute_file = Path(out).with_suffix(".compute.json")
    return json.loads(compute_file.read_text()) if compute_file.exists() else {}


@task(name="labels", cache_key_fn=stage_cache_key, task_run_name="labels-iter{iteration}")
def labels_task(recipe: Recipe, iteration: int, rollouts: str, out: str, key: str) -> dict:
    """Score every leaf with the reward model; summary statistics of the rewards."""
    r, out, t0 = recipe, Path(out), time.perf_counter()
    computed = not out.exists()
    _check_jsonl(Path(rollouts), "rollouts")
    run_logger().info(
        "iteration %d: labelling with %s:%s -> %s", iteration, r.reward.kind, r.reward.model, out.name
    )
    pipeline.label_rollouts(r, Path(rollouts), out, key=key)
    stats = reward_stats(_check_jsonl(out, "labels"))
    return stage_result("labels", out, key, t0, computed, stats=stats, compute=stage_compute(out))


def reward_stats(labels: list[dict]) -> dict:
    """Reward statistics of a labels file: over all leaves, and of the best leaf per prompt."""
    leaf = [x for row in labels for x in row["rewards"]]
    best = [row["rewards"][row["best"]] for row in labels]
    mean = sum(leaf) / len(leaf)
    return {
        "reward_mean": mean,
        "reward_std": (sum((x - mean) ** 2 for x in leaf) / len(leaf)) ** 0.5,
        "reward_best_mean": sum(best) / len(best),
        "reward_min": min(leaf),
        "reward_max": max(leaf),
    }


@task(name="value-fit", cache_key_fn=stage_cache_key, task_run_name="value-fit-iter{iteration}")
def value_fit_task(recipe: Recipe, iteration: int, rollouts: str, labels: str, out: str, key: str) -> dict:
    """Fit V_k afresh on the labelled rollouts; its fit report (loss, held-out explained variance)."""
    r, out, t0 = recipe, Path(out), time.perf_counter()
    computed = not out.exists()
    log = run_logger()
    how = "ridge, penalty cross-validated" if r.value.solver == "ridge" else f"{r.value.epochs} epochs"
    log.info("iteration %d: fitting V_%d (%s, %s) -> %s", iteration, iteration, r.value.kind, how, out.name)
    every = max(1, r.value.epochs // 5)

    def progress(epoch, epochs, loss):
        if epoch % every == 0 or epoch == epochs:
            log.info("iteration %d: value fit epoch %d/%d loss %.5f", iteration, epoch, epochs, loss)

    pipeline.fit_value_stage(r, iteration, Path(rollouts), Path(labels), out, progress=progress, key=key)
    report = json.loads((out / "value.json").read_text())["report"] or {}
    return stage_result("value", out, key, t0, computed, report=report)


@task(name="eval-set", cache_key_fn=stage_cache_key)
def eval_set_task(recipe: Recipe, out: str, key: str) -> dict:
    """The evaluation instructions (builtin set or a user file, first/stratified n) as JSON rows."""
    from evaluation.data import load_eval_set, subset

    r, out, t0 = recipe, Path(out), time.perf_counter()
    computed = not out.exists()
    ev = r.evaluation
    if ev.task == "ifeval":  # the prompts with their constraints; no references
        rows = [{"instruction": x["prompt"], "dataset": "ifeval", "reference_output": None, "key": str(x["key"]),
                 "instruction_id_list": x["instruction_id_list"], "kwargs": x["kwargs"]}
                for x in pipeline.eval_prompt_set(r).records]
    else:
        rows = subset(load_eval_set(ev.eval_set, require_references=False), ev.n_instructions,
                      stratify=ev.subset == "stratified", seed=r.seed)
    run_logger().info("evaluation set: %d instructions from %s", len(rows), ev.eval_set)
    write_json(out, rows)
    return stage_result(
        "eval-set",
        out,
        key,
        t0,
        computed,
        n=len(rows),
        has_references=all(e["reference_output"] for e in rows),
    )


@task(name="verify", cache_key_fn=stage_cache_key, task_run_name="verify-{system}")
def verify_task(system: str, eval_set: str, outputs: str, out: str, key: str) -> dict:
    """IFEval scoring of one system's outputs: every constraint checked (strict and loose), the four
    accuracies with bootstrap intervals and per-kind figures; one annotation per prompt."""
    from evaluation import ifeval
    from spi.verifiers import checker_version

    out, t0 = Path(out), time.perf_counter()
    computed = not out.exists()
    rows = json.loads(Path(eval_set).read_text())
    answers = json.loads(Path(outputs).read_text())["outputs"]
    records = [{"key": e["key"], "prompt": e["instruction"], "instruction_id_list": e["instruction_id_list"],
                "kwargs": e["kwargs"]} for e in rows]
    results = ifeval.score_records(records, {a["instruction"]: a["output"] for a in answers})
    metrics = ifeval.report(results)
    annotations = [{"index": i, "key": res.key, "instruction": a["instruction"], "output": a["output"],
                    "instruction_id_list": list(res.instruction_ids), "strict": list(res.strict),
                    "loose": list(res.loose)} for i, (res, a) in enumerate(zip(results, answers, strict=True))]
    judge = f"ifeval-verifiers:{checker_version()}"
    write_json(out, {"system": system, "judge": judge, "metrics": metrics, "annotations": annotations})
    run_logger().info("%s: prompt-level strict %.2f, instruction-level strict %.2f", system,
                      metrics["prompt_level_strict_acc"], metrics["inst_level_strict_acc"])
    return stage_result("verify", out, key, t0, computed, system=system, judge=judge, metrics=metrics)


@task(name="decode", cache_key_fn=stage_cache_key, task_run_name="decode-{system}")
def decode_task(recipe: Recipe, system: str, value_dirs: list[str], eval_set: str, out: str, key: str) -> dict:
    """Answer the evaluation instructions with one system; outputs in AlpacaEval format + rewards."""
    out, t0 = Path(out), time.perf_counter()
    computed = not out.exists()
    rows = json.loads(Path(eval_set).read_text())
    run_logger().info("decoding %d instructions with %s -> %s", len(rows), system, out.name)
    pipeline.decode_system(recipe, system, [Path(d) for d in value_dirs], [e["instruction"] for e in rows], out,
                           datasets=[e["dataset"] for e in rows], progress=False, key=key)
    return decode_result(system, out, key, t0, computed)


def decode_result(system: str, out: Path, key: str, started: float, computed: bool, **extra) -> dict:
    data = json.loads(Path(out).read_text())
    run_logger().info("%s: mean reward %.4f, %d policy tokens", system, data["mean_reward"],
                      data["compute"].get("policy_tokens", 0))
    return stage_result("decode", out, key, started, computed, system=system, mean_reward=data["mean_reward"],
                        compute=data["compute"], **extra)


@task(name="best-of-first", cache_key_fn=stage_cache_key, task_run_name="decode-best-of-n:{n}")
def best_of_first_task(source: str, n: int, out: str, key: str) -> dict:
    """Best-of-n read from the leaves of a wider Best-of-N decode (no model runs)."""
    out, t0 = Path(out), time.perf_counter()
    computed = not out.exists()
    data = pipeline.best_of_first(json.loads(Path(source).read_text()), n)
    write_json(out, data)
    return stage_result("decode", out, key, t0, computed, system=data["system"], mean_reward=data["mean_reward"],
                        compute=data["compute"])


@task(name="references", cache_key_fn=stage_cache_key)
def references_task(eval_set: str, generated: str, generator: str, out: str, key: str) -> dict:
    """The eval set with references written by ``generator`` (a system's decode output)."""
    from evaluation.data import attach_references

    out, t0 = Path(out), time.perf_counter()
    computed = not out.exists()
    rows = json.loads(Path(eval_set).read_text())
    answers = json.loads(Path(generated).read_text())["outputs"]
    by_instruction = {a["instruction"]: a["output"] for a in answers}
    rows = attach_references(rows, lambda xs: [by_instruction[x] for x in xs], generator)
    write_json(out, rows)
    return stage_result("references", out, key, t0, computed, generator=generator)


@task(name="judge", cache_key_fn=stage_cache_key, task_run_name="judge-{system}")
def judge_task(
    system: str,
    eval_set: str,
    outputs: str,
    judge: str,
    reward: dict,
    out: str,
    key: str,
    cache: str | None = None,
    allow_reward_judge: bool = False,
) -> dict:
    """AlpacaEval-style scoring of one system's outputs against the references with ``judge``."""
    from evaluation.judges import check_independent, resolve_judge
    from evaluation.judging import JudgementCache, judge_payload, judge_rows

    out, t0 = Path(out), time.perf_counter()
    computed = not out.exists()
    check_independent(judge, reward, allow_reward_judge)
    rows = json.loads(Path(eval_set).read_text())
    answers = json.loads(Path(outputs).read_text())["outputs"]
    judge_model = resolve_judge(judge, reward)
    run_logger().info("judging %s (%d outputs) with %s", system, len(answers), judge_model.identity)
    annotations = judge_rows(judge_model, rows, answers, JudgementCache(cache) if cache else None)
    payload = judge_payload(system, judge_model.identity, judge, reward, annotations)
    log_win_rate(system, payload["metrics"])
    write_json(out, payload)
    return stage_result(
        "judge", out, key, t0, computed, system=system, judge=judge_model.identity, metrics=payload["metrics"]
    )


def log_win_rate(system: str, m: dict) -> None:
    """One log line of a system's numbers; a metric not available shows "n/a (reason)"."""
    from evaluation.report import shown

    missing = m.get("not_available") or {}
    low, high = m.get("win_rate_ci_low"), m.get("win_rate_ci_high")
    ci = f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else shown(None, "", missing.get("win_rate_ci"))
    lc = shown(m.get("length_controlled_winrate"), ".2f", missing.get("length_controlled_winrate"))
    run_logger().info("%s: win rate %.2f %s, LC %s", system, m["win_rate"], ci, lc)
