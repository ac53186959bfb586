"""Exact checks of the SPI algebra on a small tree (vocabulary 3, horizon 3)."""

import numpy as np
import pytest

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
