"""Every guide and reward charges the tokens it runs through its own model, on a real tiny decode.

The expected counts are worked out here from the decode's output (prompt and response lengths, the
scorers' own tokenizers), not read back from the counters: a search without selection feeds each guide
every prompt once and every row's response tokens (its EOS included) once, at the last boundary.
"""

from dataclasses import replace

import pytest
import torch

from spi.compute import Compute, charge_reward
from spi.guides import (
    CachedValueGuide,
    HeadValueGuide,
    ImplicitRewardGuide,
    ReencodeValueGuide,
    RewardGuide,
    WeightedGuide,
)
from spi.models import CausalLM
from spi.prompts import chat_prompt_ids
from spi.reward import ClassifierReward, LLMJudgeReward, VerifierReward
from spi.search import SearchSettings, search
from spi.value import ValueExample, fit_value, new_value_model
from spi.value_train import TrainSettings

MAX_NEW = 6
# three rows per prompt, one chunk: no selection, every guide scores each row once at the end
ONE_CHUNK = SearchSettings(width=1, successors=3, chunk_length=None, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=MAX_NEW, final_pick="value")
PROMPTS = ["Give three tips for saving money.", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def pair():
    return CausalLM.load("tiny-llama"), CausalLM.load("tiny-llama-b")


@pytest.fixture(scope="module")
def reward():
    return ClassifierReward("tiny-reward", batch_size=4)


def _decode(policy, guide, settings=ONE_CHUNK, reward_model=None):
    out = search(policy, PROMPTS, [11, 12], settings, guide, reward_model=reward_model, progress=False)
    return out, out.compute


def _fed(policy, out) -> int:
    """Tokens a model fed like the policy reads: each prompt once, each row's response with its EOS."""
    prompts = sum(len(chat_prompt_ids(policy.tokenizer, x)) for x in PROMPTS)
    return prompts + sum(min(len(ids) + 1, MAX_NEW) for r in out.results for ids in r.response_ids)


def _texts(out):
    return [(r.instruction, text) for r in out.results for text in r.responses]


def test_a_value_backbone_charges_the_tokens_it_is_fed(pair):
    policy, other = pair
    value = new_value_model("backbone", None, policy.name, other.name).eval()
    out, compute = _decode(policy, WeightedGuide([(CachedValueGuide(value, policy.tokenizer.pad_token_id), 1.0)]))
    assert compute.value_tokens == _fed(policy, out) > 0
    assert compute.value_calls == 2 * 3 and compute.w2s_tokens == compute.reward_tokens == 0


def test_two_value_backbones_charge_twice(pair):
    policy, other = pair
    values = [new_value_model("backbone", None, policy.name, other.name).eval()
              for _ in range(2)]
    guides = [(CachedValueGuide(v, policy.tokenizer.pad_token_id), 1.0) for v in values]
    out, compute = _decode(policy, WeightedGuide(guides))
    assert compute.value_tokens == 2 * _fed(policy, out)


def test_a_head_on_the_policy_runs_no_model_of_its_own(pair):
    policy, _ = pair
    head = new_value_model("policy-head", policy.model, policy.name)
    out, compute = _decode(policy, WeightedGuide([(HeadValueGuide(head), 1.0)]))
    assert compute.value_tokens == 0 and compute.value_calls == 2 * 3
    assert compute.policy_tokens > 0


def test_a_reencoding_value_model_charges_its_own_encoding(pair):
    policy, other = pair
    value = new_value_model("backbone", None, policy.name, other.name).eval()
    out, compute = _decode(policy, WeightedGuide([(ReencodeValueGuide(value, policy.tokenizer), 1.0)]))
    tok = value.tokenizer
    expected = sum(len(chat_prompt_ids(tok, x)) + len(tok(t, add_special_tokens=False)["input_ids"])
                   for x, t in _texts(out))
    assert compute.value_tokens == expected > 0


def test_weak_to_strong_charges_both_models_of_the_pair(pair):
    policy, other = pair
    guide = ImplicitRewardGuide(policy.model, other.model, policy.tokenizer.pad_token_id)
    out, compute = _decode(policy, WeightedGuide([(guide, 1.0)]))
    assert compute.w2s_tokens == 2 * _fed(policy, out) > 0
    assert compute.value_tokens == 0 and compute.value_calls == 2 * 3


def test_args_reward_and_the_final_pick_charge_the_reward_models_tokens(pair, reward):
    policy, _ = pair
    settings = replace(ONE_CHUNK, final_pick="reward")
    out, compute = _decode(policy, WeightedGuide([(RewardGuide(reward, policy.tokenizer), 1.0)]), settings, reward)
    per_pass = sum(len(reward.tokenizer(x, t, truncation=True, max_length=reward.max_length)["input_ids"])
                   for x, t in _texts(out))
    # scored twice: by the guide at the last boundary and by the reward model's final pick
    assert compute.reward_tokens == 2 * per_pass > 0
    assert compute.reward_calls == 2 * 2 * 3


def test_charge_reward_counts_every_backend():
    judge = LLMJudgeReward("tiny-llama", batch_size=2)
    xs, ys = ["What is 2+2?", "Name a colour.", "Say hi."], ["4", "Blue.", "Hello there, friend."]
    compute = Compute()
    scores = charge_reward(judge, xs, ys, compute)
    assert scores == pytest.approx(judge.score(xs, ys), abs=1e-5)
    assert compute.reward_tokens == sum(len(judge._prompt(x, y)) for x, y in zip(xs, ys, strict=True))
    assert compute.reward_calls == 3 and compute.seconds["reward_forward"] > 0
    verifier = VerifierReward([{"key": 1, "prompt": "Say hi.", "instruction_id_list": [], "kwargs": []}])
    charge_reward(verifier, ["Say hi."], ["hi"], compute)
    assert compute.reward_tokens == sum(len(judge._prompt(x, y)) for x, y in zip(xs, ys, strict=True))  # rules: 0

    class StandIn:  # only ``score``: no network, no tokens
        def score(self, instructions, responses):
            return [0.0] * len(responses)

    charge_reward(StandIn(), ["a"], ["b"], compute)
    assert compute.reward_calls == 5


def _examples(tokenizer, n=8):
    prompt = tokenizer("Say something.")["input_ids"]
    return [ValueExample(prompt, [1000 + i] * (3 + i % 4), float(i % 2), str(i)) for i in range(n)]


def test_a_value_fit_records_what_it_cost(pair):
    policy, other = pair
    examples = _examples(policy.tokenizer)
    tokens = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    pad = policy.tokenizer.pad_token_id
    head = new_value_model("policy-head", policy.model, policy.name)
    report = fit_value(head, examples, pad, policy.model, epochs=3, batch_size=4, holdout_fraction=0.25)
    # the policy forwards every example once (the held-out ones to evaluate), nothing backward
    assert (report.epochs, report.forward_tokens, report.backward_tokens) == (3, sum(tokens), 0)
    assert report.train_sequences == 6 and report.seconds > 0

    torch.manual_seed(0)
    backbone = new_value_model("backbone", None, policy.name, other.name)
    report = fit_value(backbone, examples, pad, None, epochs=2, learning_rate=1e-4, batch_size=4,
                       holdout_fraction=0.0, train=TrainSettings(micro_batch_size=2))
    # feature statistics over the first step (4 examples), then 2 epochs forward and backward
    assert report.backward_tokens == 2 * sum(tokens)
    assert report.forward_tokens == sum(tokens[:4]) + 2 * sum(tokens)
    assert report.epochs == 2


def test_the_counters_add_up():
    a, b = Compute(policy_tokens=3, w2s_tokens=5, reward_tokens=7), Compute(w2s_tokens=1, value_tokens=2)
    assert a.add(b).as_dict() == {"policy_tokens": 3, "generated_tokens": 0, "value_tokens": 2, "value_calls": 0,
                                  "reward_calls": 0, "reward_tokens": 7, "w2s_tokens": 6}
