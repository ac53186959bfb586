"""`spi run` on a Dask cluster: the recipe's execution section alone switches the experiment flow to
sharded rollouts, labels, decoding and judging, with the outputs of the thread runner; sharded judging
gives the unsharded judge stage's annotations and metrics, and only the flow writes the judge cache."""

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.distributed.conftest import TINY

pytest.importorskip("prefect_dask")

SETTINGS = [
    "iterations.count=1",
    "iterations.prompts_per_iteration=4",
    "reward.batch_size=2",  # a shard of 2 prompts scores the batches the unsharded stages score
    "evaluation.n_instructions=4",
    "baselines.names=[base-greedy]",
]


def spi_run(workdir: Path, template: Path, *settings: str) -> dict:
    from flows.commands import main

    workdir.mkdir()
    shutil.copyfile(template, workdir / "mlflow.db")
    argv = ["run", TINY, "--workdir", str(workdir), "--summary-json", str(workdir / "summary.json")]
    assert main(argv + [f"--set={s}" for s in [*SETTINGS, *settings]]) == 0
    return json.loads((workdir / "summary.json").read_text())


def judge_file(workdir: Path, system: str) -> dict:
    (path,) = [
        p for p in (workdir / "tiny" / "eval").glob(f"judge-{system}-*.json") if p.name.count(".") == 1
    ]
    return json.loads(path.read_text())


def test_spi_run_with_a_dask_execution_section_gives_the_thread_runners_outputs(
    cluster2, mlflow_db_template, tmp_path
):
    cluster, _ = cluster2
    thread = spi_run(tmp_path / "thread", mlflow_db_template)
    dask = spi_run(
        tmp_path / "dask",
        mlflow_db_template,
        "execution.task_runner=dask",
        f"execution.dask_address={cluster.scheduler_address}",
        "execution.shard_prompts=2",
    )
    assert set(dask["systems"]) == set(thread["systems"]) >= {"base-greedy", "spi-1"}
    for system in thread["systems"]:
        assert dask["systems"][system] == thread["systems"][system], system
        # outputs, references, preferences and metrics: the same judge file
        assert judge_file(tmp_path / "dask", system) == judge_file(tmp_path / "thread", system)
    assert set(dask["stages"]) == set(thread["stages"])
    assert set(dask["stages"].values()) == {"computed"}
    shards = tmp_path / "dask" / "tiny"
    assert len(list(shards.glob("iteration-1/shards/rollouts-shard-*.jsonl"))) == 2
    assert len(list(shards.glob("eval/shards/spi-1-shard-*.jsonl"))) == 2
    assert len(list(shards.glob("eval/shards/judge-spi-1-shard-*.jsonl"))) == 2


def write_judge_inputs(folder: Path, eval_set: str) -> tuple[str, str]:
    rows = json.loads(Path(eval_set).read_text())
    refs = [{**e, "reference_output": "a reference " * (i + 1)} for i, e in enumerate(rows)]
    outs = [
        {"instruction": e["instruction"], "output": "an answer " * (3 - i % 3)} for i, e in enumerate(rows)
    ]
    (folder / "refs.json").write_text(json.dumps(refs))
    (folder / "outs.json").write_text(json.dumps({"outputs": outs}))
    return str(folder / "refs.json"), str(folder / "outs.json")


def test_sharded_judging_gives_the_unsharded_judge_stage(cluster2, eval_set, tmp_path):
    from prefect import flow

    from evaluation.judging import JudgementCache
    from flows import sharded
    from flows import tasks as T
    from flows.context import RunContext
    from spi.config import load_recipe

    cluster, _ = cluster2
    refs, outs = write_judge_inputs(tmp_path, eval_set)
    overrides = {
        "execution": {"task_runner": "dask", "dask_address": cluster.scheduler_address, "shard_prompts": 3}
    }
    r = load_recipe(TINY, overrides)
    T.judge_task.fn(
        system="sys",
        eval_set=refs,
        outputs=outs,
        judge=r.evaluation.judge,
        reward=r.model_dump(mode="json")["reward"],
        out=str(tmp_path / "unsharded.json"),
        key="k",
        cache=str(tmp_path / "unsharded.sqlite"),
    )

    @flow
    def judge(workdir: str) -> dict:
        return sharded.judge(RunContext(r, workdir), "sys", {"path": refs}, {"path": outs}, "k", False)

    out = sharded.with_runner(judge, r)(str(tmp_path / "work"))
    assert out["shards"] == 2  # prompts 0-2 and 3
    assert Path(out["path"]).read_bytes() == (tmp_path / "unsharded.json").read_bytes()

    def cached(path):
        with sqlite3.connect(path) as db:
            return sorted(db.execute("SELECT key, judge, preference FROM judgements"))

    assert len(cached(tmp_path / "unsharded.sqlite")) == 4
    assert cached(tmp_path / "work" / "judgements.sqlite") == cached(tmp_path / "unsharded.sqlite")
    assert len(JudgementCache(tmp_path / "work" / "judgements.sqlite")) == 4


def test_a_shard_reads_the_judge_cache_and_never_writes_it(tmp_path):
    from evaluation.judges import resolve_judge
    from evaluation.judging import JudgementCache, ShardJudgementCache, judge_pairs

    judge, path = resolve_judge("length"), tmp_path / "judgements.sqlite"
    absent = ShardJudgementCache(path)
    assert judge_pairs(judge, ["i"], ["out"], ["ref"], cache=absent) == [1.5]  # equal lengths
    assert not path.exists()  # no file created, nothing written
    JudgementCache(path).put_many(
        judge.identity, {JudgementCache.key(judge.identity, "i", "ref", "out"): 1.25}
    )
    before = path.read_bytes()
    assert (
        judge_pairs(judge, ["i", "j"], ["out", "x"], ["ref", "y"], cache=ShardJudgementCache(path))[0] == 1.25
    )
    assert path.read_bytes() == before and len(JudgementCache(path)) == 1
