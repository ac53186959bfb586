"""Generated verifiable prompts: deterministic, counted, conflict-free, checkable offline, disjoint from eval sets."""

import json
import os
import random
import re
from pathlib import Path

import pytest

from spi import instruction_tasks as it
from spi.prompt_sets import ifbench_test_file

ROOT = Path(__file__).resolve().parents[2]
ALPACA = Path(os.environ["SPI_ALPACA_DATA"]) / "eval_set.jsonl"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def test_same_call_same_prompts_whatever_the_global_rng():
    it.generate("train", 1, seed=0)  # imports done: they may draw from the global RNG once
    random.seed(1)
    state = random.getstate()
    first = it.generate("train", 300, seed=4)
    assert random.getstate() == state, "generation must not touch the global RNG"
    random.seed(2)
    assert it.generate("train", 300, seed=4) == first
    assert it.generate("train", 300, seed=5) != first
    assert it.generate("heldout", 300, seed=4) != first


def test_prefix_stable_in_count():
    assert it.generate("heldout", 500, seed=3)[:120] == it.generate("heldout", 120, seed=3)


def test_thousands_of_distinct_prompts_with_one_to_three_constraints():
    records = it.generate("train", 5000, seed=0)
    assert len(records) == 5000
    assert len({r["prompt"] for r in records}) == 5000
    assert len({r["key"] for r in records}) == 5000
    assert len({r["base_instruction"] for r in records}) >= 4000
    sizes = {len(r["instruction_id_list"]) for r in records}
    assert sizes == {1, 2, 3}
    for r in records:
        assert len(r["kwargs"]) == len(r["instruction_id_list"])
        assert set(r["instruction_id_list"]) <= set(it.DEFAULT_KINDS)
        assert not it.conflicting(r["instruction_id_list"]), r["instruction_id_list"]
    assert {len(r["instruction_id_list"]) for r in it.generate("train", 300, seed=0, max_constraints=1)} == {1}


def test_kinds_can_be_restricted_and_unknown_kinds_are_named():
    early = it.generate("train", 400, seed=1, kinds=it.EARLY_KINDS)
    used = {k for r in early for k in r["instruction_id_list"]}
    assert used <= set(it.EARLY_KINDS) and len(used) >= 5
    only = it.generate("heldout", 50, seed=1, kinds=["punctuation:no_comma"])
    assert all(r["instruction_id_list"] == ["punctuation:no_comma"] for r in only)
    with pytest.raises(ValueError, match="language:klingon"):
        it.generate("train", 5, kinds=["punctuation:no_comma", "language:klingon"])


def test_conflicting_kinds_are_never_combined():
    assert it.conflicting(["change_case:english_lowercase", "change_case:english_capital"])
    assert it.conflicting(["detectable_format:json_format", "punctuation:no_comma"])
    assert not it.conflicting(["punctuation:no_comma", "keywords:existence"])
    pair = ["change_case:english_lowercase", "change_case:english_capital"]
    records = it.generate("train", 200, seed=2, kinds=pair, max_constraints=2)
    assert all(len(r["instruction_id_list"]) == 1 for r in records)


def test_prompt_holds_each_kinds_own_phrasing_for_its_kwargs():
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    for r in it.generate("heldout", 400, seed=6, kinds=it.SUPPORTED_KINDS):
        assert r["prompt"].startswith(r["base_instruction"])
        for kind, kwargs in zip(r["instruction_id_list"], r["kwargs"], strict=True):
            description = INSTRUCTION_DICT[kind](kind).build_description(**kwargs)
            assert description in r["prompt"], (kind, kwargs)
        if it.REPEAT in r["instruction_id_list"]:
            request = r["kwargs"][r["instruction_id_list"].index(it.REPEAT)]["prompt_to_repeat"]
            assert r["prompt"].startswith(request) and r["base_instruction"] in request


def test_default_kinds_check_offline():
    """Every default kind's checker runs here (no download) on varied responses, with generated kwargs."""
    from if_verifiable.common import get_loose_transformations
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    responses = ["hello world. this is fine.", "A, B and C!\n\n***\n\nSecond part", '"Quoted"\n* one\n* two',
                 '{"a": 1}', "<<Title>> Section 1\nfirst\nSection 2\nsecond\nP.S. bye [name]"]
    seen = set()
    for r in it.generate("train", 600, seed=7):
        for kind, kwargs in zip(r["instruction_id_list"], r["kwargs"], strict=True):
            seen.add(kind)
            checker = INSTRUCTION_DICT[kind](kind)
            checker.build_description(**kwargs)
            for response in responses:
                for variant in get_loose_transformations(response):
                    assert checker.check_following(variant) in (True, False)
    assert seen == set(it.DEFAULT_KINDS)


def test_train_and_heldout_pools_are_disjoint():
    pool = json.loads(it.POOL_FILE.read_text())
    assert not set(pool["topics"]["train"]) & set(pool["topics"]["heldout"])
    train, held = it.base_instructions("train"), it.base_instructions("heldout")
    assert len(train) >= 4000 and len(held) >= 1000
    assert len({b for b, _ in train}) == len(train) and not {b for b, _ in train} & {b for b, _ in held}
    with pytest.raises(ValueError, match="split"):
        it.base_instructions("test")


def _assert_disjoint(eval_texts: list[str], what: str):
    bases = {_norm(b) for split in it.SPLITS for b, _ in it.base_instructions(split)}
    evals = {_norm(t) for t in eval_texts}
    assert not bases & evals, f"base instructions equal to {what} prompts"
    # one pass per eval text over the joined bases is far cheaper than all pairs
    joined = "\n".join(sorted(bases))
    contained = [t for t in evals if t in joined and any(t in b for b in bases)]
    assert not contained, f"base instructions contain {what} prompts: {contained[:3]}"


@pytest.mark.skipif(not ALPACA.is_file(), reason=f"AlpacaEval eval set not found at {ALPACA} (set SPI_ALPACA_DATA)")
def test_no_base_instruction_equals_or_contains_an_alpaca_eval_instruction():
    texts = [json.loads(line)["instruction"] for line in ALPACA.read_text().splitlines() if line.strip()]
    assert len(texts) == 805
    _assert_disjoint(texts, "AlpacaEval")


def test_disjointness_check_catches_an_overlap():
    base = it.base_instructions("heldout")[7][0]
    with pytest.raises(AssertionError, match="equal"):
        _assert_disjoint([base.upper()], "planted")
    with pytest.raises(AssertionError, match="contain"):
        _assert_disjoint([base[5:-5]], "planted")


def test_no_base_instruction_equals_or_contains_an_ifbench_or_builtin_eval_prompt():
    rows = [json.loads(line) for line in ifbench_test_file().read_text().splitlines() if line.strip()]
    assert len(rows) == 294
    _assert_disjoint([r["prompt"] for r in rows], "IFBench")
    builtin = ROOT / "evaluation" / "builtin_eval.jsonl"
    _assert_disjoint([json.loads(line)["instruction"] for line in builtin.read_text().splitlines() if line.strip()],
                     "built-in eval")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="count"):
        it.generate("train", -1)
    with pytest.raises(ValueError, match="min_constraints"):
        it.generate("train", 5, max_constraints=0)
    with pytest.raises(ValueError, match="distinct"):
        it.generate("train", 10, kinds=["punctuation:no_comma"], min_constraints=2, max_constraints=2)
