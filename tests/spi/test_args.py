"""ARGS's two proposal modes: the top-k tokens (the ARGS paper) and k samples of the warped distribution
scored with log p_warped + w * r(prefix) (IRO's code)."""

import json
from dataclasses import replace

import pytest
import torch

from spi.config import load_recipe
from spi.pipeline import decode_system, heldout_instructions
from spi.sampling import row_uniforms, sample_tokens, warped_logprob
from spi.search import SearchSettings, search
from spi.systems import system_plan

TINY = {"name": "tiny-args", "policy": {"model": "tiny-llama"}, "sampling": {"max_new_tokens": 5},
        "reward": {"kind": "hf-classifier", "model": "tiny-reward"},
        "baselines": {"args_proposal": "sampled", "args_candidates": 4}}


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (8, 0.8)])
def test_warped_logprob_is_the_distribution_that_sample_tokens_draws_from(top_k, top_p):
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(top_k)) * 2
    every = torch.arange(20).repeat(3, 1)
    logprob = torch.stack([warped_logprob(logits, every[:, t], 0.7, top_k, top_p) for t in range(20)], dim=1)
    assert torch.allclose(logprob.exp().sum(-1), torch.ones(3), atol=1e-5)  # a distribution per row
    kept = torch.isfinite(logprob)
    if top_k:
        assert int(kept.sum(-1).max()) <= top_k
    draws = torch.stack([sample_tokens(logits, u, 0.7, top_k, top_p) for u in row_uniforms(1, 3, 4000).T])
    for row in range(3):  # every sampled token has finite log p_warped, at its frequency
        counts = torch.bincount(draws[:, row], minlength=20).float() / len(draws)
        assert bool(kept[row][draws[:, row]].all())
        assert torch.allclose(counts, logprob[row].exp(), atol=0.03)


def test_sampled_proposals_are_the_rows_samples_and_topk_the_most_likely(tmp_path):
    (tmp_path / "r.yaml").write_text(json.dumps(TINY))
    recipe = load_recipe(tmp_path / "r.yaml")
    from spi.pipeline import load_policy, load_reward_model

    policy, reward = load_policy(recipe), load_reward_model(recipe)
    sampled, guide = system_plan("args", recipe, policy, reward_model=reward)
    assert (sampled.width, sampled.successors, sampled.chunk_length, sampled.proposal) == (1, 4, 1, "sample")
    topk, _ = system_plan("args", recipe.with_overrides({"baselines": {"args_proposal": "topk"}}), policy,
                          reward_model=reward)
    assert topk.proposal == "topk"
    prompts = heldout_instructions(recipe, 2)
    runs = {mode: search(policy, prompts, [1, 2], settings, guide, reward_model=reward).results
            for mode, settings in (("sampled", sampled), ("topk", topk))}
    # a sampled ARGS answer need not be a greedy continuation; with these seeds the two modes differ
    assert [r.answer for r in runs["sampled"]] != [r.answer for r in runs["topk"]]
    again = search(policy, prompts, [1, 2], sampled, guide, reward_model=reward).results
    assert [r.answer for r in again] == [r.answer for r in runs["sampled"]]  # row-owned randomness


def test_args_sampled_decodes_through_the_pipeline_with_its_own_key(tmp_path):
    (tmp_path / "r.yaml").write_text(json.dumps(TINY))
    recipe = load_recipe(tmp_path / "r.yaml")
    prompts = heldout_instructions(recipe, 2)
    out = json.loads(decode_system(recipe, "args", [], prompts, tmp_path / "a.json", progress=False).read_text())
    assert out["compute"]["reward_calls"] >= 2 * 4 * 2 and len(out["outputs"]) == 2
    from spi.pipeline import decode_key

    topk = recipe.with_overrides({"baselines": {"args_proposal": "topk"}})
    assert decode_key(recipe, "args", [], "e") != decode_key(topk, "args", [], "e")


def test_a_top_k_proposal_is_scored_by_the_unwarped_policy():
    settings = SearchSettings(proposal="topk", temperature=0.5, top_k=2)
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    from spi.search import _proposal_logprob

    lp = _proposal_logprob(logits, torch.tensor([1]), settings)
    assert float(lp) == pytest.approx(float(torch.log_softmax(logits, -1)[0, 1]))
    warped = _proposal_logprob(logits, torch.tensor([1]), replace(settings, proposal="sample"))
    assert float(warped) == pytest.approx(float(torch.log_softmax(logits[0, :2] / 0.5, -1)[1]))
