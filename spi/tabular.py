"""Exact SPI on a small tree: the reference that the learned pieces are checked against.

States are token prefixes over a vocabulary of ``vocab`` tokens, responses have exactly ``horizon``
tokens, and the reward is a table over complete responses. Everything is computed exactly:
    V^pi(s)        = sum_z pi(z|s) V^pi([s, z]),  V^pi(leaf) = r(leaf)
    pi_k(z|s)      ∝ pi_{k-1}(z|s) exp(V_k([s, z]) / beta_k),   V_k = V^{pi_{k-1}}
    closed form    pi_K(z|s) ∝ pi_0(z|s) exp(sum_k V_k([s, z]) / beta_k)
"""

from __future__ import annotations

import itertools

import numpy as np


class TreeProblem:
    def __init__(self, vocab: int = 3, horizon: int = 3, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.vocab, self.horizon = vocab, horizon
        self.prefixes = [p for n in range(horizon) for p in itertools.product(range(vocab), repeat=n)]
        self.base_logits = {p: rng.normal(size=vocab) for p in self.prefixes}
        self.rewards = {leaf: float(rng.normal()) for leaf in itertools.product(range(vocab), repeat=horizon)}

    def base_policy(self) -> dict[tuple, np.ndarray]:
        return {p: _softmax(logits) for p, logits in self.base_logits.items()}

    def values(self, policy) -> dict[tuple, float]:
        """Exact V^policy for every prefix and leaf."""
        values = dict(self.rewards)
        for prefix in sorted(self.prefixes, key=len, reverse=True):
            values[prefix] = float(sum(policy[prefix][z] * values[prefix + (z,)] for z in range(self.vocab)))
        return values

    def expected_reward(self, policy) -> float:
        return self.values(policy)[()]

    def reweight(self, policy, values, beta: float):
        """pi'(z|s) ∝ pi(z|s) exp(V([s, z]) / beta): one step of KL-regularised improvement."""
        out = {}
        for prefix, probs in policy.items():
            scores = np.array([values[prefix + (z,)] for z in range(self.vocab)]) / beta
            out[prefix] = _normalise(probs * np.exp(scores - scores.max()))
        return out

    def closed_form(self, value_list, betas):
        """pi_0(z|s) exp(sum_k V_k([s, z]) / beta_k), normalised per prefix."""
        base = self.base_policy()
        out = {}
        for prefix, probs in base.items():
            scores = sum(np.array([v[prefix + (z,)] for z in range(self.vocab)]) / b
                         for v, b in zip(value_list, betas, strict=True))
            out[prefix] = _normalise(probs * np.exp(scores - np.max(scores)))
        return out

    def sample(self, policy, count: int, rng) -> list[tuple]:
        leaves = []
        for _ in range(count):
            prefix = ()
            while len(prefix) < self.horizon:
                prefix += (int(rng.choice(self.vocab, p=policy[prefix])),)
            leaves.append(prefix)
        return leaves

    def monte_carlo_values(self, leaves: list[tuple]) -> dict[tuple, float]:
        """The minimiser of sum over leaves and positions of (V(y_<t) - r(y))^2 with one value per prefix."""
        totals, counts = {}, {}
        for leaf in leaves:
            for t in range(self.horizon + 1):
                prefix = leaf[:t]
                totals[prefix] = totals.get(prefix, 0.0) + self.rewards[leaf]
                counts[prefix] = counts.get(prefix, 0) + 1
        return {p: totals[p] / counts[p] for p in totals}


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _normalise(x):
    return x / x.sum()
