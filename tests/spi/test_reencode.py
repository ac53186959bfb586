"""A value backbone or a weak-to-strong pair whose tokenizer is not the policy's reads re-encoded text:
the fit's examples and the search's guide build the same input from the same text."""

import json
from dataclasses import replace

import pytest
import torch

from spi.config import load_recipe
from spi.guides import CachedValueGuide, ImplicitRewardGuide, ReencodeImplicitRewardGuide, ReencodeValueGuide
from spi.models import CausalLM, load_tokenizer
from spi.pipeline import (
    fit_value_stage,
    generate_rollouts,
    label_rollouts,
    load_policy,
    load_value_models,
    value_examples,
    value_reencoding,
)
from spi.prompts import chat_prompt_ids
from spi.search import SearchSettings, search
from spi.systems import _w2s_guide, value_guide

RECIPE = {
    "name": "reencode", "policy": {"model": "tiny-char-llama", "system_message": "Be brief."},
    "sampling": {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
    "reward": {"kind": "hf-classifier", "model": "tiny-reward"},
    "value": {"kind": "backbone", "backbone": "tiny-llama", "epochs": 1, "batch_size": 4, "holdout_fraction": 0.0},
    "search": {"width": 2, "successors": 2, "chunk_length": 4},
    "iterations": {"count": 1, "betas": [1.0], "prompts_per_iteration": 3},
    "baselines": {"weak_to_strong_tuned": "tiny-llama", "weak_to_strong_untuned": "tiny-llama-b"},
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One iteration on the character-level policy with a value backbone of SmolLM2's tokenizer."""
    root = tmp_path_factory.mktemp("reencode")
    (root / "recipe.yaml").write_text(json.dumps(RECIPE))
    recipe = load_recipe(root / "recipe.yaml")
    rollouts = generate_rollouts(recipe, 1, [], root / "rollouts.jsonl", progress=False)
    labels = label_rollouts(recipe, rollouts, root / "labels.jsonl")
    value_dir = fit_value_stage(recipe, 1, rollouts, labels, root / "value")
    return recipe, rollouts, labels, value_dir


def test_the_fit_reads_the_rollouts_text_in_the_value_tokenizer(fitted):
    recipe, rollouts, labels, _ = fitted
    policy = load_policy(recipe)
    tokenizer, system_message = value_reencoding(recipe, policy)
    assert system_message == "Be brief."
    examples = value_examples(rollouts, labels, "all", policy.eos_ids[0], (tokenizer, system_message))
    records = [json.loads(line) for line in rollouts.read_text().splitlines()]
    leaves = [(r["instruction"], leaf["response"]) for r in records for leaf in r["leaves"]]
    assert len(examples) == len(leaves) == 3 * 4
    for example, (instruction, text) in zip(examples, leaves, strict=True):
        assert example.prompt_ids == chat_prompt_ids(tokenizer, instruction, "Be brief.")
        assert tokenizer.decode(example.response_ids) == text
    same = recipe.with_overrides({"policy": {"model": "tiny-llama"}})
    assert value_reencoding(same, load_policy(same)) is None


def test_the_search_scores_a_leaf_as_the_fit_encoded_it(fitted):
    recipe, _, _, value_dir = fitted
    policy = load_policy(recipe)
    (value,) = load_value_models(recipe, [value_dir])
    guide = value_guide([value], [1.0], policy)
    assert isinstance(guide.parts[0][0], ReencodeValueGuide)
    same = replace(CausalLM.load("tiny-llama"), system_message="Be brief.")
    assert isinstance(value_guide([value], [1.0], same).parts[0][0], CachedValueGuide)

    instructions = ["Name a colour.", "Count to three."]
    settings = SearchSettings(width=2, successors=2, chunk_length=4, max_new_tokens=8, temperature=1.0, top_k=0,
                              top_p=1.0, final_pick="value")
    out = search(policy, instructions, [3, 4], settings, guide, progress=False)
    tokenizer = value.tokenizer
    for x, result in zip(instructions, out.results, strict=True):
        ids = [chat_prompt_ids(tokenizer, x, "Be brief.") + tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in result.responses]
        expected = value.score_sequences(ids, pad_id=tokenizer.pad_token_id).float()
        assert torch.allclose(torch.tensor(result.leaf_values), expected, atol=1e-4)


def _logprob_sum(model, tokenizer, instruction, text):
    prompt = chat_prompt_ids(tokenizer, instruction, "Be brief.")
    ids = prompt + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    token_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return float(token_lp[len(prompt) - 1:].sum())


def test_a_weak_to_strong_pair_of_another_tokenizer_scores_reencoded_text(fitted):
    recipe = fitted[0]
    policy = load_policy(recipe)
    pair = (CausalLM.load("tiny-llama"), CausalLM.load("tiny-llama-b"))
    guide = _w2s_guide(recipe, policy, None, pair)
    assert isinstance(guide, ReencodeImplicitRewardGuide)
    assert isinstance(_w2s_guide(recipe, pair[0], None, pair), ImplicitRewardGuide)

    from spi.compute import Compute

    compute = Compute()
    texts = ["red and blue", "one two three"]
    scores = guide.score_texts(["Name a colour.", "Count to three."], texts, compute)
    tokenizer = load_tokenizer("tiny-llama")
    for score, x, t in zip(scores, ["Name a colour.", "Count to three."], texts, strict=True):
        expected = _logprob_sum(pair[0], tokenizer, x, t) - _logprob_sum(pair[1], tokenizer, x, t)
        assert float(score) == pytest.approx(expected, abs=1e-3)
    assert compute.w2s_tokens > 0

    with pytest.raises(ValueError, match="do not share a tokenizer"):
        _w2s_guide(recipe, policy, None, (pair[0], CausalLM.load("tiny-char-llama")))
