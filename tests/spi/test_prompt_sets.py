"""The one prompt-set loader: both schemas from JSON/JSONL, built-in sources, hub ids offline, row-named errors."""

import json
import time

import pytest

from spi import instruction_tasks
from spi.prompt_sets import PromptSetError, load_prompt_set, offline_checkable

ALPACA_ROWS = [
    {"instruction": "Name three rivers.", "output": "Nile, Amazon, Danube.", "generator": "ref", "dataset": "x"},
    {"instruction": "Say hello politely."},
]
IFEVAL_ROWS = [
    {"key": 1, "prompt": "Write a note. Do not use commas.", "instruction_id_list": ["punctuation:no_comma"],
     "kwargs": [{"num_words": None}]},
    {"key": 2, "prompt": "Describe rain in few words.",
     "instruction_id_list": ["length_constraints:number_words", "keywords:existence"],
     "kwargs": [{"num_words": 40, "relation": "less than"}, {"keywords": ["cloud", "wet"]}]},
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPI_CACHE_DIR", str(tmp_path / "cache"))


def _jsonl(path, rows, blank_after_first=False):
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def _json(path, rows):
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("writer", [_jsonl, _json])
def test_alpaca_schema_from_jsonl_and_json(tmp_path, writer):
    path = writer(tmp_path / ("a.jsonl" if writer is _jsonl else "a.json"), ALPACA_ROWS)
    prompts = load_prompt_set(path)
    assert prompts.schema == "alpaca" and len(prompts) == 2 and prompts.dropped == 0
    assert prompts.texts == [r["instruction"] for r in ALPACA_ROWS]
    assert prompts.records[0]["output"] == "Nile, Amazon, Danube." and prompts.records[1]["output"] is None
    assert load_prompt_set(path, count=1).texts == ["Name three rivers."]
    assert list((tmp_path / "cache" / "datasets").iterdir()), "datasets cache under $SPI_CACHE_DIR/datasets"


@pytest.mark.parametrize("writer", [_jsonl, _json])
def test_ifeval_schema_from_jsonl_and_json(tmp_path, writer):
    path = writer(tmp_path / ("i.jsonl" if writer is _jsonl else "i.json"), IFEVAL_ROWS)
    prompts = load_prompt_set(path)
    assert prompts.schema == "ifeval" and prompts.texts == [r["prompt"] for r in IFEVAL_ROWS]
    assert prompts.records[0]["kwargs"] == [{}], "None-valued arguments are dropped, as IFEval's evaluator does"
    assert prompts.records[1]["kwargs"] == IFEVAL_ROWS[1]["kwargs"]
    assert prompts.records[1]["instruction_id_list"] == IFEVAL_ROWS[1]["instruction_id_list"]
    restricted = load_prompt_set(path, kinds=["punctuation:no_comma"])
    assert restricted.texts == [IFEVAL_ROWS[0]["prompt"]] and restricted.dropped == 1
    assert restricted.dropped_kinds == {"length_constraints:number_words": 1, "keywords:existence": 1}


def test_generated_prompts_round_trip_through_a_file(tmp_path):
    records = instruction_tasks.generate("heldout", 60, seed=2, kinds=instruction_tasks.SUPPORTED_KINDS)
    path = _jsonl(tmp_path / "gen.jsonl", records)
    assert load_prompt_set(path).records == records


def test_missing_field_names_file_and_row(tmp_path):
    bad = [ALPACA_ROWS[0], {"output": "no instruction here"}]
    with pytest.raises(PromptSetError, match=r"a\.jsonl, row 3: missing field 'instruction'"):
        load_prompt_set(_jsonl(tmp_path / "a.jsonl", bad, blank_after_first=True))
    with pytest.raises(PromptSetError, match=r"a\.json, row 2: missing field 'instruction'"):
        load_prompt_set(_json(tmp_path / "a.json", bad))
    no_kwargs = [IFEVAL_ROWS[1], {k: v for k, v in IFEVAL_ROWS[0].items() if k != "kwargs"}]
    with pytest.raises(PromptSetError, match=r"i\.jsonl, row 2: missing field 'kwargs'"):
        load_prompt_set(_jsonl(tmp_path / "i.jsonl", no_kwargs))
    with pytest.raises(PromptSetError, match=r"a2\.jsonl, row 1: missing field 'key'"):
        load_prompt_set(_jsonl(tmp_path / "a2.jsonl", ALPACA_ROWS), schema="ifeval")


def test_malformed_records_are_refused_with_their_row(tmp_path):
    short = [IFEVAL_ROWS[1], {**IFEVAL_ROWS[1], "prompt": "other", "kwargs": [{}]}]
    with pytest.raises(PromptSetError, match=r"row 2: field 'kwargs' must be a list of 2 objects"):
        load_prompt_set(_jsonl(tmp_path / "k.jsonl", short))
    with pytest.raises(PromptSetError, match=r"row 2: duplicate prompt \(first seen at row 1\)"):
        load_prompt_set(_jsonl(tmp_path / "d.jsonl", [ALPACA_ROWS[0], ALPACA_ROWS[0]]))
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps(ALPACA_ROWS[0]) + "\n{not json\n")
    with pytest.raises(PromptSetError, match=r"b\.jsonl, row 2: invalid JSON"):
        load_prompt_set(broken)
    with pytest.raises(PromptSetError, match="cannot tell the schema"):
        load_prompt_set(_jsonl(tmp_path / "u.jsonl", [{"text": "hi"}]))
    with pytest.raises(PromptSetError, match="no such file"):
        load_prompt_set(tmp_path / "absent.jsonl")
    with pytest.raises(PromptSetError, match="3 requested"):
        load_prompt_set(_jsonl(tmp_path / "c.jsonl", ALPACA_ROWS), count=3)


def test_generated_sources_match_the_generator():
    train = load_prompt_set("generated:train", count=40, seed=9)
    assert train.schema == "ifeval" and train.records == instruction_tasks.generate("train", 40, seed=9)
    held = load_prompt_set("generated:heldout:5", count=10, kinds=instruction_tasks.EARLY_KINDS)
    assert held.name == "generated:heldout:5"
    assert held.records == instruction_tasks.generate("heldout", 10, seed=5, kinds=instruction_tasks.EARLY_KINDS)
    with pytest.raises(PromptSetError, match="generated:SPLIT"):
        load_prompt_set("generated:test")


def test_ifbench_test_keeps_only_offline_kinds_and_reports_the_rest():
    ifbench = load_prompt_set("ifbench:test")
    assert ifbench.schema == "ifeval" and 200 <= len(ifbench) <= 294
    assert len(ifbench) + ifbench.dropped == 294
    assert sum(ifbench.dropped_kinds.values()) >= ifbench.dropped > 0
    checkable = offline_checkable()
    assert not any(checkable(k) for k in ifbench.dropped_kinds)
    assert {"ratio:stop_words", "words:start_verb"} <= set(ifbench.dropped_kinds)  # stopwords, POS tagger
    kinds = {k for r in ifbench.records for k in r["instruction_id_list"]}
    assert all(checkable(k) for k in kinds) and len(kinds) >= 40
    assert all(None not in kw.values() for r in ifbench.records for kw in r["kwargs"])
    only = load_prompt_set("ifbench:test", kinds={"count:numbers"})
    assert 0 < len(only) < 20 and all("count:numbers" in r["instruction_id_list"] for r in only.records)


def test_builtin_training_instructions_load():
    builtin = load_prompt_set("builtin:train")
    assert builtin.schema == "alpaca" and len(builtin) == 240


def test_uncached_hub_id_fails_at_once_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PromptSetError, match=r"hub:spi-tests/never-published.*HF_HUB_OFFLINE=1"):
        load_prompt_set("spi-tests/never-published")
    assert time.monotonic() - start < 10


def test_load_instructions_slices_any_source(tmp_path):
    from spi.prompt_sets import load_instructions

    path = _jsonl(tmp_path / "i.jsonl", IFEVAL_ROWS)
    assert load_instructions(str(path), 1, 1) == [IFEVAL_ROWS[1]["prompt"]]
    assert load_instructions(str(path)) == [r["prompt"] for r in IFEVAL_ROWS]
    generated = [r["prompt"] for r in instruction_tasks.generate("train", 30, seed=0)]
    assert load_instructions("generated:train", 10, 20) == generated[10:30]
    assert load_instructions("builtin:train", 238, 2) == load_prompt_set("builtin:train").texts[238:]
    with pytest.raises(ValueError, match="240 usable records; 241 requested"):
        load_instructions("builtin:train", 1, 240)


def test_a_rewritten_file_is_read_again_even_with_the_same_mtime(tmp_path):
    import os

    path = _jsonl(tmp_path / "p.jsonl", ALPACA_ROWS)
    stamp = path.stat().st_mtime_ns
    assert load_prompt_set(path).texts[0] == "Name three rivers."
    _jsonl(path, [{"instruction": "Name three lakes."}])
    os.utime(path, ns=(stamp, stamp))
    assert load_prompt_set(path).texts == ["Name three lakes."]
