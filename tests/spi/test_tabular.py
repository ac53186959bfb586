"""Exact checks of the SPI algebra on a small tree (vocabulary 3, horizon 3), and the real search on
such a tree against the closed form."""

from collections import Counter

import numpy as np
import pytest
import torch

from spi.tabular import TreeProblem


@pytest.fixture
def problem():
    return TreeProblem(vocab=3, horizon=3, seed=1)


def test_monte_carlo_fit_approaches_exact_values(problem):
    policy = problem.base_policy()
    exact = problem.values(policy)
    rng = np.random.default_rng(0)
    errors = []
    for n in (100, 10_000):
        fitted = problem.monte_carlo_values(problem.sample(policy, n, rng))
        errors.append(max(abs(fitted[p] - exact[p]) for p in problem.prefixes if p in fitted and len(p) <= 1))
    assert errors[1] < errors[0]
    assert errors[1] < 0.05


def test_successive_reweighting_equals_closed_form(problem):
    betas = [1.0, 2.0, 2.5]
    policy, values = problem.base_policy(), []
    for beta in betas:
        v = problem.values(policy)
        values.append(v)
        policy = problem.reweight(policy, v, beta)
    closed = problem.closed_form(values, betas)
    for prefix in problem.prefixes:
        np.testing.assert_allclose(policy[prefix], closed[prefix], atol=1e-12)


def test_iterations_raise_expected_reward(problem):
    policy = problem.base_policy()
    rewards = [problem.expected_reward(policy)]
    for beta in (1.0, 2.0, 2.5):
        policy = problem.reweight(policy, problem.values(policy), beta)
        rewards.append(problem.expected_reward(policy))
    assert all(b > a + 1e-6 for a, b in zip(rewards, rewards[1:], strict=False))
    assert rewards[-1] <= max(problem.rewards.values())


# --------------------------------------------------------------------------- the real search on a small tree

PROMPT = [1, 2, 0, 1]


class _ToyTokenizer:
    """Every instruction is the same four tokens; no chat template, no EOS (responses have the full horizon)."""

    pad_token_id, eos_token_id, chat_template = 0, None, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(PROMPT)}

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in rows]


class _ToyPolicy:
    name, eos_ids = "toy-vocab-3", []

    def __init__(self, model):
        self.model, self.tokenizer = model, _ToyTokenizer()

    def prompt_ids(self, instruction):
        return list(PROMPT)


class _ExactValueGuide:
    """V(prefix) read from a table of exact values: the value a perfectly fitted value model would give."""

    needs_last_logprob = False

    def __init__(self, values):
        self.values = values

    def begin(self, instructions, prompt_ids, rows_per_prompt, compute):
        pass

    def reorder(self, index):
        pass

    def score(self, boundary):
        return torch.tensor([self.values[tuple(r)] for r in boundary.responses], dtype=torch.float32)


def test_chunk_search_with_exact_values_samples_the_closed_form_policy():
    """pi_0 is a transformer over 3 tokens; V_1 = V^{pi_0} and V_2 = V^{pi_1} are exact (spi.tabular).
    The search with one-token chunks, K candidates and stochastic selection on the guide
    V_1/beta_1 + V_2/beta_2 picks each token with probability -> pi_0 exp(sum_k V_k/beta_k) (K -> inf),
    i.e. the closed-form pi_2. Its answers' two-token prefixes over many seeds follow pi_2, not pi_0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spi.guides import WeightedGuide
    from spi.search import SearchSettings, search

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the next-token distributions away from uniform
    problem = TreeProblem(vocab=3, horizon=3, seed=2)
    with torch.no_grad():  # the tree's base policy is the transformer's
        for prefix in problem.prefixes:
            logits = model(input_ids=torch.tensor([PROMPT + list(prefix)])).logits[0, -1]
            problem.base_logits[prefix] = logits.double().numpy()
    betas = [0.5, 1.0]
    base = problem.base_policy()
    v1 = problem.values(base)
    v2 = problem.values(problem.reweight(base, v1, betas[0]))
    closed = problem.closed_form([v1, v2], betas)

    n = 1200
    settings = SearchSettings(width=1, successors=32, chunk_length=1, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=3, selection="stochastic", selection_temperature=1.0,
                              final_pick="value", batch_prompts=300)
    guide = WeightedGuide([(_ExactValueGuide(v1), 1 / betas[0]), (_ExactValueGuide(v2), 1 / betas[1])])
    out = search(_ToyPolicy(model), ["x"] * n, list(range(n)), settings, guide=guide, progress=False)
    counts = Counter(tuple(r.response_ids[r.chosen][:2]) for r in out.results)

    pairs = [(a, b) for a in range(3) for b in range(3)]
    empirical = np.array([counts[p] / n for p in pairs])
    expected = np.array([closed[()][a] * closed[(a,)][b] for a, b in pairs])
    under_base = np.array([base[()][a] * base[(a,)][b] for a, b in pairs])
    assert np.abs(expected - under_base).max() > 0.2  # the test can tell pi_2 from pi_0
    assert np.abs(empirical - expected).max() < 0.05  # 3.5 standard errors of a frequency at n = 1200
    assert np.abs(empirical - under_base).max() > 0.15
