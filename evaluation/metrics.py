"""Win-rate metrics over per-instruction preferences p in [1, 2] (2 = the model's output better).

Conventions follow AlpacaEval's ``get_winrate``: raw win rate = 100 * mean(p - 1); a win is p > 1.5,
a loss p < 1.5, a draw p == 1.5; discrete win rate = 100 * (wins + draws / 2) / n; standard errors
are the standard error of the mean (ddof=1) times 100.

A number that needs a sample size is not computed below it: :class:`NotEstimable` says why, and the
caller reports the metric as not available with that reason (None, never a number). Intervals over
instructions need MIN_BOOTSTRAP_INSTRUCTIONS: below 5 a percentile bootstrap of a mean has at most
35 distinct resamples (4 instructions) and its "95%" interval is the sample's range, not an interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

MIN_BOOTSTRAP_INSTRUCTIONS = 5


class NotEstimable(ValueError):
    """A metric that cannot honestly be estimated from this sample (too few instructions, no convergence)."""


def require_instructions(n: int, minimum: int, what: str) -> None:
    """Raise :class:`NotEstimable` naming ``what`` when fewer than ``minimum`` instructions are given."""
    if n < minimum:
        raise NotEstimable(f"{what} needs at least {minimum} instructions, got {n}")


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
    require_instructions(len(p), MIN_BOOTSTRAP_INSTRUCTIONS, "a win-rate interval")
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
    paired t-test p-value for reference. :class:`NotEstimable` below MIN_BOOTSTRAP_INSTRUCTIONS.
    """
    from scipy import stats

    a, b = _as_array(preferences_a), _as_array(preferences_b)
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same instructions: {len(a)} vs {len(b)} preferences")
    require_instructions(len(a), MIN_BOOTSTRAP_INSTRUCTIONS, "a paired interval")
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


def check_margin(margin: float) -> float:
    """A promotion margin as a float; negative (promote a worse model) or not finite is an error."""
    value = float(margin)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"margin must be a finite number >= 0 (win-rate points the candidate must gain), got {margin}")
    return value


def _pair_key(annotation: dict) -> tuple:
    """A judged output pairs by (instruction, reference); a verified one (ifeval) by its prompt."""
    return annotation["instruction"], annotation.get("reference")


def _preference(annotation: dict) -> float:
    """A judge's preference in [1, 2]; for a verified output 1 + (every constraint followed, strict), so
    that differences read in points of prompt-level strict accuracy."""
    if "preference" in annotation:
        return annotation["preference"]
    return 1.0 + float(all(annotation["strict"]))


def promotion_gate(candidate: dict, champion: dict, margin: float, **kwargs) -> dict:
    """Should the candidate replace the champion? Both are judge payloads ({"judge", "annotations"}, the
    judge stage's file, or the verify stage's for ifeval). The instructions both were judged on, against
    the same reference by the same judge, are paired; promote iff the lower bound of the bootstrap interval of the paired win-rate
    difference (candidate - champion, points) exceeds ``margin`` (>= 0).

    Returns {promoted, reason, mean_difference, ci_low, ci_high, n, instructions (indices), margin};
    the interval fields are None where no interval could be formed (the reason says why)."""
    margin = check_margin(margin)
    result = {"promoted": False, "mean_difference": None, "ci_low": None, "ci_high": None, "n": 0,
              "instructions": [], "margin": margin}
    if candidate.get("judge") != champion.get("judge"):
        return {**result, "reason": f"judged by different judges ({candidate.get('judge')} vs "
                                    f"{champion.get('judge')}): no paired comparison"}
    champ = {_pair_key(a): a for a in champion["annotations"]}
    pairs = [(a, champ[_pair_key(a)]) for a in candidate["annotations"] if _pair_key(a) in champ]
    result.update(n=len(pairs), instructions=[a["index"] for a, _ in pairs])
    try:
        diff = paired_comparison([_preference(a) for a, _ in pairs], [_preference(b) for _, b in pairs], **kwargs)
    except NotEstimable as err:
        return {**result, "reason": f"not promoted: {err} judged for both"}
    promoted = diff["ci_low"] > margin
    verb = "exceeds" if promoted else "does not exceed"
    reason = (f"paired win-rate difference {diff['mean_difference']:+.2f} points on {len(pairs)} instructions, "
              f"95% CI [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}]: lower bound {verb} margin {margin:g}")
    return {**result, "promoted": promoted, "reason": reason, "mean_difference": diff["mean_difference"],
            "ci_low": diff["ci_low"], "ci_high": diff["ci_high"]}
