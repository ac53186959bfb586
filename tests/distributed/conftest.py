"""Fixtures of the distributed tests: one Prefect test harness, one local Dask cluster of two workers
(loopback only, one thread each) and the unsharded ``spi.pipeline`` outputs to compare with."""

from pathlib import Path

import pytest

TINY = str(Path(__file__).resolve().parents[1] / "flows" / "tiny.yaml")
# one iteration of 4 prompts, 4 eval instructions, one prompt per shard; a reward batch holds one
# prompt's 4 leaves, so a label shard scores the batches the unsharded stage scores (bit-identical)
OVERRIDES = {
    "iterations": {"count": 1, "prompts_per_iteration": 4},
    "reward": {"batch_size": 4},
    "execution": {"task_runner": "dask", "shard_prompts": 1, "threads": 1},
}
N_EVAL = 4


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API + database for the distributed tests."""
    import torch
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    torch.set_num_threads(1)
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def cluster2(prefect_api):
    """A LocalCluster of two single-threaded worker processes on 127.0.0.1, and a client of it."""
    pytest.importorskip("prefect_dask")
    from distributed import Client, LocalCluster

    from flows.sharded import local_cluster_kwargs

    cluster = LocalCluster(**local_cluster_kwargs(2))
    client = Client(cluster)
    yield cluster, client
    client.close()
    cluster.close()


@pytest.fixture(scope="session")
def eval_set(tmp_path_factory):
    from spi.prompt_sets import load_instructions
    from spi.stagefiles import write_json

    rows = [{"index": i, "instruction": x, "dataset": "bench"}
            for i, x in enumerate(load_instructions("builtin:train", 200, N_EVAL))]
    return str(write_json(tmp_path_factory.mktemp("eval") / "eval.json", rows, indent=None))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, eval_set):
    """The unsharded stages of spi.pipeline in this process: rollouts, labels, V_1, spi-1 decode."""
    import json

    import torch

    from spi import pipeline
    from spi.config import load_recipe

    torch.set_num_threads(1)
    r = load_recipe(TINY, OVERRIDES)
    d = tmp_path_factory.mktemp("reference")
    rollouts = pipeline.generate_rollouts(r, 1, [], d / "rollouts.jsonl", progress=False)
    labels = pipeline.label_rollouts(r, rollouts, d / "labels.jsonl")
    value = pipeline.fit_value_stage(r, 1, rollouts, labels, d / "value")
    xs = [e["instruction"] for e in json.loads(Path(eval_set).read_text())]
    decoded = pipeline.decode_system(
        r, "spi-1", [value], xs, d / "spi-1.json", datasets=["bench"] * len(xs), progress=False
    )
    return {"rollouts": rollouts, "labels": labels, "value": value, "decoded": decoded}


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory):
    """An empty MLflow SQLite database (its schema migrations take ~20 s here), made once and copied."""
    from mlflow_store.tracking import client_for, default_tracking_uri

    uri = default_tracking_uri(tmp_path_factory.mktemp("mlflow_template"))
    client_for(uri)
    return Path(uri[len("sqlite:///") :])
