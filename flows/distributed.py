"""Sharded SPI stages on a distributed Prefect task runner (Dask via prefect-dask).

    iteration_body         iteration k: rollouts and labels sharded by prompt, merged by prompt index,
                           then V_k fitted as ONE task (on a worker, which may hold several devices)
    decode_body            one system answers an eval set, sharded by prompt, merged by prompt index
    judge_body             one system's outputs judged, sharded by prompt; annotations merged by prompt
                           index, metrics computed once on all of them
    distributed_iteration, distributed_decode, distributed_run, spi_distributed
                           flows around the bodies (no baselines, judging or tracking)

``spi run RECIPE`` and the ``spi-experiment`` deployment use these bodies when the recipe says
``execution.task_runner: dask``: ``flows.experiment.spi_experiment`` then starts itself once more as
a subflow on the recipe's Dask task runner (:func:`with_runner`; one cluster for the whole experiment)
and calls :func:`iteration_body`, :func:`decode_body` and :func:`judge_body` where the thread runner
runs the unsharded stages; tracking, the store, the registry and the report are the same code.
A recipe goes distributed by its ``execution`` section only::

    execution: {task_runner: dask, workers: 2, shard_prompts: 64}             # LocalCluster of 2 workers
    execution: {task_runner: dask, dask_address: "tcp://10.0.0.5:8786"}      # an existing scheduler
    execution: {task_runner: thread, workers: 1}                              # in-process (default)

Every shard writes its own file under ``<workdir>/<recipe>/.../shards/`` (atomic write, ``.key``
sidecar, skipped when done), so a shard lost with a worker is recomputed by Dask on another worker (or
by a rerun of the flow) and a repeated shard rewrites identical rows. The merge (``spi.sharding``)
refuses gaps and conflicting duplicates. Judge shards read the SQLite judge cache and never write it;
the flow process writes the merged judgements (one writer). Workers must see the work directory at the
same path (a shared filesystem) and reach the Prefect API (``PREFECT_API_URL``). See docs/distributed.md.

Benchmark: ``python -m flows.distributed bench --prompts 16 --workers 1 2``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import lru_cache
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import tasks as T
from spi import pipeline, sharding
from spi.config import ExecutionConfig, Recipe, digest_of, load_recipe, parse_recipe

SHARD_ROUNDS = 2  # a shard whose task failed is submitted once more before the merge names it missing


# --------------------------------------------------------------------------- task runner from the recipe


def local_cluster_kwargs(workers: int) -> dict:
    """A LocalCluster bound to loopback: one single-threaded worker process per slot, no dashboards."""
    return {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "worker_dashboard_address": None,
        "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    }


def task_runner_for(execution: ExecutionConfig):
    """The Prefect task runner named by a recipe's execution section."""
    if execution.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=execution.workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "execution.task_runner 'dask' needs prefect-dask: pip install prefect-dask==0.3.7"
        ) from err
    if execution.dask_address:
        return DaskTaskRunner(address=execution.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(execution.workers)
    )


# --------------------------------------------------------------------------- shard tasks (run on workers)


def _recipe(data: dict) -> Recipe:
    r = parse_recipe(data, source="shard recipe")
    if r.execution.threads:
        import torch

        torch.set_num_threads(r.execution.threads)
    return r


@task(name="rollout-shard", cache_policy=NO_CACHE, task_run_name="rollouts-iter{iteration}-{name}")
def rollout_shard_task(
    recipe: dict, iteration: int, value_dirs: list[str], name: str, indices: list[int], out: str, key: str
) -> str:
    r = _recipe(recipe)
    return str(sharding.rollout_shard(r, iteration, [Path(d) for d in value_dirs], indices, Path(out), key))


@task(name="label-shard", cache_policy=NO_CACHE, task_run_name="labels-iter{iteration}-{name}")
def label_shard_task(recipe: dict, iteration: int, name: str, rollouts: str, out: str) -> str:
    return str(sharding.label_shard(_recipe(recipe), Path(rollouts), Path(out)))


@task(name="decode-shard", cache_policy=NO_CACHE, task_run_name="decode-{system}-{name}")
def decode_shard_task(
    recipe: dict,
    system: str,
    value_dirs: list[str],
    eval_set: str,
    name: str,
    indices: list[int],
    out: str,
    key: str,
) -> str:
    r = _recipe(recipe)
    rows = json.loads(Path(eval_set).read_text())
    w2s = None
    if system == "weak-to-strong":
        from spi.models import CausalLM

        w2s = (
            CausalLM.load(r.baselines.weak_to_strong_tuned),
            CausalLM.load(r.baselines.weak_to_strong_untuned),
        )
    return str(
        sharding.decode_shard(
            r,
            system,
            [Path(d) for d in value_dirs],
            [e["instruction"] for e in rows],
            indices,
            Path(out),
            key,
            [e.get("dataset") for e in rows],
            w2s,
        )
    )


@lru_cache(maxsize=2)
def _judge_model(spec: str, reward: str):
    """The judge, loaded once per worker process (``reward``: the reward section as JSON)."""
    from evaluation.judges import resolve_judge

    return resolve_judge(spec, json.loads(reward))


@task(name="judge-shard", cache_policy=NO_CACHE, task_run_name="judge-{system}-{name}")
def judge_shard_task(
    system: str,
    judge: str,
    reward: dict,
    references: str,
    outputs: str,
    name: str,
    indices: list[int],
    out: str,
    key: str,
    cache: str,
) -> str:
    """The annotations of prompts ``indices`` (``flows.judging.judge_rows``), one JSONL row per prompt
    with its prompt_index and the judge's identity. Reads the SQLite judge cache, never writes it."""
    from evaluation.judging import ShardJudgementCache, judge_rows

    out_path = Path(out)
    if not pipeline.is_done(out_path, key):
        rows = json.loads(Path(references).read_text())
        answers = json.loads(Path(outputs).read_text())["outputs"]
        model = _judge_model(judge, json.dumps(reward, sort_keys=True))
        annotations = judge_rows(
            model, [rows[i] for i in indices], [answers[i] for i in indices], ShardJudgementCache(cache)
        )
        sharding.write_jsonl(
            out_path,
            [
                {sharding.KEY: i, "judge": model.identity, **a}
                for i, a in zip(indices, annotations, strict=True)
            ],
        )
        pipeline._mark_done(out_path, key)
    return out


def run_shards(submit, shards: list[sharding.Shard], what: str) -> dict[int, str]:
    """Submit one task per shard (``submit(shard) -> future``), wait for all, resubmit the failed ones
    (up to ``SHARD_ROUNDS`` rounds); shard number -> output path of those that finished."""
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
                log.warning(
                    "%s %s failed in round %d: %s", what, s.name, round_no, f"{type(err).__name__}: {err}"
                )
                failed.append(s)
        if not failed:
            break
        todo = failed
    return done


# --------------------------------------------------------------------------- stage bodies (in the flow)


class Layout:
    """Where a recipe's sharded outputs live: the same folders as flows.experiment, a shards/ subfolder.
    The stage bodies below take a Layout or a ``flows.experiment.Context`` (it has these attributes)."""

    def __init__(self, recipe: Recipe, workdir: str | None, store_url: str | None = None):
        self.recipe, self.store_url = recipe, store_url
        # the same run key and reward name as flows.experiment.Context, for the store's natural keys
        self.run_key = f"{recipe.name}:{recipe.digest}"
        self.reward_name = f"{recipe.reward.kind}:{recipe.reward.model}:{recipe.section_digest('reward')[:8]}"
        self.data = recipe.model_dump(mode="json")
        self.root = Path(workdir or recipe.execution.workdir).expanduser().resolve()
        self.dir = self.root / recipe.name
        self.results = self.root / ".prefect-results"
        self.judge_cache = str(self.root / "judgements.sqlite")
        self.stages: dict[str, str] = {}  # stage label -> computed | reused | cached, as Context.stages


def _stage(stage: str, out: Path, key: str, seconds: float, computed: bool, **extra) -> dict:
    return {
        "stage": stage,
        "path": str(out),
        "digest": T.digest(out),
        "key": key,
        "seconds": seconds,
        "computed": computed,
        **extra,
    }


def _record(lay: Layout, label: str, result: dict, cached: bool = False) -> dict:
    """Note the stage's state under the label flows.experiment uses (the run summary counts them)."""
    lay.stages.setdefault(label, "cached" if cached else ("computed" if result["computed"] else "reused"))
    return result


def _merged_compute(shard_files) -> dict:
    """The compute records written beside each shard's output, added up."""
    return sharding.merge_compute(
        json.loads(Path(p).with_suffix(".compute.json").read_text()) for p in shard_files
    )


def shard_and_merge(base: str, shards, n: int, shard_prompts: int, what: str, submit, out_for, merge):
    """Run ``submit(shard, key)`` for every shard (key: ``base`` and the shard's prompt indices), then,
    unless already done, ``merge(shard paths, out)`` into ``out_for(key)`` (key: ``base`` and the split)
    and mark it done. Returns (out, key, computed, {shard number: path})."""
    paths = run_shards(lambda s: submit(s, digest_of([base, s.indices])), shards, what)
    key = digest_of([base, n, shard_prompts])
    out = out_for(key)
    computed = not pipeline.is_done(out, key)
    if computed:
        merge([Path(paths[number]) for number in sorted(paths)], out)
        pipeline._mark_done(out, key)
    return out, key, computed, paths


def sharded_rollouts(lay: Layout, k: int, value_dirs: list[str]) -> dict:
    r, t0 = lay.recipe, time.perf_counter()
    n = r.iterations.prompts_per_iteration
    shards = sharding.split(n, r.execution.shard_prompts)
    base = digest_of(
        [
            T.code_version(),
            sharding.SHARD_VERSION,
            "rollouts",
            r.section_digest("policy", "sampling", "search", "prompts", "iterations", "reward"),
            r.seed,
            k,
            [T.digest(d) for d in value_dirs],
        ]
    )
    folder = lay.dir / f"iteration-{k}" / "shards"

    def submit(s: sharding.Shard, key: str):
        return rollout_shard_task.submit(
            recipe=lay.data,
            iteration=k,
            value_dirs=value_dirs,
            name=s.name,
            indices=s.indices,
            out=str(folder / f"rollouts-{s.name}-{key}.jsonl"),
            key=key,
        )

    def merge(files: list[Path], out: Path):
        sharding.merge_jsonl(files, n, out, f"iteration {k} rollouts")
        pipeline._write_atomic(out.with_suffix(".compute.json"), json.dumps(_merged_compute(files), indent=2))

    out, key, computed, paths = shard_and_merge(
        base, shards, n, r.execution.shard_prompts, f"iteration {k} rollouts", submit,
        lambda key: lay.dir / f"iteration-{k}" / f"rollouts-sharded-{key}.jsonl", merge,
    )
    compute = json.loads(out.with_suffix(".compute.json").read_text())
    return _stage(
        "rollouts",
        out,
        key,
        time.perf_counter() - t0,
        computed,
        n_prompts=n,
        shards=len(shards),
        compute=compute,
        shard_paths=[paths[s] for s in sorted(paths)],
    )


def sharded_labels(lay: Layout, k: int, rollouts: dict) -> dict:
    r, t0 = lay.recipe, time.perf_counter()
    n = rollouts["n_prompts"]
    shards = sharding.split(n, r.execution.shard_prompts)
    by_number = dict(zip(sorted(s.number for s in shards), rollouts["shard_paths"], strict=True))
    folder = lay.dir / f"iteration-{k}" / "shards"

    def submit(s: sharding.Shard):
        src = Path(by_number[s.number])
        return label_shard_task.submit(
            recipe=lay.data,
            iteration=k,
            name=s.name,
            rollouts=str(src),
            out=str(folder / src.name.replace("rollouts-", "labels-", 1)),
        )

    leaves = r.search.width * r.search.successors
    if (r.execution.shard_prompts * leaves) % r.reward.batch_size:
        get_run_logger().warning(
            "labels: a shard of %d prompts has %d leaves, not a multiple of reward.batch_size %d: the reward "
            "model pads other batches than the unsharded stage, so rewards may differ from it in the last "
            "float digits (shards are still identical across worker counts)",
            r.execution.shard_prompts,
            r.execution.shard_prompts * leaves,
            r.reward.batch_size,
        )
    paths = run_shards(submit, shards, f"iteration {k} labels")
    key = T.stage_key("labels-sharded", r.section_digest("reward"), rollouts["digest"])
    out = lay.dir / f"iteration-{k}" / f"labels-sharded-{key}.jsonl"
    computed = not pipeline.is_done(out, key)
    if computed:
        sharding.merge_jsonl([Path(p) for p in paths.values()], n, out, f"iteration {k} labels")
        pipeline._mark_done(out, key)
    stats = T.reward_stats(pipeline.read_jsonl(out))
    return _stage("labels", out, key, time.perf_counter() - t0, computed, stats=stats)


def iteration_body(lay: Layout, k: int, value_dirs: list[str]) -> dict:
    """Sharded rollouts -> sharded labels -> V_k fitted by ONE task (flows.tasks.value_fit_task)."""
    r, log = lay.recipe, get_run_logger()
    if len(value_dirs) != k - 1:
        raise ValueError(
            f"iteration {k} needs the {k - 1} value models of the earlier iterations, got {len(value_dirs)}"
        )
    rollouts = _record(lay, f"iteration-{k}/rollouts", sharded_rollouts(lay, k, value_dirs))
    log.info("iteration %d: %d rollout rows from %d shards", k, rollouts["n_prompts"], rollouts["shards"])
    labels = _record(lay, f"iteration-{k}/labels", sharded_labels(lay, k, rollouts))
    key = T.stage_key(
        "value", r.section_digest("policy", "value"), r.seed, k, rollouts["digest"], labels["digest"]
    )
    fit = T.value_fit_task.with_options(result_storage=lay.results).submit(
        recipe=lay.data,
        iteration=k,
        rollouts=rollouts["path"],
        labels=labels["path"],
        out=str(lay.dir / f"iteration-{k}" / f"value-{key}"),
        key=key,
    )
    value = _record(lay, f"iteration-{k}/value", fit.result(), cached=fit.state.name == "Cached")
    return {
        "iteration": k,
        "rollouts": rollouts,
        "labels": labels,
        "value": value,
        "stages": dict(lay.stages),
    }


def decode_body(lay: Layout, system: str, value_dirs: list[str], eval_set: str) -> dict:
    r, t0 = lay.recipe, time.perf_counter()
    n = len(json.loads(Path(eval_set).read_text()))
    shards = sharding.split(n, r.execution.shard_prompts)
    base = digest_of(
        [
            T.code_version(),
            sharding.SHARD_VERSION,
            "decode",
            system,
            r.section_digest("policy", "sampling", "search", "baselines", "iterations", "reward"),
            r.seed,
            T.digest(eval_set),
            [T.digest(d) for d in value_dirs],
        ]
    )
    folder = lay.dir / "eval" / "shards"

    def submit(s: sharding.Shard, key: str):
        return decode_shard_task.submit(
            recipe=lay.data,
            system=system,
            value_dirs=value_dirs,
            eval_set=eval_set,
            name=s.name,
            indices=s.indices,
            out=str(folder / f"{system}-{s.name}-{key}.jsonl"),
            key=key,
        )

    def merge(files: list[Path], out: Path):
        rows = sharding.merge_rows((pipeline.read_jsonl(p) for p in files), n, f"decode {system}")
        payload = pipeline.decode_payload(system, rows, _merged_compute(files))
        pipeline._write_atomic(out, json.dumps(payload, indent=2))

    out, key, computed, _ = shard_and_merge(
        base, shards, n, r.execution.shard_prompts, f"decode {system}", submit,
        lambda key: lay.dir / "eval" / f"{system}-sharded-{key}.json", merge,
    )
    data = json.loads(out.read_text())
    result = _stage(
        "decode",
        out,
        key,
        time.perf_counter() - t0,
        computed,
        system=system,
        shards=len(shards),
        mean_reward=data["mean_reward"],
        compute=data["compute"],
    )
    return _record(lay, f"eval/decode-{system}", result)


def judge_body(
    lay: Layout, system: str, references: str, outputs: str, allow_reward_judge: bool = False
) -> dict:
    """``system``'s outputs (a decode file) judged against ``references`` (eval rows with
    'reference_output') by the recipe's judge, sharded by prompt. The annotations are merged by prompt
    index and the metrics computed once on all of them (``flows.judging.judge_payload``, as the unsharded
    judge stage does, so the file is the same); this process alone writes the SQLite judge cache."""
    from evaluation.judges import DEFAULT_LOCAL_JUDGE, check_independent, judge_fingerprint, split_spec
    from evaluation.judging import ensure_local_judge, judge_payload, store_judgements

    r, t0 = lay.recipe, time.perf_counter()
    spec, reward = r.evaluation.judge, lay.data["reward"]
    check_independent(spec, reward, allow_reward_judge)
    name, arg = split_spec(spec)
    if name == "local":  # trained here once if absent, not by every shard at the same time
        ensure_local_judge(arg or DEFAULT_LOCAL_JUDGE)
    n = len(json.loads(Path(references).read_text()))
    shards = sharding.split(n, r.execution.shard_prompts)
    base = digest_of(
        [
            T.code_version(),
            sharding.SHARD_VERSION,
            "judge",
            system,
            judge_fingerprint(spec, reward),
            T.digest(references),
            T.digest(outputs),
            allow_reward_judge,
        ]
    )
    folder = lay.dir / "eval" / "shards"

    def submit(s: sharding.Shard, key: str):
        return judge_shard_task.submit(
            system=system,
            judge=spec,
            reward=reward,
            references=references,
            outputs=outputs,
            name=s.name,
            indices=s.indices,
            out=str(folder / f"judge-{system}-{s.name}-{key}.jsonl"),
            key=key,
            cache=lay.judge_cache,
        )

    def merge(files: list[Path], out: Path):
        rows = sharding.merge_rows((pipeline.read_jsonl(p) for p in files), n, f"judge {system}")
        identities = sorted({row["judge"] for row in rows})
        if len(identities) != 1:
            raise sharding.MergeError(f"judge {system}: shards were judged by different judges {identities}")
        annotations = [{k: v for k, v in row.items() if k not in (sharding.KEY, "judge")} for row in rows]
        store_judgements(lay.judge_cache, identities[0], annotations)
        payload = judge_payload(system, identities[0], spec, reward, annotations)
        pipeline._write_atomic(out, json.dumps(payload, indent=1))

    out, key, computed, _ = shard_and_merge(
        base, shards, n, r.execution.shard_prompts, f"judge {system}", submit,
        lambda key: lay.dir / "eval" / f"judge-{system}-sharded-{key}.json", merge,
    )
    data = json.loads(out.read_text())
    T.log_win_rate(system, data["metrics"])
    result = _stage(
        "judge",
        out,
        key,
        time.perf_counter() - t0,
        computed,
        system=system,
        shards=len(shards),
        judge=data["judge"],
        metrics=data["metrics"],
    )
    return _record(lay, f"eval/judge-{system}", result)


# --------------------------------------------------------------------------- flows


@flow(name="spi-distributed-iteration", persist_result=False)
def distributed_iteration(
    recipe: str = "smoke",
    overrides: dict | None = None,
    iteration: int = 1,
    value_dirs: list[str] | None = None,
    workdir: str | None = None,
) -> dict:
    """Iteration k with rollouts and labels sharded by prompt on the recipe's task runner."""
    return iteration_body(
        Layout(load_recipe(recipe, overrides or None), workdir), iteration, list(value_dirs or [])
    )


@flow(name="spi-distributed-decode", persist_result=False)
def distributed_decode(
    recipe: str = "smoke",
    overrides: dict | None = None,
    system: str = "base-sampled",
    value_dirs: list[str] | None = None,
    eval_set: str = "",
    workdir: str | None = None,
) -> dict:
    """One system answers ``eval_set`` (JSON rows with 'instruction', as flows.tasks.eval_set_task writes)."""
    return decode_body(
        Layout(load_recipe(recipe, overrides or None), workdir), system, list(value_dirs or []), eval_set
    )


@flow(name="spi-distributed-run", persist_result=False)
def distributed_run(
    recipe: str = "smoke",
    overrides: dict | None = None,
    eval_set: str = "",
    systems: list[str] | None = None,
    workdir: str | None = None,
    store_url: str | None = None,
) -> dict:
    """K sharded iterations, then each system (default spi-1..spi-K) decodes ``eval_set``, sharded.
    ``store_url``: also insert each iteration's merged rollouts and rewards into the SQL store."""
    lay = Layout(load_recipe(recipe, overrides or None), workdir, store_url)
    r, value_dirs, iterations = lay.recipe, [], []
    for k in range(1, r.iterations.count + 1):
        it = iteration_body(lay, k, list(value_dirs))
        if store_url:  # rows keyed by (run, system, iteration, prompt, row): a repeated insert adds nothing
            T.store_rollouts_task(
                store_url, lay.run_key, k, it["rollouts"]["path"], it["labels"]["path"], lay.reward_name
            )
        iterations.append(it)
        value_dirs.append(it["value"]["path"])
    decoded = {}
    for system in systems or [f"spi-{k}" for k in range(1, r.iterations.count + 1)]:
        k = int(system.split("-")[1]) if system.startswith("spi-") else (1 if system == "blockwise-cd" else 0)
        decoded[system] = decode_body(lay, system, value_dirs[:k], eval_set)
    return {"iterations": iterations, "decoded": decoded}


@flow(name="spi-distributed", persist_result=False)
def spi_distributed(
    recipe: str = "smoke",
    overrides: dict | None = None,
    eval_set: str = "",
    systems: list[str] | None = None,
    workdir: str | None = None,
    store_url: str | None = None,
) -> dict:
    """Deployable entry point: runs :func:`distributed_run` as a subflow on the task runner that the
    recipe's execution section names (a deployment cannot pick its task runner from a parameter)."""
    return with_runner(distributed_run, recipe, overrides)(
        recipe=recipe,
        overrides=overrides,
        eval_set=eval_set,
        systems=systems,
        workdir=workdir,
        store_url=store_url,
    )


def is_sharded(execution: ExecutionConfig) -> bool:
    """Whether a recipe's stages run sharded by prompt (flows.experiment asks this)."""
    return execution.task_runner == "dask"


def on_cluster() -> bool:
    """Whether the running flow submits its tasks to a Dask cluster (a flow started by ``spi run``, a
    deployment or plain Python runs on Prefect's default thread pool instead)."""
    from prefect.context import FlowRunContext

    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:  # pragma: no cover - depends on the install
        return False
    ctx = FlowRunContext.get()
    return ctx is not None and isinstance(ctx.task_runner, DaskTaskRunner)


def with_runner(flow_obj, recipe: str, overrides: dict | None = None):
    """``flow_obj`` on the task runner the recipe's execution section names (call it with the flow's
    parameters): ``with_runner(distributed_run, "r.yaml")(recipe="r.yaml", eval_set=...)``."""
    r = load_recipe(recipe, overrides or None)
    return flow_obj.with_options(task_runner=task_runner_for(r.execution))


# --------------------------------------------------------------------------- benchmark


def write_eval_set(path: Path, instructions: list[str]) -> str:
    rows = [{"index": i, "instruction": x, "dataset": "bench"} for i, x in enumerate(instructions)]
    pipeline._write_atomic(Path(path), json.dumps(rows))
    return str(path)


def bench(
    recipe: str = "tests/flows/tiny.yaml",
    prompts: int = 16,
    workers: tuple[int, ...] = (1, 2),
    shard_prompts: int = 2,
    max_new_tokens: int = 32,
    workdir: str | None = None,
) -> list[dict]:
    """Sharded iteration-1 rollouts (pi_0 sampling, W*K leaves per prompt) on a LocalCluster of each
    size in ``workers``, the same work each time, fresh files; throughput excludes cluster start-up
    and a warm-up shard per worker that loads the models. Returns one row per cluster size."""
    import tempfile

    from distributed import Client, LocalCluster

    rows = []
    root = Path(workdir or tempfile.mkdtemp(prefix="spi-bench-"))
    overrides = {
        "iterations": {"prompts_per_iteration": prompts},
        "sampling": {"max_new_tokens": max_new_tokens},
        "execution": {"task_runner": "dask", "shard_prompts": shard_prompts, "threads": 1},
    }
    for n in workers:
        t_start = time.perf_counter()
        with LocalCluster(**local_cluster_kwargs(n)) as cluster, Client(cluster) as client:
            startup = time.perf_counter() - t_start
            # warm-up: every worker loads the policy once (not part of the measured work)
            warm = {
                **overrides,
                "iterations": {"prompts_per_iteration": n},
                "execution": {
                    **overrides["execution"],
                    "shard_prompts": 1,
                    "dask_address": cluster.scheduler_address,
                },
            }
            wr = load_recipe(recipe, warm)
            client.run(_warm, wr.model_dump(mode="json"))
            over = {
                **overrides,
                "execution": {**overrides["execution"], "dask_address": cluster.scheduler_address},
            }
            r = load_recipe(recipe, over)
            t0 = time.perf_counter()
            out = distributed_iteration_rollouts.with_options(task_runner=task_runner_for(r.execution))(
                recipe=recipe, overrides=over, workdir=str(root / f"workers-{n}")
            )
            seconds = time.perf_counter() - t0
        rollouts = pipeline.read_jsonl(Path(out["path"]))
        tokens = sum(len(leaf["response_ids"]) for row in rollouts for leaf in row["leaves"])
        rows.append(
            {
                "workers": n,
                "prompts": len(rollouts),
                "leaves": sum(len(x["leaves"]) for x in rollouts),
                "tokens": tokens,
                "seconds": seconds,
                "startup_seconds": startup,
                "prompts_per_s": len(rollouts) / seconds,
                "tokens_per_s": tokens / seconds,
                "digest": out["digest"],
            }
        )
    return rows


def _warm(recipe: dict) -> None:
    r = _recipe(recipe)
    pipeline.load_policy(r)


@flow(name="spi-distributed-rollouts", persist_result=False)
def distributed_iteration_rollouts(
    recipe: str = "smoke",
    overrides: dict | None = None,
    iteration: int = 1,
    value_dirs: list[str] | None = None,
    workdir: str | None = None,
) -> dict:
    """Only the sharded rollouts of iteration k (the benchmark's work)."""
    return sharded_rollouts(
        Layout(load_recipe(recipe, overrides or None), workdir), iteration, list(value_dirs or [])
    )


def format_bench(rows: list[dict]) -> str:
    lines = [
        f"{'workers':>8}{'prompts':>9}{'tokens':>9}{'seconds':>10}{'prompts/s':>11}{'tokens/s':>10}{'speed-up':>10}"
        f"{'start-up s':>12}"
    ]
    for row in rows:
        lines.append(
            f"{row['workers']:>8}{row['prompts']:>9}{row['tokens']:>9}{row['seconds']:>10.2f}"
            f"{row['prompts_per_s']:>11.2f}{row['tokens_per_s']:>10.1f}"
            f"{rows[0]['seconds'] / row['seconds']:>9.2f}x{row['startup_seconds']:>12.1f}"
        )
    same = len({row["digest"] for row in rows}) == 1
    lines.append(f"merged rollouts identical across cluster sizes: {'yes' if same else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.distributed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="throughput of sharded rollouts with 1 and 2 (or more) local workers")
    b.add_argument("--recipe", default="tests/flows/tiny.yaml")
    b.add_argument("--prompts", type=int, default=16)
    b.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    b.add_argument("--shard-prompts", type=int, default=2)
    b.add_argument("--max-new-tokens", type=int, default=32)
    b.add_argument("--workdir")
    for name in ("iteration", "run"):
        p = sub.add_parser(name, help=f"distributed_{name} with the recipe's execution section")
        p.add_argument("recipe")
        p.add_argument("--workdir")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
        if name == "iteration":
            p.add_argument("--iteration", type=int, default=1)
            p.add_argument("--value-dir", action="append", default=[])
        else:
            p.add_argument("--eval-set", required=True, help="JSON rows with 'instruction'")
    args = parser.parse_args(argv)
    if args.command == "bench":
        rows = bench(
            args.recipe,
            args.prompts,
            tuple(args.workers),
            args.shard_prompts,
            args.max_new_tokens,
            args.workdir,
        )
        print(format_bench(rows))
        return 0
    from spi.config import parse_overrides

    overrides = parse_overrides(args.set) or None
    if args.command == "iteration":
        out = with_runner(distributed_iteration, args.recipe, overrides)(
            recipe=args.recipe,
            overrides=overrides,
            iteration=args.iteration,
            value_dirs=args.value_dir,
            workdir=args.workdir,
        )
    else:
        out = with_runner(distributed_run, args.recipe, overrides)(
            recipe=args.recipe, overrides=overrides, eval_set=args.eval_set, workdir=args.workdir
        )
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
