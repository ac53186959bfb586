"""Prefect tasks: thin wrappers over the spi stages, evaluation scoring and mlflow_store.

Tasks pass small things only: paths, keys and content digests (never models or DataFrames).

Caching. The flow computes each stage's key with :func:`stage_key` from the stage's config digest
(the recipe sections it reads), its inputs' digests and the code version, and names the output file
after the key (``rollouts-<key>.jsonl``). The task's ``cache_key_fn`` is that key, results are
persisted under the work directory, so a rerun with the same settings gets ``Cached`` states and a
changed setting recomputes exactly the stages whose key it enters. Beneath Prefect, every spi stage
also skips itself when its output and ``.key`` sidecar match (a kill between the write and Prefect's
record loses nothing). :func:`run_stage` checks a cached result's output is still there and
unchanged: a deleted output is recomputed, a modified one is an error that names the file.

Retries only where a retry can help (tracking and store I/O); none for deterministic compute.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from spi import pipeline
from spi.config import Recipe, digest_of, parse_recipe

FLOWS_CODE_VERSION = "flows-1"  # bump when a task's outputs would change for the same inputs
IO_RETRIES = dict(retries=2, retry_delay_seconds=2)


class StageError(RuntimeError):
    """A stage output that cannot be used (changed on disk, corrupt); the message names the file."""


def code_version() -> str:
    return f"{pipeline.CODE_VERSION}+{FLOWS_CODE_VERSION}"


def stage_key(stage: str, *parts) -> str:
    """Key of a stage: digest of the code version, the stage name, its config digest and input digests."""
    return digest_of([code_version(), stage, *parts])


def stage_cache_key(context: TaskRunContext, parameters: dict) -> str:
    """Prefect cache key of a stage task: the ``key`` the flow computed for it."""
    return f"{context.task.name}-{parameters['key']}"


def digest(path: str | os.PathLike) -> str:
    return pipeline.file_digest(path)


def run_logger():
    try:
        return get_run_logger()
    except Exception:  # called outside a run (plain Python)
        return logging.getLogger("flows")


def _recipe(data: dict) -> Recipe:
    return parse_recipe(data, source="task recipe")


def _stage_result(stage: str, out: Path, key: str, started: float, computed: bool, **extra) -> dict:
    """Result of a stage task; the wall time of the run that computed it is kept beside the output."""
    meta = Path(str(out) + ".stage.json")
    if computed or not meta.exists():
        meta.write_text(json.dumps({"stage": stage, "seconds": time.perf_counter() - started, "key": key}))
    seconds = json.loads(meta.read_text())["seconds"]
    return {
        "stage": stage,
        "path": str(out),
        "digest": digest(out),
        "key": key,
        "seconds": seconds,
        "computed": computed,
        **extra,
    }


def _check_jsonl(path: Path, what: str) -> list[dict]:
    try:
        return pipeline.read_jsonl(path)
    except ValueError as err:
        raise StageError(f"{what} file is corrupt: {err}") from None


# --------------------------------------------------------------------------- SPI stages


@task(name="rollouts", cache_key_fn=stage_cache_key, task_run_name="rollouts-iter{iteration}")
def rollouts_task(recipe: dict, iteration: int, value_dirs: list[str], out: str, key: str) -> dict:
    """Iteration k's rollouts: pi_0 samples (k = 1) or CBS guided by V_1..V_{k-1}."""
    r, out, t0 = _recipe(recipe), Path(out), time.perf_counter()
    computed = not out.exists()
    run_logger().info(
        "iteration %d: rollouts (%d prompts, %d leaves each) -> %s",
        iteration,
        r.iterations.prompts_per_iteration,
        r.search.width * r.search.successors,
        out.name,
    )
    pipeline.generate_rollouts(r, iteration, [Path(d) for d in value_dirs], out, progress=False)
    records = _check_jsonl(out, "rollouts")
    compute_file = out.with_suffix(".compute.json")
    compute = json.loads(compute_file.read_text()) if compute_file.exists() else {}
    return _stage_result("rollouts", out, key, t0, computed, n_prompts=len(records), compute=compute)


@task(name="labels", cache_key_fn=stage_cache_key, task_run_name="labels-iter{iteration}")
def labels_task(recipe: dict, iteration: int, rollouts: str, out: str, key: str) -> dict:
    """Score every leaf with the reward model; summary statistics of the rewards."""
    r, out, t0 = _recipe(recipe), Path(out), time.perf_counter()
    computed = not out.exists()
    _check_jsonl(Path(rollouts), "rollouts")
    run_logger().info(
        "iteration %d: labelling with %s:%s -> %s", iteration, r.reward.kind, r.reward.model, out.name
    )
    pipeline.label_rollouts(r, Path(rollouts), out)
    stats = reward_stats(_check_jsonl(out, "labels"))
    return _stage_result("labels", out, key, t0, computed, stats=stats)


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
def value_fit_task(recipe: dict, iteration: int, rollouts: str, labels: str, out: str, key: str) -> dict:
    """Fit V_k afresh on the labelled rollouts; its fit report (loss, held-out explained variance)."""
    r, out, t0 = _recipe(recipe), Path(out), time.perf_counter()
    computed = not out.exists()
    log = run_logger()
    how = "ridge, penalty cross-validated" if r.value.solver == "ridge" else f"{r.value.epochs} epochs"
    log.info("iteration %d: fitting V_%d (%s, %s) -> %s", iteration, iteration, r.value.kind, how, out.name)
    every = max(1, r.value.epochs // 5)

    def progress(epoch, epochs, loss):
        if epoch % every == 0 or epoch == epochs:
            log.info("iteration %d: value fit epoch %d/%d loss %.5f", iteration, epoch, epochs, loss)

    pipeline.fit_value_stage(r, iteration, Path(rollouts), Path(labels), out, progress=progress)
    report = json.loads((out / "value.json").read_text())["report"] or {}
    return _stage_result("value", out, key, t0, computed, report=report)


@task(name="eval-set", cache_key_fn=stage_cache_key)
def eval_set_task(recipe: dict, out: str, key: str) -> dict:
    """The evaluation instructions (builtin set or a user file, first/stratified n) as JSON rows."""
    from evaluation.data import load_eval_set, subset

    r, out, t0 = _recipe(recipe), Path(out), time.perf_counter()
    computed = not out.exists()
    ev = r.evaluation
    rows = load_eval_set(ev.eval_set, require_references=False)
    rows = subset(rows, ev.n_instructions, stratify=ev.subset == "stratified", seed=r.seed)
    run_logger().info("evaluation set: %d instructions from %s", len(rows), ev.eval_set)
    _write_json(out, rows)
    return _stage_result(
        "eval-set",
        out,
        key,
        t0,
        computed,
        n=len(rows),
        has_references=all(e["reference_output"] for e in rows),
    )


@task(name="decode", cache_key_fn=stage_cache_key, task_run_name="decode-{system}")
def decode_task(recipe: dict, system: str, value_dirs: list[str], eval_set: str, out: str, key: str) -> dict:
    """Answer the evaluation instructions with one system; outputs in AlpacaEval format + rewards."""
    r, out, t0 = _recipe(recipe), Path(out), time.perf_counter()
    computed = not out.exists()
    rows = json.loads(Path(eval_set).read_text())
    w2s = None
    if system == "weak-to-strong":
        from spi.models import CausalLM

        b = r.baselines
        if not (b.weak_to_strong_tuned and b.weak_to_strong_untuned):
            raise ValueError(
                "weak-to-strong needs baselines.weak_to_strong_tuned and baselines.weak_to_strong_untuned"
            )
        w2s = (CausalLM.load(b.weak_to_strong_tuned), CausalLM.load(b.weak_to_strong_untuned))
    run_logger().info("decoding %d instructions with %s -> %s", len(rows), system, out.name)
    pipeline.decode_system(
        r,
        system,
        [Path(d) for d in value_dirs],
        [e["instruction"] for e in rows],
        out,
        datasets=[e["dataset"] for e in rows],
        w2s_models=w2s,
        progress=False,
    )
    data = json.loads(out.read_text())
    run_logger().info(
        "%s: mean reward %.4f, %d policy tokens",
        system,
        data["mean_reward"],
        data["compute"].get("policy_tokens", 0),
    )
    return _stage_result(
        "decode",
        out,
        key,
        t0,
        computed,
        system=system,
        mean_reward=data["mean_reward"],
        compute=data["compute"],
    )


@task(name="best-of-first", cache_key_fn=stage_cache_key, task_run_name="decode-best-of-n:{n}")
def best_of_first_task(source: str, n: int, out: str, key: str) -> dict:
    """Best-of-n read from the leaves of a wider Best-of-N decode (no model runs)."""
    out, t0 = Path(out), time.perf_counter()
    computed = not out.exists()
    data = pipeline.best_of_first(json.loads(Path(source).read_text()), n)
    _write_json(out, data)
    return _stage_result("decode", out, key, t0, computed, system=data["system"], mean_reward=data["mean_reward"],
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
    _write_json(out, rows)
    return _stage_result("references", out, key, t0, computed, generator=generator)


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
    _write_json(out, payload)
    return _stage_result(
        "judge", out, key, t0, computed, system=system, judge=judge_model.identity, metrics=payload["metrics"]
    )


def log_win_rate(system: str, m: dict) -> None:
    lc = m["length_controlled_winrate"]
    run_logger().info(
        "%s: win rate %.2f [%.2f, %.2f], LC %s",
        system,
        m["win_rate"],
        m.get("win_rate_ci_low", float("nan")),
        m.get("win_rate_ci_high", float("nan")),
        "n/a" if lc is None else f"{lc:.2f}",
    )


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- store (SQL) rows


@task(name="store-rollouts", **IO_RETRIES)
def store_rollouts_task(
    store_url: str, run_key: str, iteration: int, rollouts: str, labels: str, reward_model: str
) -> int:
    """Prompts, rollout leaves and their rewards of one iteration into the store (idempotent)."""
    from mlflow_store.store import Store, rollout_key, text_digest

    records, labels_ = pipeline.read_jsonl(Path(rollouts)), pipeline.read_jsonl(Path(labels))
    prompts, leaves, rewards = [], [], []
    for rec, lab in zip(records, labels_, strict=True):
        pkey = text_digest(rec["instruction"])
        prompts.append({"prompt_key": pkey, "text": rec["instruction"], "split": "train"})
        for i, (leaf, reward) in enumerate(zip(rec["leaves"], lab["rewards"], strict=True)):
            leaves.append(
                {
                    "run_key": run_key,
                    "system": "rollout",
                    "iteration": iteration,
                    "prompt_key": pkey,
                    "row_index": i,
                    "text": leaf["response"],
                    "n_tokens": len(leaf["response_ids"]),
                }
            )
            rewards.append(
                {
                    "reward_model": reward_model,
                    "reward": float(reward),
                    "rollout_key": rollout_key(run_key, "rollout", iteration, pkey, i),
                }
            )
    # the value fit's dataset: these labelled rollouts, named by the digests of both files
    dataset = {
        "digest": digest_of([digest(rollouts), digest(labels)]),
        "path": str(labels),
        "run_key": run_key,
        "iteration": iteration,
        "n_examples": len(leaves),
    }
    store = Store(store_url)
    try:
        n = store.add_prompts(prompts) + store.add_rollouts(leaves) + store.add_rewards(rewards)
        n += store.add_value_datasets([dataset])
    finally:
        store.close()
    run_logger().info("store: iteration %d, %d rollout leaves (%d new rows)", iteration, len(leaves), n)
    return n


@task(name="store-generations", **IO_RETRIES)
def store_generations_task(
    store_url: str,
    run_key: str,
    system: str,
    iteration: int,
    outputs: str,
    annotations: str,
    reward_model: str,
) -> int:
    """One system's evaluation outputs and their judgements into the store (idempotent)."""
    from mlflow_store.store import Store, text_digest

    data = json.loads(Path(outputs).read_text())
    judged = json.loads(Path(annotations).read_text())
    n = max(len(data["outputs"]), 1)
    c = data["compute"]
    seconds = sum(v for k, v in c.items() if k.startswith("seconds_"))
    generations = [
        {
            "run_key": run_key,
            "system": system,
            "iteration": iteration,
            "instruction_key": str(a["index"]),
            "instruction": o["instruction"],
            "output": o["output"],
            "reward": o.get("reward"),
            "reward_model": reward_model,
            "policy_tokens": c.get("policy_tokens", 0) // n,
            "value_tokens": c.get("value_tokens", 0) // n,
            "reward_tokens": c.get("reward_tokens", 0) // n,
            "seconds": seconds / n,
        }
        for o, a in zip(data["outputs"], judged["annotations"], strict=True)
    ]
    judgements = [
        {
            "judge": judged["judge"],
            "instruction_digest": text_digest(a["instruction"]),
            "output_1_digest": text_digest(a["reference"]),
            "output_2_digest": text_digest(a["output"]),
            "preference": a["preference"],
        }
        for a in judged["annotations"]
    ]
    store = Store(store_url)
    try:
        count = store.add_generations(generations) + store.add_judgements(judgements)
    finally:
        store.close()
    return count


# --------------------------------------------------------------------------- MLflow tracking


@task(name="track-run", **IO_RETRIES, task_run_name="track-{system}-{iteration}")
def track_child_task(
    tracking_uri: str,
    parent_run_id: str,
    system: str,
    iteration: int,
    metrics: dict,
    artifacts: dict,
    tags: dict | None = None,
    params: dict | None = None,
) -> str:
    """The child run of (system, iteration): metrics, tags, params and artifacts (file or folder)."""
    from mlflow_store import tracking

    run_id = tracking.find_or_create_child_run(tracking_uri, parent_run_id, system, iteration)
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    tracking.log_metrics(tracking_uri, run_id, numeric)
    if tags:
        tracking.set_tags(tracking_uri, run_id, tags)
    if params:
        tracking.log_params(tracking_uri, run_id, params)
    for artifact_path, local in artifacts.items():
        tracking.log_artifacts(tracking_uri, run_id, local, artifact_path)
    tracking.finish_run(tracking_uri, run_id)
    return run_id


@task(name="register-value-model", **IO_RETRIES)
def register_task(tracking_uri: str, name: str, run_id: str, folder: str, metrics: dict) -> str:
    """Register a value model folder as a new version of ``name`` with alias ``candidate``."""
    from mlflow_store.registry import register_value_model

    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    version = register_value_model(tracking_uri, name, run_id, folder, numeric)
    run_logger().info("registered %s version %s (alias candidate)", name, version)
    return version


@task(name="promote", **IO_RETRIES)
def promote_task(
    tracking_uri: str, name: str, margin: float, metric: str = "win_rate", use_stages: bool = False
) -> dict:
    """Move alias ``champion`` to ``candidate`` iff it beats the champion by more than ``margin``."""
    from dataclasses import asdict

    from mlflow_store.registry import promote

    decision = promote(tracking_uri, name, margin, metric=metric, use_stages=use_stages)
    run_logger().info("promotion of %s: %s", name, decision.reason)
    return asdict(decision)
