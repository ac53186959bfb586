"""Numbers that need a sample size are "not available, because ..." below it, never a number; the
promotion gate's rules (a paired interval against a margin that cannot be negative)."""

import numpy as np
import pytest

from evaluation.judging import annotation_metrics
from evaluation.length_control import MIN_LC_INSTRUCTIONS, fit_soft_logistic_cv, length_controlled_win_rate
from evaluation.metrics import (
    MIN_BOOTSTRAP_INSTRUCTIONS,
    NotEstimable,
    check_margin,
    paired_comparison,
    promotion_gate,
    win_rate_ci,
)
from evaluation.report import paired_rows, shown


def _annotations(n, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    prefs = np.clip(rng.uniform(1.1, 1.9, n) + shift, 1.0, 2.0)
    return [{"index": i, "instruction": f"q{i}", "reference": "r" * (50 + 7 * i),
             "output": "o" * int(30 + 90 * rng.random()), "preference": float(p)} for i, p in enumerate(prefs)]


def test_four_instructions_show_no_lc_and_no_interval():
    m = annotation_metrics(_annotations(4))
    assert m["win_rate"] == pytest.approx(100 * np.mean([a["preference"] - 1 for a in _annotations(4)]))
    assert m["length_controlled_winrate"] is None and m["lc_standard_error"] is None
    assert m["win_rate_ci_low"] is None and m["win_rate_ci_high"] is None
    assert f"at least {MIN_LC_INSTRUCTIONS} instructions, got 4" in m["not_available"]["length_controlled_winrate"]
    assert f"at least {MIN_BOOTSTRAP_INSTRUCTIONS} instructions, got 4" in m["not_available"]["win_rate_ci"]
    assert shown(m["length_controlled_winrate"], ".2f", m["not_available"]["length_controlled_winrate"]).startswith(
        "n/a (a length-controlled win rate needs at least 30")


def test_the_thresholds_are_where_the_numbers_appear():
    below = annotation_metrics(_annotations(MIN_LC_INSTRUCTIONS - 1))
    at = annotation_metrics(_annotations(MIN_LC_INSTRUCTIONS))
    assert below["length_controlled_winrate"] is None and "length_controlled_winrate" in below["not_available"]
    assert 0 <= at["length_controlled_winrate"] <= 100 and "length_controlled_winrate" not in at["not_available"]
    assert below["win_rate_ci_low"] <= below["win_rate"] <= below["win_rate_ci_high"]  # intervals from 5 on
    with pytest.raises(NotEstimable):
        win_rate_ci([1.2, 1.7, 1.5, 1.4])
    assert win_rate_ci([1.2, 1.7, 1.5, 1.4, 1.6])[1] is not None


def test_one_instruction_has_no_standard_error():
    m = annotation_metrics(_annotations(1))
    assert m["standard_error"] is None and "standard_error" in m["not_available"]


def test_a_glm_that_does_not_converge_is_not_a_number():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3)) * 1e3
    y = (X[:, 0] > 0).astype(float)  # separable at a huge scale: liblinear needs many iterations
    with pytest.raises(NotEstimable, match="did not converge"):
        fit_soft_logistic_cv(X, y, n_splits=1, Cs=(1e4,), max_iter=1)
    anns = _annotations(40)
    lc = length_controlled_win_rate({a["index"]: a["preference"] for a in anns},
                                    {a["index"]: a["output"] for a in anns},
                                    {a["index"]: a["reference"] for a in anns})
    assert 0 <= lc["length_controlled_winrate"] <= 100  # the same call converges at the default budget


def test_report_pairs_too_few_instructions_as_not_available(tmp_path):
    import json

    few, other = _annotations(4), _annotations(4, seed=1)
    judged = {}
    for name, anns in (("spi-1", few), ("base", other)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"annotations": anns}))
        judged[name] = ({}, {"path": str(tmp_path / f"{name}.json")})
    rows = [{"system": "spi-1", "iteration": 1, "win_rate": 50.0}, {"system": "base", "iteration": None, "win_rate": 40.0}]
    paired = paired_rows(rows, judged)
    assert paired[0]["ci_low"] is None and "at least 5 instructions" in paired[0]["not_available"]
    with pytest.raises(NotEstimable):
        paired_comparison([a["preference"] for a in few], [a["preference"] for a in other])


def test_margin_cannot_be_negative():
    assert check_margin(0) == 0.0 and check_margin("1.5") == 1.5
    for bad in (-1, -1e-9, float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
            check_margin(bad)
    with pytest.raises(ValueError, match="margin"):
        promotion_gate({"judge": "j", "annotations": []}, {"judge": "j", "annotations": []}, -1)


def test_gate_promotes_on_the_lower_bound_not_the_point_estimate():
    champ = _annotations(40)
    noisy = [{**a, "preference": float(np.clip(a["preference"] + (0.25 if i % 2 else -0.2), 1, 2))}
             for i, a in enumerate(champ)]
    gate = promotion_gate({"judge": "j", "annotations": noisy}, {"judge": "j", "annotations": champ}, 0.0)
    assert gate["mean_difference"] > 0 and gate["ci_low"] <= 0 and not gate["promoted"]
    steady = [{**a, "preference": min(2.0, a["preference"] + 0.05)} for a in champ]
    gate = promotion_gate({"judge": "j", "annotations": steady}, {"judge": "j", "annotations": champ}, 1.0)
    assert gate["ci_low"] > 1.0 and gate["promoted"] and gate["instructions"] == list(range(40))


def test_gate_pairs_only_the_shared_instructions_of_one_judge():
    champ = _annotations(40)
    cand = [{**a, "preference": min(2.0, a["preference"] + 0.05)} for a in champ[:20]]
    gate = promotion_gate({"judge": "j", "annotations": cand}, {"judge": "j", "annotations": champ}, 0.0)
    assert gate["n"] == 20 and gate["instructions"] == list(range(20))
    other = promotion_gate({"judge": "k", "annotations": cand}, {"judge": "j", "annotations": champ}, 0.0)
    assert not other["promoted"] and "different judges" in other["reason"]
    few = promotion_gate({"judge": "j", "annotations": cand[:3]}, {"judge": "j", "annotations": champ}, 0.0)
    assert not few["promoted"] and few["ci_low"] is None and "at least 5 instructions" in few["reason"]


def test_the_gate_pairs_verified_outputs_by_prompt_on_prompt_level_strict_accuracy():
    """ifeval versions carry the verify stage's file: paired by prompt, scored by all constraints followed."""
    def verified(followed):
        return {"judge": "ifeval-verifiers", "annotations": [
            {"index": i, "instruction": f"prompt {i}", "strict": [ok, True]} for i, ok in enumerate(followed)]}

    better, worse = verified([True] * 24 + [False] * 6), verified([False] * 24 + [True] * 6)
    decision = promotion_gate(better, worse, margin=10.0)
    assert decision["promoted"] and decision["n"] == 30 and decision["mean_difference"] == pytest.approx(60.0)
    assert not promotion_gate(worse, better, margin=0.0)["promoted"]
