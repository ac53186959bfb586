"""Prefect tasks that record a run: rows in the SQL store, MLflow child runs, the model registry.

Retries here (tracking and store I/O can fail for a moment), of transient errors only: bad input fails
once, with its clear error. None on the compute stages (flows.tasks).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from flows.tasks import run_logger
from spi.config import digest_of
from spi.stagefiles import output_digest, read_jsonl


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry what may pass next time (a server or database away for a moment),
    never bad input: a missing model, version or alias (RegistryError, a LookupError), a bad value
    (ValueError), or what MLflow rejects as such."""
    from mlflow.exceptions import MlflowException

    err = state.data if isinstance(state.data, BaseException) else None
    if isinstance(err, (LookupError, ValueError, TypeError)):
        return False
    if isinstance(err, MlflowException):
        return err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS")
    return True


IO_RETRIES = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=transient)


# --------------------------------------------------------------------------- store (SQL) rows


@task(name="store-rollouts", **IO_RETRIES)
def store_rollouts_task(
    store_url: str, run_key: str, iteration: int, rollouts: str, labels: str, reward_model: str
) -> int:
    """Prompts, rollout leaves and their rewards of one iteration into the store (idempotent)."""
    from mlflow_store.store import Store, rollout_key, text_digest

    records, labels_ = read_jsonl(rollouts), read_jsonl(labels)
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
        "digest": digest_of([output_digest(rollouts), output_digest(labels)]),
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
            "w2s_tokens": c.get("w2s_tokens", 0) // n,
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
        if "preference" in a  # ifeval verdicts are not pairwise judgements
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
    not_available: dict | None = None,
    started_at: float | None = None,
    ended_at: float | None = None,
) -> str:
    """The child run of (system, iteration): metrics, tags, params (the system's settings) and artifacts
    (file or folder). A metric in ``not_available`` is no metric: its reason is the tag
    ``spi.not_available.<metric>``. The run starts at ``started_at`` and ends at ``ended_at`` (epoch
    seconds): when the stages it describes ran, not when it was logged."""
    from mlflow_store import tracking

    run_id = tracking.find_or_create_child_run(tracking_uri, parent_run_id, system, iteration, start_time=started_at)
    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and v is not None and k not in (not_available or {})}
    tracking.log_metrics(tracking_uri, run_id, numeric)
    reasons = {f"{tracking.TAG_NOT_AVAILABLE}{k}": why for k, why in (not_available or {}).items()}
    if tags or reasons:
        tracking.set_tags(tracking_uri, run_id, {**(tags or {}), **reasons})
    if params:
        tracking.log_params(tracking_uri, run_id, params)
    for artifact_path, local in artifacts.items():
        tracking.log_artifacts(tracking_uri, run_id, local, artifact_path)
    tracking.finish_run(tracking_uri, run_id, end_time=ended_at)
    return run_id


@task(name="register-guided-policy", **IO_RETRIES)
def register_task(tracking_uri: str, name: str, run_id: str, folder: str, metrics: dict) -> str:
    """Register a guided policy folder (spi.systems.write_guided_policy) as a new version of ``name``
    with alias ``candidate``: an MLflow Model with a pyfunc flavor (mlflow_store.policy_model)."""
    from mlflow_store.registry import register_guided_policy

    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    version = register_guided_policy(tracking_uri, name, run_id, folder, numeric,
                                     description="SPI guided policy: base model and value models with their betas")
    run_logger().info("registered %s version %s (alias candidate)", name, version)
    return version


@task(name="promote", **IO_RETRIES)
def promote_task(tracking_uri: str, name: str, margin: float, use_stages: bool = False) -> dict:
    """Move alias ``champion`` to ``candidate`` iff the lower bound of the paired bootstrap interval of
    their win-rate difference on the same instructions exceeds ``margin`` (>= 0; evaluation.metrics.
    promotion_gate). The decision, the interval and the instructions are tags on the version. Bad input
    (a missing model or version, a negative margin) fails once, unretried (``transient``)."""
    from dataclasses import asdict

    from evaluation.metrics import check_margin, promotion_gate
    from mlflow_store.registry import promote

    decision = promote(tracking_uri, name, check_margin(margin), promotion_gate, use_stages=use_stages)
    run_logger().info("promotion of %s: %s", name, decision.reason)
    return asdict(decision)
