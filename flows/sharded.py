"""Sharding, a strategy of a stage call: one Prefect task per shard of prompts on the flow's task runner.

A recipe with ``execution.task_runner: dask`` runs its experiment flow on a Dask cluster
(:func:`with_runner`; one cluster for the whole experiment) and ``flows.stages.FlowStages`` calls the
functions below for the rollouts, labels, decodes and judgements: each splits the prompts into shards
(``spi.sharding``), submits one task per shard, resubmits a failed shard once, merges the shard files
by prompt index into the stage's output, and returns the stage result the unsharded task returns.
Keys come from the table of stages with the layout ``shards-of-N``; a shard's key adds its indices::

    execution: {task_runner: dask, workers: 2, shard_prompts: 64}             # LocalCluster of 2 workers
    execution: {task_runner: dask, dask_address: "tcp://10.0.0.5:8786"}      # an existing scheduler

Every shard writes its own file under ``.../shards/`` (atomic write, ``.key`` sidecar, skipped when
done), so a shard lost with a worker is recomputed by Dask on another worker (or by a rerun) and a
repeated shard rewrites identical rows. The merge refuses gaps and conflicting duplicates. Judge shards
read the SQLite judge cache and never write it; the flow process writes the merged judgements (one
writer). Workers must see the work directory at the same path and reach the Prefect API. See
docs/distributed.md; ``spi bench shards`` measures the throughput.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import tasks as T
from flows.context import RunContext
from spi import pipeline, sharding
from spi.config import ExecutionConfig, Recipe
from spi.stagefiles import is_done, mark_done, read_jsonl, write_json, write_jsonl
from spi.stages import sharded_layout

SHARD_ROUNDS = 2  # a shard whose task failed is submitted once more before the merge names it missing


def local_cluster_kwargs(workers: int) -> dict:
    """A LocalCluster bound to loopback: one single-threaded worker process per slot, no dashboards."""
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
            "dashboard_address": None, "worker_dashboard_address": None,
            "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}


def task_runner_for(execution: ExecutionConfig):
    """The Prefect task runner named by a recipe's execution section."""
    if execution.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=execution.workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError("execution.task_runner 'dask' needs prefect-dask: pip install prefect-dask==0.3.7") from err
    if execution.dask_address:
        return DaskTaskRunner(address=execution.dask_address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(execution.workers))


def with_runner(flow_obj, recipe: Recipe):
    """``flow_obj`` on the task runner the recipe's execution section names."""
    return flow_obj.with_options(task_runner=task_runner_for(recipe.execution))


def on_cluster() -> bool:
    """Whether the running flow submits its tasks to a Dask cluster."""
    from prefect.context import FlowRunContext

    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:  # pragma: no cover - depends on the install
        return False
    ctx = FlowRunContext.get()
    return ctx is not None and isinstance(ctx.task_runner, DaskTaskRunner)


# --------------------------------------------------------------------------- shard tasks (run on workers)


def _on_worker(recipe: Recipe) -> Recipe:
    if recipe.execution.threads:
        import torch

        torch.set_num_threads(recipe.execution.threads)
    return recipe


@task(name="rollout-shard", cache_policy=NO_CACHE, task_run_name="rollouts-iter{iteration}-{name}")
def rollout_shard_task(recipe: Recipe, iteration: int, value_dirs: list[str], name: str, indices: list[int],
                       out: str, key: str) -> str:
    return str(sharding.rollout_shard(_on_worker(recipe), iteration, [Path(d) for d in value_dirs], indices,
                                      Path(out), key))


@task(name="label-shard", cache_policy=NO_CACHE, task_run_name="labels-iter{iteration}-{name}")
def label_shard_task(recipe: Recipe, iteration: int, name: str, rollouts: str, out: str, key: str) -> str:
    return str(sharding.label_shard(_on_worker(recipe), Path(rollouts), Path(out), key))


@task(name="decode-shard", cache_policy=NO_CACHE, task_run_name="decode-{system}-{name}")
def decode_shard_task(recipe: Recipe, system: str, value_dirs: list[str], eval_set: str, name: str,
                      indices: list[int], out: str, key: str) -> str:
    rows = json.loads(Path(eval_set).read_text())
    return str(sharding.decode_shard(_on_worker(recipe), system, [Path(d) for d in value_dirs],
                                     [e["instruction"] for e in rows], indices, Path(out), key,
                                     [e.get("dataset") for e in rows]))


@lru_cache(maxsize=2)
def _judge_model(spec: str, reward: str):
    """The judge, loaded once per worker process (``reward``: the reward section as JSON)."""
    from evaluation.judges import resolve_judge

    return resolve_judge(spec, json.loads(reward))


@task(name="judge-shard", cache_policy=NO_CACHE, task_run_name="judge-{system}-{name}")
def judge_shard_task(system: str, judge: str, reward: dict, references: str, outputs: str, name: str,
                     indices: list[int], out: str, key: str, cache: str) -> str:
    """The annotations of prompts ``indices``, one JSONL row per prompt with its prompt_index and the
    judge's identity. Reads the SQLite judge cache, never writes it."""
    from evaluation.judging import ShardJudgementCache, judge_rows

    if not is_done(out, key):
        rows = json.loads(Path(references).read_text())
        answers = json.loads(Path(outputs).read_text())["outputs"]
        model = _judge_model(judge, json.dumps(reward, sort_keys=True))
        annotations = judge_rows(model, [rows[i] for i in indices], [answers[i] for i in indices],
                                 ShardJudgementCache(cache))
        write_jsonl(out, [{sharding.KEY: i, "judge": model.identity, **a} for i, a in zip(indices, annotations, strict=True)])
        mark_done(out, key)
    return out


# --------------------------------------------------------------------------- a stage, sharded


def run_shards(submit, shards: list[sharding.Shard], what: str) -> dict[int, str]:
    """Submit one task per shard, wait for all, resubmit the failed ones (up to ``SHARD_ROUNDS``
    rounds); shard number -> output path of those that finished."""
    log = get_run_logger()
    done: dict[int, str] = {}
    todo = list(shards)
    for round_no in range(1, SHARD_ROUNDS + 1):
        futures = {s.number: submit(s) for s in todo}
        failed = []
        for s in todo:
            try:
                done[s.number] = futures[s.number].result()
            except Exception as err:  # noqa: BLE001 - a lost worker or a failed shard: retried, then named
                log.warning("%s %s failed in round %d: %s", what, s.name, round_no, f"{type(err).__name__}: {err}")
                failed.append(s)
        if not failed:
            break
        todo = failed
    return done


def _sharded(ctx: RunContext, label: str, stage: str, key: str, n: int, out: Path, submit, merge, **extra):
    """Run ``submit(shard, shard_key)`` for every shard, then (unless done) ``merge(paths, out)``;
    the stage's result, recorded under ``label``."""
    t0 = time.perf_counter()
    shards = sharding.split(n, ctx.recipe.execution.shard_prompts)
    paths = run_shards(lambda s: submit(s, sharding.shard_key(key, s)), shards, label)
    computed = not is_done(out, key)
    if computed:
        merge([Path(paths[number]) for number in sorted(paths)], out)
        mark_done(out, key)
    result = T.stage_result(stage, out, key, t0, computed, shards=len(shards), **extra)
    result["shard_paths"] = [paths[s] for s in sorted(paths)]
    return ctx.record(label, result)


def _merged_compute(shard_files) -> dict:
    return sharding.merge_compute(json.loads(Path(p).with_suffix(".compute.json").read_text()) for p in shard_files)


def layout(ctx: RunContext) -> str:
    return sharded_layout(ctx.recipe.execution.shard_prompts)


def rollouts(ctx: RunContext, k: int, value_dirs: list[str]) -> dict:
    r, folder = ctx.recipe, ctx.dir / f"iteration-{k}"
    n = r.iterations.prompts_per_iteration
    key = pipeline.rollouts_key(r, k, value_dirs, layout(ctx))

    def submit(s, shard_key):
        return rollout_shard_task.submit(recipe=r, iteration=k, value_dirs=value_dirs, name=s.name, indices=s.indices,
                                         out=str(folder / "shards" / f"rollouts-{s.name}-{shard_key}.jsonl"), key=shard_key)

    def merge(files, out):
        sharding.merge_jsonl(files, n, out, f"iteration {k} rollouts")
        write_json(out.with_suffix(".compute.json"), _merged_compute(files), indent=2)

    out = folder / f"rollouts-{key}.jsonl"
    result = _sharded(ctx, f"iteration-{k}/rollouts", "rollouts", key, n, out, submit, merge, n_prompts=n)
    result["compute"] = json.loads(out.with_suffix(".compute.json").read_text())
    return result


def labels(ctx: RunContext, k: int, rollouts: dict) -> dict:
    r, folder = ctx.recipe, ctx.dir / f"iteration-{k}"
    key = pipeline.labels_key(r, rollouts["path"], layout(ctx))
    by_number = dict(enumerate(rollouts["shard_paths"]))
    leaves = r.search.width * r.search.successors
    if (r.execution.shard_prompts * leaves) % r.reward.batch_size:
        get_run_logger().warning(
            "labels: a shard of %d prompts has %d leaves, not a multiple of reward.batch_size %d: the reward model "
            "pads other batches than the unsharded stage, so rewards may differ from it in the last float digits "
            "(shards are still identical across worker counts)", r.execution.shard_prompts,
            r.execution.shard_prompts * leaves, r.reward.batch_size)

    def submit(s, shard_key):
        src = Path(by_number[s.number])
        return label_shard_task.submit(recipe=r, iteration=k, name=s.name, rollouts=str(src),
                                       out=str(src.with_name(src.name.replace("rollouts-", "labels-", 1))), key=shard_key)

    def merge(files, out):
        sharding.merge_jsonl(files, rollouts["n_prompts"], out, f"iteration {k} labels")
        write_json(out.with_suffix(".compute.json"), _merged_compute(files), indent=2)

    out = folder / f"labels-{key}.jsonl"
    result = _sharded(ctx, f"iteration-{k}/labels", "labels", key, rollouts["n_prompts"], out, submit, merge)
    result["stats"] = T.reward_stats(read_jsonl(out))
    result["compute"] = T.stage_compute(out)
    return result


def decode(ctx: RunContext, system: str, value_dirs: list[str], eval_set: dict) -> dict:
    r, folder = ctx.recipe, ctx.dir / "eval"
    n = len(json.loads(Path(eval_set["path"]).read_text()))
    key = pipeline.decode_key(r, system, value_dirs, eval_set["digest"], layout(ctx))

    def submit(s, shard_key):
        return decode_shard_task.submit(recipe=r, system=system, value_dirs=value_dirs, eval_set=eval_set["path"],
                                        name=s.name, indices=s.indices,
                                        out=str(folder / "shards" / f"{system}-{s.name}-{shard_key}.jsonl"), key=shard_key)

    def merge(files, out):
        rows = sharding.merge_rows((read_jsonl(p) for p in files), n, f"decode {system}")
        write_json(out, pipeline.decode_payload(system, rows, _merged_compute(files)), indent=2)

    out = folder / f"{system.replace(':', '-')}-{key}.json"
    result = _sharded(ctx, f"eval/decode-{system}", "decode", key, n, out, submit, merge, system=system)
    data = json.loads(out.read_text())
    return {**result, "mean_reward": data["mean_reward"], "compute": data["compute"]}


def judge(ctx: RunContext, system: str, references: dict, outputs: dict, key: str, allow_reward_judge: bool) -> dict:
    """``system``'s outputs judged against the references by the recipe's judge, sharded by prompt; the
    annotations merged by prompt index, the metrics computed once on all of them (the unsharded judge
    stage's file); this process alone writes the SQLite judge cache."""
    from evaluation.judges import DEFAULT_LOCAL_JUDGE, check_independent, split_spec
    from evaluation.judging import ensure_local_judge, judge_payload, store_judgements

    spec, reward = ctx.recipe.evaluation.judge, ctx.data["reward"]
    check_independent(spec, reward, allow_reward_judge)
    name, arg = split_spec(spec)
    if name == "local":  # trained here once if absent, not by every shard at the same time
        ensure_local_judge(arg or DEFAULT_LOCAL_JUDGE)
    n = len(json.loads(Path(references["path"]).read_text()))
    folder = ctx.dir / "eval"

    def submit(s, shard_key):
        return judge_shard_task.submit(system=system, judge=spec, reward=reward, references=references["path"],
                                       outputs=outputs["path"], name=s.name, indices=s.indices,
                                       out=str(folder / "shards" / f"judge-{system}-{s.name}-{shard_key}.jsonl"),
                                       key=shard_key, cache=ctx.judge_cache)

    def merge(files, out):
        rows = sharding.merge_rows((read_jsonl(p) for p in files), n, f"judge {system}")
        identities = sorted({row["judge"] for row in rows})
        if len(identities) != 1:
            raise sharding.MergeError(f"judge {system}: shards were judged by different judges {identities}")
        annotations = [{k: v for k, v in row.items() if k not in (sharding.KEY, "judge")} for row in rows]
        store_judgements(ctx.judge_cache, identities[0], annotations)
        write_json(out, judge_payload(system, identities[0], spec, reward, annotations))

    out = folder / f"judge-{system}-{key}.json"
    result = _sharded(ctx, f"eval/judge-{system}", "judge", key, n, out, submit, merge, system=system)
    data = json.loads(out.read_text())
    T.log_win_rate(system, data["metrics"])
    return {**result, "judge": data["judge"], "metrics": data["metrics"]}
