"""Eval sets, subsets, output formats and refusal of bad input (file and row named)."""

import gzip
import json

import pytest

from evaluation.data import (
    DataError,
    attach_references,
    load_eval_set,
    read_indexed,
    read_model_outputs,
    subset,
    write_model_outputs,
)
from tests.evaluation.alpaca_data import DATA, needs

needs_data = needs("eval_set.jsonl")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_builtin_set_is_varied_and_reference_free():
    es = load_eval_set("builtin")
    assert 35 <= len(es) <= 60
    assert len({e["instruction"] for e in es}) == len(es)
    assert len({e["dataset"] for e in es}) >= 5
    assert all(e["reference_output"] is None for e in es)
    with_refs = attach_references(es, lambda xs: [f"answer to: {x}" for x in xs], generator="echo")
    assert all(e["reference_generator"] == "echo" and e["reference_output"] for e in with_refs)


def test_subsets_are_deterministic_and_stratified():
    es = load_eval_set("builtin")
    assert subset(es, 5) == es[:5]
    a, b = subset(es, 12, stratify=True), subset(es, 12, stratify=True)
    assert a == b and len(a) == 12
    assert len({e["dataset"] for e in a}) == len({e["dataset"] for e in es})  # every stratum represented
    assert subset(es, 12, stratify=True, seed=1) != a
    order = [e["index"] for e in a]
    assert order == sorted(order)


@needs_data
def test_official_set_in_both_formats(tmp_path):
    es = load_eval_set(DATA)
    assert len(es) == 805 and es[0]["reference_generator"] == "gpt4_1106_preview"
    strata = subset(es, 100, stratify=True)
    counts = {d: sum(e["dataset"] == d for e in strata) for d in {e["dataset"] for e in es}}
    full = {d: sum(e["dataset"] == d for e in es) for d in counts}
    assert all(abs(counts[d] - 100 * full[d] / 805) <= 1 for d in counts)
    # AlpacaEval's own JSON format: {instruction, output, generator, dataset}, output = the reference
    alpaca = [{"instruction": e["instruction"], "output": e["reference_output"], "generator": "gpt4_1106_preview",
               "dataset": e["dataset"]} for e in es[:20]]
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(alpaca))
    again = load_eval_set(tmp_path)
    assert [e["reference_output"] for e in again] == [e["reference_output"] for e in es[:20]]


def test_outputs_round_trip(tmp_path):
    es = load_eval_set("builtin")[:6]
    for name in ("out.json", "out.jsonl"):
        path = write_model_outputs(tmp_path / name, es, [f"o{i}" for i in range(6)], generator="me")
        got = read_model_outputs(path, es)
        assert [got[e["index"]]["output"] for e in es] == [f"o{i}" for i in range(6)]
        assert {g["generator"] for g in got.values()} == {"me"}


@pytest.mark.parametrize("rows, row, words", [
    ([{"instruction": 0}], 1, "missing field 'output'"),
    ([{"instruction": "UNKNOWN", "output": "a"}], 1, "unknown instruction"),
    ([None, None, {"output": "a"}], 3, "missing field 'instruction'"),
    ([None, {"instruction": 1, "output": ""}], 2, "field 'output' is empty"),
    ([None, None, None, {"instruction": 0, "output": "b"}], 4, "duplicate instruction"),
])
def test_bad_outputs_name_file_and_row(tmp_path, rows, row, words):
    es = load_eval_set("builtin")
    good = [{"instruction": e["instruction"], "output": "fine"} for e in es[:4]]
    fixed = []
    for k, r in enumerate(rows):
        if r is None:
            fixed.append(good[k])
        else:
            r = dict(r)
            if isinstance(r.get("instruction"), int):  # an int n stands for the n-th instruction
                r["instruction"] = es[r["instruction"]]["instruction"]
            fixed.append(r)
    path = _write_jsonl(tmp_path / "model.jsonl", fixed)
    with pytest.raises(DataError) as err:
        read_model_outputs(path, es)
    message = str(err.value)
    assert str(path) in message and f"row {row}" in message and words in message


@pytest.mark.parametrize("value", [2.5, 0.0, "high", None])
def test_preference_outside_range_is_refused(tmp_path, value):
    es = load_eval_set("builtin")
    path = tmp_path / "m.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps({"index": 0, "preference": 1.2}) + "\n")
        fh.write(json.dumps({"index": 1, "preference": value}) + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl\.gz, row 2: preference"):
        read_indexed(path, "preference", es)


def test_duplicate_and_unknown_index_refused(tmp_path):
    es = load_eval_set("builtin")
    dup = _write_jsonl(tmp_path / "dup.jsonl", [{"index": 3, "output": "a"}, {"index": 3, "output": "b"}])
    with pytest.raises(DataError, match=r"dup\.jsonl, row 2: duplicate index 3"):
        read_indexed(dup, "output", es)
    unk = _write_jsonl(tmp_path / "unk.jsonl", [{"index": 999, "output": "a"}])
    with pytest.raises(DataError, match=r"unk\.jsonl, row 1: unknown index 999"):
        read_indexed(unk, "output", es)


def test_bad_eval_set_rows(tmp_path):
    path = _write_jsonl(tmp_path / "es.jsonl", [
        {"instruction": "a", "reference_output": "r"},
        {"instruction": "b", "reference_output": "r"},
        {"instruction": "a", "reference_output": "r"},
    ])
    with pytest.raises(DataError, match=r"es\.jsonl, row 3: duplicate instruction \(first seen at row 1\)"):
        load_eval_set(path)
    path.write_text('{"instruction": "a", "reference_output": "r"}\n{"instruction": "b"}\n')
    with pytest.raises(DataError, match=r"es\.jsonl, row 2: missing field 'output'"):
        load_eval_set(path)
    path.write_text('{"instruction": "a", "reference_output": "r"}\nnot json\n')
    with pytest.raises(DataError, match=r"es\.jsonl, row 2: invalid JSON"):
        load_eval_set(path)


def test_judge_command_on_the_builtin_set(tmp_path, capsys):
    from evaluation.cli import main

    es = load_eval_set("builtin")
    write_model_outputs(tmp_path / "base.json", es, ["short"] * len(es), generator="base")
    write_model_outputs(tmp_path / "mine.json", es, ["a much longer answer"] * len(es), generator="mine")
    argv = ["judge", "--eval-set", "builtin", "--outputs", str(tmp_path / "mine.json"), "--references",
            str(tmp_path / "base.json"), "--judge", "length", "--cache", str(tmp_path / "c.sqlite"),
            "--out", str(tmp_path / "prefs.jsonl"), "--n", "12", "--stratify"]
    assert main(argv) == 0
    prefs = read_indexed(tmp_path / "prefs.jsonl", "preference", es)
    assert len(prefs) == 12 and all(p > 1.5 for p in prefs.values())
    assert "win rate" in capsys.readouterr().out
    assert main(argv[:5] + argv[7:]) == 2  # no references: one error line naming the option
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--references" in err[0]
