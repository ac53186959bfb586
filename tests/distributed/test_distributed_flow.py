"""Sharded rollouts, labels and guided decoding on a local Dask cluster give the unsharded outputs,
row for row, with two workers, with one, and when a worker is killed mid-run."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from spi.stagefiles import output_digest
from tests.distributed.conftest import OVERRIDES, TINY

pytest.importorskip("prefect_dask")


def run(workdir, eval_set, execution, store_url=None):
    """The one SPI loop with the sharded stage strategy, then spi-1 decodes ``eval_set``, sharded;
    ``store_url``: each iteration's merged rollouts and rewards also go into the SQL store."""
    from prefect import flow

    from flows import records
    from flows.context import RunContext
    from flows.sharded import with_runner
    from flows.stages import FlowStages
    from spi import loop
    from spi.config import load_recipe
    from spi.stagefiles import output_digest

    r = load_recipe(TINY, {**OVERRIDES, "execution": {**OVERRIDES["execution"], **execution}})

    @flow(persist_result=False)
    def sharded_run(workdir: str) -> dict:
        ctx = RunContext(r, workdir)
        stages = FlowStages(ctx)

        def store(it):  # rows keyed by (run, system, iteration, prompt, row): a repeated insert adds nothing
            if store_url:
                records.store_rollouts_task(store_url, ctx.run_key, it["iteration"], it["rollouts"]["path"],
                                            it["labels"]["path"], ctx.reward_name)

        iterations, value_dirs = loop.iterate(r, stages, store)
        decoded = stages.decode("spi-1", value_dirs[:1], {"path": eval_set, "digest": output_digest(eval_set)})
        return {"iterations": iterations, "decoded": {"spi-1": decoded}}

    return with_runner(sharded_run, r)(str(workdir))


def store_counts(url):
    from mlflow_store.store import Store

    with Store(url) as store:
        return {t: store.count(t) for t in ("prompts", "rollouts", "rewards")}


def assert_matches_reference(out, reference):
    it = out["iterations"][0]
    assert Path(it["rollouts"]["path"]).read_bytes() == reference["rollouts"].read_bytes()
    assert Path(it["labels"]["path"]).read_bytes() == reference["labels"].read_bytes()
    assert it["value"]["digest"] == output_digest(reference["value"])
    got = json.loads(Path(out["decoded"]["spi-1"]["path"]).read_text())
    want = json.loads(reference["decoded"].read_text())
    assert got["outputs"] == want["outputs"]
    assert (got["mean_reward"], got["boundaries"], got["beam_changes"]) == (
        want["mean_reward"],
        want["boundaries"],
        want["beam_changes"],
    )


def test_two_workers_one_worker_and_unsharded_give_the_same_rows(cluster2, eval_set, reference, tmp_path):
    cluster, _ = cluster2
    two = run(tmp_path / "two", eval_set, {"dask_address": cluster.scheduler_address})
    assert two["iterations"][0]["rollouts"]["shards"] == 4 and two["decoded"]["spi-1"]["shards"] == 4
    assert_matches_reference(two, reference)
    # one worker: a LocalCluster the task runner starts from the recipe's execution section alone
    one = run(tmp_path / "one", eval_set, {"workers": 1})
    assert_matches_reference(one, reference)


def test_killing_a_worker_mid_run_loses_nothing(cluster2, eval_set, reference, tmp_path):
    cluster, client = cluster2
    shards = tmp_path / "tiny" / "iteration-1" / "shards"
    killed = {}

    def kill_a_busy_worker_after_the_first_shard_file():
        deadline = time.time() + 240
        while not list(shards.glob("rollouts-*.jsonl")) and time.time() < deadline:
            time.sleep(0.02)
        busy = {a for a, keys in client.processing().items() if keys}
        nanny = next(
            (n for n in cluster.workers.values() if n.worker_address in busy),
            next(iter(cluster.workers.values())),
        )
        killed.update(
            address=nanny.worker_address,
            busy=sorted(busy),
            shard_files_before=len(list(shards.glob("rollouts-*.jsonl"))),
        )
        os.kill(nanny.process.process.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_busy_worker_after_the_first_shard_file, daemon=True)
    killer.start()
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    out = run(tmp_path, eval_set, {"dask_address": cluster.scheduler_address}, store_url)
    killer.join(5)
    assert killed, "the worker was not killed"
    assert killed["shard_files_before"] < 4, f"killed after all rollout shards were written: {killed}"
    assert_matches_reference(out, reference)
    assert store_counts(store_url) == {"prompts": 4, "rollouts": 16, "rewards": 16}

    # a lost shard file (and the merge) is recomputed on rerun, the rest skipped: same merged rows
    lost = sorted(shards.glob("rollouts-*.jsonl"))[1]
    lost.unlink()
    merged = Path(out["iterations"][0]["rollouts"]["path"])
    merged.unlink()
    again = run(tmp_path, eval_set, {"dask_address": cluster.scheduler_address}, store_url)
    assert lost.exists()
    assert_matches_reference(again, reference)
    assert store_counts(store_url) == {"prompts": 4, "rollouts": 16, "rewards": 16}  # stored twice, once each
