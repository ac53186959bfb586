"""Win-rate metrics over per-instruction preferences p in [1, 2] (2 = the model's output better).

Conventions follow AlpacaEval's ``get_winrate``: raw win rate = 100 * mean(p - 1); a win is p > 1.5,
a loss p < 1.5, a draw p == 1.5; discrete win rate = 100 * (wins + draws / 2) / n; standard errors
are the standard error of the mean (ddof=1) times 100.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _as_array(preferences: Sequence[float]) -> np.ndarray:
    p = np.asarray(list(preferences), dtype=float)
    if p.ndim != 1 or len(p) == 0:
        raise ValueError("need a non-empty sequence of preferences")
    if not np.all(np.isfinite(p)) or p.min() < 1 or p.max() > 2:
        raise ValueError("preferences must be finite numbers in [1, 2]")
    return p


def _sem(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def win_rate_metrics(preferences: Sequence[float]) -> dict[str, float]:
    """Raw and discrete win rates with standard errors and win/draw counts."""
    p = _as_array(preferences)
    soft = p - 1.0
    wins, losses = int((p > 1.5).sum()), int((p < 1.5).sum())
    draws = len(p) - wins - losses
    discrete = (p > 1.5) + 0.5 * (p == 1.5)
    return {
        "win_rate": 100.0 * float(soft.mean()),
        "standard_error": 100.0 * _sem(soft),
        "n_wins": wins,
        "n_wins_base": losses,
        "n_draws": draws,
        "n_total": len(p),
        "discrete_win_rate": 100.0 * float(discrete.mean()),
        "discrete_standard_error": 100.0 * _sem(discrete.astype(float)),
    }


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point estimate, low, high): percentile bootstrap over instructions (rows of ``values``)."""
    x = np.asarray(list(values), dtype=float)
    if len(x) < 2:
        raise ValueError("bootstrap needs at least two instructions")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    if statistic is np.mean:
        stats = x[idx].mean(axis=1)
    else:
        stats = np.array([statistic(x[i]) for i in idx])
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(statistic(x)), float(low), float(high)


def win_rate_ci(preferences: Sequence[float], **kwargs) -> tuple[float, float, float]:
    """Raw win rate (points) with a bootstrap confidence interval over instructions."""
    p = _as_array(preferences)
    point, low, high = bootstrap_ci(100.0 * (p - 1.0), **kwargs)
    return point, low, high


def paired_comparison(
    preferences_a: Sequence[float],
    preferences_b: Sequence[float],
    *,
    n_boot: int = 5000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """Compare systems A and B judged against the same references on the same instructions.

    Returns the mean difference of win rates (A - B, points), its bootstrap CI over instructions, a
    two-sided bootstrap p-value (from the sign-flipped, centred bootstrap distribution) and a
    paired t-test p-value for reference.
    """
    from scipy import stats

    a, b = _as_array(preferences_a), _as_array(preferences_b)
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same instructions: {len(a)} vs {len(b)} preferences")
    d = 100.0 * (a - b)
    point, low, high = bootstrap_ci(d, n_boot=n_boot, alpha=alpha, seed=seed)
    rng = np.random.default_rng(seed + 1)
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    centred = boot - d.mean()
    p_boot = float((np.abs(centred) >= abs(d.mean())).mean())
    p_t = float(stats.ttest_rel(a, b).pvalue) if np.any(d != 0) else 1.0
    return {
        "mean_difference": point,
        "ci_low": low,
        "ci_high": high,
        "p_value": max(p_boot, 1.0 / n_boot),
        "p_value_t": p_t,
        "n": len(d),
    }
