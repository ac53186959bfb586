"""spi.sharding: stable shards, merge by prompt index (gaps and conflicts refused), backends."""

import json

import pytest

from spi import backends, sharding
from spi.sharding import MergeError, merge_rows, split


def rows(indices, tag="a"):
    return [{"prompt_index": i, "text": f"{tag}{i}"} for i in indices]


def test_split_is_contiguous_stable_and_covers_every_prompt():
    shards = split(10, 4)
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 8), (8, 10)]
    assert [i for s in shards for i in s.indices] == list(range(10))
    assert split(10, 4) == shards  # deterministic: depends on (n, size) only
    assert [len(s) for s in split(3, 8)] == [3] and split(0, 4) == []
    assert len({s.name for s in split(100, 7)}) == 15
    with pytest.raises(ValueError):
        split(5, 0)


def test_merge_orders_by_prompt_index_whatever_the_shard_order():
    parts = [rows([4, 5]), rows([0, 1]), rows([2, 3])]
    assert merge_rows(parts, 6) == rows(range(6))


def test_repeated_shard_with_identical_rows_is_collapsed():
    parts = [rows([0, 1]), rows([2, 3]), rows([2, 3]), rows([1])]
    assert merge_rows(parts, 4) == rows(range(4))


def test_lost_shard_is_refused_naming_the_missing_prompts():
    with pytest.raises(MergeError, match=r"no rows for 3 of 8 prompts: prompt indices 2-3, 6"):
        merge_rows([rows([0, 1]), rows([4, 5]), rows([7])], 8, "iteration 1 rollouts")


def test_conflicting_duplicate_is_refused():
    with pytest.raises(MergeError, match=r"conflicting duplicate rows for prompt indices 1"):
        merge_rows([rows([0, 1]), rows([1], tag="b")], 2)


def test_stray_and_keyless_rows_are_refused():
    with pytest.raises(MergeError, match="does not cover"):
        merge_rows([rows([0, 1, 9])], 2)
    with pytest.raises(MergeError, match="no 'prompt_index'"):
        merge_rows([[{"text": "x"}]], 1)


def test_merge_jsonl_writes_one_file_atomically(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sharding.write_jsonl(a, rows([1]))
    sharding.write_jsonl(b, rows([0]))
    out = sharding.merge_jsonl([a, b], 2, tmp_path / "m.jsonl", "rows")
    assert [json.loads(x) for x in out.read_text().splitlines()] == rows([0, 1])
    assert not list(tmp_path.glob("*.partial"))


def test_merge_compute_adds_counts_and_seconds():
    total = sharding.merge_compute(
        [{"policy_tokens": 3, "seconds_decode": 0.5}, {"policy_tokens": 4, "seconds_decode": 1.0}]
    )
    assert total == {"policy_tokens": 7, "seconds_decode": 1.5}


def test_vllm_backend_says_why_it_cannot_run_here():
    reason = backends.vllm_unavailable_reason()
    if reason is None:
        pytest.skip("vLLM and a GPU are present: the unavailable path cannot be checked here")
    with pytest.raises(backends.BackendUnavailable, match=reason):
        backends.VLLMBackend()


def test_vllm_backend_on_a_gpu_worker():
    reason = backends.vllm_unavailable_reason()
    if reason:
        pytest.skip(f"vLLM backend not testable here: {reason}")
    backend = backends.VLLMBackend()  # pragma: no cover - needs vLLM and a GPU
    assert backend.engine_kwargs["enable_prefix_caching"] is True


def test_recipe_selects_backend_and_execution_defaults_keep_old_recipes():
    from spi.config import load_recipe

    r = load_recipe("smoke")
    assert (r.execution.task_runner, r.execution.backend, r.execution.dask_address) == (
        "thread",
        "transformers",
        None,
    )
    assert isinstance(backends.backend_for(r), backends.TransformersBackend)
    with pytest.raises(Exception, match="execution.backend"):
        load_recipe("smoke", {"execution": {"backend": "tgi"}})
