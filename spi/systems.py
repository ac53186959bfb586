"""The decoding systems compared in an experiment, each a setting of the one search routine.

    base-greedy    W=1, K=1, temperature 0
    base-sampled   W=1, K=1
    best-of-n      W=1, K=W*K, one chunk, final pick by reward
    best-of-n:N    the same with N rows (Best-of-N at another budget)
    blockwise-cd   W=1, K=W*K, L, guided by V_1 (controlled decoding with the first value model)
    spi-k          W, K, L, guided by sum_{i<=k} V_i / beta_i, final pick by reward
    weak-to-strong W, K, L, guided by log pi_tuned - log pi_untuned of a small pair
    args           W=1, K=top-k candidates, L=1, guided by log pi(token) + w * r(prefix)
"""

from __future__ import annotations

from dataclasses import replace

from spi.guides import (
    CachedValueGuide,
    HeadValueGuide,
    ImplicitRewardGuide,
    RewardGuide,
    TokenLogProbGuide,
    WeightedGuide,
)
from spi.search import SearchSettings


def base_settings(recipe) -> SearchSettings:
    s, p = recipe.search, recipe.sampling
    return SearchSettings(
        width=s.width, successors=s.successors, chunk_length=s.chunk_length, temperature=p.temperature,
        top_k=p.top_k, top_p=p.top_p, max_new_tokens=p.max_new_tokens, selection=s.selection,
        selection_temperature=s.selection_temperature, final_pick=s.final_pick, batch_prompts=s.batch_prompts,
    )


def value_guide(value_models, betas, policy) -> WeightedGuide:
    """sum_i V_i / beta_i, each V_i read from the policy's hidden state or its own cached backbone."""
    parts = []
    for model, beta in zip(value_models, betas, strict=False):
        if model.kind == "policy-head":
            if model.policy_name != policy.name:
                raise ValueError(f"value head was fitted on policy '{model.policy_name}', not '{policy.name}'")
            parts.append((HeadValueGuide(model), 1.0 / beta))
        else:
            parts.append((CachedValueGuide(model, policy.tokenizer.pad_token_id), 1.0 / beta))
    return WeightedGuide(parts)


def system_plan(name: str, recipe, policy, value_models=(), reward_model=None, w2s_models=None):
    """(SearchSettings, guide or None) for a named system."""
    base = base_settings(recipe)
    n = base.rows
    if name == "base-greedy":
        return replace(base, width=1, successors=1, temperature=0.0), None
    if name == "base-sampled":
        return replace(base, width=1, successors=1), None
    if name == "best-of-n" or name.startswith("best-of-n:"):
        rows = best_of_n_rows(name, n)
        return replace(base, width=1, successors=rows, chunk_length=None, final_pick="reward"), None
    if name == "blockwise-cd":
        _need(value_models, name)
        return replace(base, width=1, successors=n), value_guide(value_models[:1], [1.0], policy)
    if name.startswith("spi-"):
        k = int(name.split("-", 1)[1])
        _need(value_models[:k] if len(value_models) >= k else [], name)
        return base, value_guide(value_models[:k], recipe.iterations.betas[:k], policy)
    if name == "weak-to-strong":
        if not w2s_models:
            raise ValueError("weak-to-strong needs baselines.weak_to_strong_tuned and _untuned models")
        tuned, untuned = (getattr(m, "model", m) for m in w2s_models)  # CausalLM or a bare HF model
        return base, ImplicitRewardGuide(tuned, untuned, policy.tokenizer.pad_token_id)
    if name == "args":
        if reward_model is None:
            raise ValueError("args needs a reward model")
        args = recipe.baselines
        guide = WeightedGuide([(TokenLogProbGuide(), 1.0), (RewardGuide(reward_model, policy.tokenizer), args.args_weight)])
        return replace(base, width=1, successors=args.args_top_k, chunk_length=1, proposal="topk",
                       final_pick="value"), guide
    raise ValueError(f"unknown system '{name}'")


def best_of_n_rows(name: str, default: int) -> int:
    """N of ``best-of-n`` (``default``) or ``best-of-n:N``."""
    if name == "best-of-n":
        return default
    text = name.split(":", 1)[1]
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"system '{name}': N of best-of-n:N must be a positive integer")
    return int(text)


def _need(value_models, name):
    if not value_models:
        raise ValueError(f"system '{name}' needs fitted value models; run the SPI iterations first")
