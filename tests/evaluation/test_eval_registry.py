"""One registration makes a judge usable everywhere: spec resolution, the stage-key fingerprint and the
judgement-cache key, the independence and availability checks, and ``spi eval judge``; an unknown
judge fails at once with the list of registered ones."""

import json

import pytest

from evaluation import cli
from evaluation.judges import (
    JudgeSpecError,
    check_independent,
    check_judge_available,
    judge_fingerprint,
    judge_syntaxes,
    resolve_judge,
)
from evaluation.judging import JudgementCache, judge_pairs
from tests.evaluation.toy_judge import TOY_VERSION, ToyJudge, registered_toy_judge

INSTR = ["say toy", "say nothing", "say toy again"]
OUTS = ["a toy", "nothing", "toy toy"]
REFS = ["ref one", "ref two", "ref three"]


@pytest.fixture
def toy():
    with registered_toy_judge() as judge_class:
        yield judge_class


def test_a_registered_judge_resolves_from_its_spec(toy):
    judge = resolve_judge("toy:0.125")
    assert isinstance(judge, ToyJudge) and judge.identity == "toy:bias=0.125"
    assert judge.judge(INSTR, OUTS, REFS) == [1.875, 1.125, 1.875]
    assert resolve_judge("toy").bias == 0.25  # no argument: the factory's default
    assert resolve_judge("toy", bias=0.5).bias == 0.5  # keyword arguments win over the spec (--judge-arg)
    assert "toy[:BIAS]" in judge_syntaxes()


def test_its_hooks_check_availability_and_independence(toy):
    with pytest.raises(JudgeSpecError, match=r"bias 0\.75 is not in \[0, 0\.5\]"):
        check_judge_available("toy:0.75")
    with pytest.raises(JudgeSpecError, match=r"judge 'toy:abc'.*form: toy\[:BIAS\]"):
        check_judge_available("toy:abc")
    with pytest.raises(JudgeSpecError, match="reward model the experiment was trained on"):
        check_independent("toy", {"kind": "toy", "model": "m"})
    check_independent("toy", {"kind": "toy", "model": "m"}, allow_same=True)
    check_independent("toy", {"kind": "hf-classifier", "model": "m"})


def test_its_fingerprint_and_cache_keys_follow_the_spec_and_the_settings(toy, tmp_path):
    assert judge_fingerprint("toy:0.125") == f"toy:0.125@{TOY_VERSION}"
    assert judge_fingerprint("toy:0.125") != judge_fingerprint("toy:0.25")
    cache = JudgementCache(tmp_path / "j.sqlite")
    low, high = resolve_judge("toy:0.125"), resolve_judge("toy:0.25")
    assert judge_pairs(low, INSTR, OUTS, REFS, cache=cache) == [1.875, 1.125, 1.875]
    assert judge_pairs(high, INSTR, OUTS, REFS, cache=cache) == [1.75, 1.25, 1.75]  # not low's answers
    keys = [JudgementCache.key("toy:bias=0.125", i, r, o) for i, o, r in zip(INSTR, OUTS, REFS, strict=True)]
    assert cache.get_many(keys) == dict(zip(keys, [1.875, 1.125, 1.875], strict=True))
    assert len(cache) == 6


def _eval_files(tmp_path):
    eval_set, outputs = tmp_path / "eval_set.jsonl", tmp_path / "outputs.jsonl"
    eval_set.write_text("".join(json.dumps({"instruction": i, "output": r}) + "\n" for i, r in zip(INSTR, REFS, strict=True)))
    outputs.write_text(
        "".join(json.dumps({"instruction": i, "output": o, "generator": "m"}) + "\n" for i, o in zip(INSTR, OUTS, strict=True))
    )
    return eval_set, outputs


def test_spi_eval_judge_takes_a_registered_spec(toy, tmp_path, capsys):
    eval_set, outputs = _eval_files(tmp_path)
    out, cache = tmp_path / "prefs.jsonl", tmp_path / "cache.sqlite"
    argv = ["judge", "--eval-set", str(eval_set), "--outputs", str(outputs), "--cache", str(cache), "--out", str(out)]
    assert cli.main(argv + ["--judge", "toy:0.125"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["preference"] for r in rows] == [1.875, 1.125, 1.875]
    assert "judge toy:bias=0.125: win rate" in capsys.readouterr().out
    assert cli.main(argv + ["--judge", "toy", "--judge-arg", "bias=0.5"]) == 0
    assert [json.loads(line)["preference"] for line in out.read_text().splitlines()] == [1.5, 1.5, 1.5]
    with pytest.raises(SystemExit):
        cli.main(["judge", "--help"])
    assert "toy[:BIAS]" in capsys.readouterr().out  # the help lists the registered judges


def test_an_unknown_judge_fails_with_the_registered_ones(toy, tmp_path, capsys):
    with pytest.raises(JudgeSpecError) as err:
        resolve_judge("no-such-judge:1")
    assert "unknown judge 'no-such-judge:1'" in str(err.value)
    assert "length[:SCALE]" in str(err.value) and "toy[:BIAS]" in str(err.value)
    for call in (check_judge_available, judge_fingerprint):
        with pytest.raises(JudgeSpecError, match="registered judges are"):
            call("no-such-judge")
    eval_set, outputs = _eval_files(tmp_path)
    code = cli.main(["judge", "--eval-set", str(eval_set), "--outputs", str(outputs), "--judge", "nope",
                     "--cache", str(tmp_path / "c.sqlite")])
    # one error line (the eval-set loader's progress bars may come before it on stderr)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: unknown judge 'nope'") and "toy[:BIAS]" in errors[0]


def test_the_registration_ends_with_the_block():
    with registered_toy_judge():
        assert "toy[:BIAS]" in judge_syntaxes()
    with pytest.raises(JudgeSpecError, match="unknown judge 'toy'"):
        resolve_judge("toy")
