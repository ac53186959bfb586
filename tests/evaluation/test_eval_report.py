"""The report's cost accounting, checked against numbers worked out by hand."""

import json

import pytest

from evaluation.report import (
    _alpaca_sections,
    cost_fields,
    matched_sizes,
    paired_rows,
    training_iterations,
)

N_EVAL = 10  # evaluation instructions


def _iteration(k: int, rollouts: dict, labels: dict, fit: tuple[int, int]) -> dict:
    """An iteration's stage records as the flow keeps them: the rollouts' and labels' compute and the
    value fit's report (forward, backward tokens)."""
    return {"iteration": k, "rollouts": {"compute": rollouts}, "labels": {"compute": labels},
            "value": {"report": {"epochs": 3, "forward_tokens": fit[0], "backward_tokens": fit[1]}}}


@pytest.fixture
def iterations():
    # iteration 1: pi_0 samples (no value model); 2 and 3: spi-(k-1)'s search with value backbones
    return [
        _iteration(1, {"generated_tokens": 1000, "policy_tokens": 1500},
                   {"reward_calls": 10, "reward_tokens": 2000}, (700, 0)),
        _iteration(2, {"generated_tokens": 2000, "policy_tokens": 2600, "value_tokens": 2600},
                   {"reward_calls": 10, "reward_tokens": 3000}, (5000, 4000)),
        _iteration(3, {"generated_tokens": 4000, "policy_tokens": 5000, "value_tokens": 9000},
                   {"reward_calls": 8, "reward_tokens": 4000}, (9000, 8000)),
    ]


def _decoded(tmp_path, name: str, compute: dict, boundaries: int = 0, beam_changes: int = 0) -> dict:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"boundaries": boundaries, "beam_changes": beam_changes}))
    return {"path": str(path), "compute": compute}


def test_spi_k_pays_for_the_first_k_iterations_in_every_unit(tmp_path, iterations):
    own = {"generated_tokens": 600, "policy_tokens": 900, "value_tokens": 1800, "reward_calls": 40,
           "reward_tokens": 500}
    row = {"system": "spi-2", "iteration": 2, "generated_tokens": 600}
    got = cost_fields(row, _decoded(tmp_path, "spi-2", own, 12, 3), iterations, N_EVAL)
    # training = iterations 1 and 2: rollouts, labels and the fits of V_1 and V_2 (forward + backward)
    training = {"generated_tokens": 3000, "policy_tokens": 4100, "value_tokens": 2600, "reward_tokens": 5000,
                "w2s_tokens": 0, "value_fit_tokens": 700 + 5000 + 4000, "reward_calls": 20}
    assert {k[len("training_"):]: v for k, v in got.items() if k.startswith("training_")} == {
        **training, "forward_tokens": 4100 + 2600 + 5000 + 9700}
    per = {unit: (own.get(unit, 0) + t) / N_EVAL for unit, t in training.items()}
    assert per == {"generated_tokens": 360, "policy_tokens": 500, "value_tokens": 440, "reward_tokens": 550,
                   "w2s_tokens": 0, "value_fit_tokens": 970, "reward_calls": 6}
    for unit, value in per.items():
        assert got[f"{unit}_per_instruction"] == pytest.approx(value)
    # forward tokens: every model's tokens (policy, value models, reward, w2s, value fitting), not generated
    assert got["forward_tokens_per_instruction"] == pytest.approx(500 + 440 + 550 + 0 + 970)
    assert got["beam_change_rate"] == pytest.approx(3 / 12)


def test_blockwise_cd_pays_for_iteration_one_weak_to_strong_for_its_pair_and_baselines_for_nothing(tmp_path, iterations):
    cd = cost_fields({"system": "blockwise-cd", "iteration": None, "generated_tokens": 500},
                     _decoded(tmp_path, "cd", {"generated_tokens": 500, "policy_tokens": 800, "value_tokens": 800}),
                     iterations, N_EVAL)
    assert cd["training_generated_tokens"] == 1000 and cd["training_value_fit_tokens"] == 700
    assert cd["generated_tokens_per_instruction"] == pytest.approx(150.0)  # (500 + 1000) / 10
    assert cd["reward_calls_per_instruction"] == pytest.approx(1.0)  # (0 + 10) / 10
    assert cd["forward_tokens_per_instruction"] == pytest.approx((800 + 1500 + 800 + 2000 + 700) / 10)
    assert cd["beam_change_rate"] is None  # no chunk boundaries: no rate
    w2s = cost_fields({"system": "weak-to-strong", "iteration": None, "generated_tokens": 300},
                      _decoded(tmp_path, "w2s", {"generated_tokens": 300, "policy_tokens": 450, "w2s_tokens": 900}),
                      iterations, N_EVAL)
    assert w2s["training_forward_tokens"] == 0
    assert w2s["w2s_tokens_per_instruction"] == pytest.approx(90.0)
    assert w2s["forward_tokens_per_instruction"] == pytest.approx((450 + 900) / 10)
    base = cost_fields({"system": "base-sampled", "iteration": None, "generated_tokens": 300},
                       _decoded(tmp_path, "base", {"generated_tokens": 300, "policy_tokens": 400}), iterations, N_EVAL)
    assert base["training_generated_tokens"] == 0 and base["generated_tokens_per_instruction"] == pytest.approx(30.0)
    assert base["forward_tokens_per_instruction"] == pytest.approx(40.0)
    assert [training_iterations(s, i) for s, i in [("spi-3", 3), ("blockwise-cd", None), ("best-of-n:8", None)]] == [3, 1, 0]


def test_matched_best_of_n_generates_spi_k_tokens_per_instruction():
    rows_per_prompt = 4  # the search's W*K rows
    rows = [
        # per leaf 800 / (10 * 4) = 20 tokens; 180 tokens per instruction -> N = 9
        {"system": "spi-1", "iteration": 1, "generated_tokens": 800, "generated_tokens_per_instruction": 180.0},
        # per leaf 600 / 40 = 15; 360 / 15 -> N = 24
        {"system": "spi-2", "iteration": 2, "generated_tokens": 600, "generated_tokens_per_instruction": 360.0},
        # per leaf 400 / 40 = 10; 20 / 10 = 2 -> at least the W*K rows the search decodes: 4
        {"system": "spi-3", "iteration": 3, "generated_tokens": 400, "generated_tokens_per_instruction": 20.0},
        {"system": "spi-4", "iteration": 4, "generated_tokens": 0, "generated_tokens_per_instruction": 0.0},  # skipped
        {"system": "base-sampled", "iteration": None, "generated_tokens": 300, "generated_tokens_per_instruction": 30.0},
    ]
    assert matched_sizes(rows, rows_per_prompt, N_EVAL) == {1: 9, 2: 24, 3: 4}
    assert matched_sizes(rows, rows_per_prompt, N_EVAL, "generated_tokens") == {1: 9, 2: 24, 3: 4}


def test_matched_best_of_n_on_forward_tokens_prices_a_leaf_by_the_measured_best_of_n():
    rows = [
        {"system": "spi-1", "iteration": 1, "generated_tokens": 800, "forward_tokens_per_instruction": 3000.0},
        {"system": "spi-2", "iteration": 2, "generated_tokens": 600, "forward_tokens_per_instruction": 7500.0},
        # best-of-n (N = W*K = 4): 1000 forward tokens per instruction -> 250 per leaf
        {"system": "best-of-n", "iteration": None, "generated_tokens": 500, "forward_tokens_per_instruction": 1000.0},
    ]
    assert matched_sizes(rows, 4, N_EVAL, "forward_tokens") == {1: 12, 2: 30}
    with pytest.raises(ValueError, match="needs the best-of-n baseline"):
        matched_sizes(rows[:2], 4, N_EVAL, "forward_tokens")
    with pytest.raises(ValueError, match="unit 'flops'"):
        matched_sizes(rows, 4, N_EVAL, "flops")


def _judged(tmp_path, name: str, preferences: list[float]) -> tuple[dict, dict]:
    path = tmp_path / f"judge-{name}.json"
    path.write_text(json.dumps({"annotations": [{"index": i, "preference": p} for i, p in enumerate(preferences)]}))
    return {}, {"path": str(path)}


def _row(system, iteration, win_rate, forward, **extra):
    return {"system": system, "iteration": iteration, "mean_reward": 0.1, "win_rate": win_rate,
            "win_rate_ci_low": win_rate - 5, "win_rate_ci_high": win_rate + 5, "length_controlled_winrate": None,
            "not_available": {"length_controlled_winrate": "too few"}, "generated_tokens": 100,
            "generated_tokens_per_instruction": 10.0, "forward_tokens_per_instruction": forward,
            "reward_calls_per_instruction": 1.0, "beam_change_rate": None, "policy_tokens_per_instruction": 12.0,
            "value_tokens_per_instruction": 0.0, "reward_tokens_per_instruction": 5.0,
            "w2s_tokens_per_instruction": 0.0, "value_fit_tokens_per_instruction": 0.0, **extra}


def test_the_report_names_the_unit_of_each_comparison(tmp_path):
    rows = [_row("base-sampled", None, 40.0, 17.0), _row("spi-1", 1, 50.0, 900.0),
            _row("best-of-n:48", None, 45.0, 880.0, matches="spi-1", matched_unit="forward_tokens")]
    prefs = {"base-sampled": [1.0, 2.0, 1.0, 1.0, 2.0, 1.0], "spi-1": [2.0, 2.0, 1.0, 2.0, 2.0, 1.0],
             "best-of-n:48": [1.0, 2.0, 2.0, 1.0, 2.0, 1.0]}
    judged = {name: _judged(tmp_path, name, p) for name, p in prefs.items()}
    paired = paired_rows(rows, judged)
    assert [(p["against"], p["why"]) for p in paired] == [("base-sampled", "best baseline"),
                                                           ("best-of-n:48", "same forward tokens")]
    lines = _alpaca_sections(rows, paired)
    table_end = lines.index("| best-of-n:48 (= spi-1 forward tokens) | - | 0.1000 | 45.00 | [40.0, 50.0] "
                            "| n/a (too few) | 100 | 10 | 880 | 1.0 | n/a |")
    assert lines[table_end + 2].startswith("Units: tokens are real tokens per evaluation instruction")
    assert "Budget-matched Best-of-N (best-of-n:N (= spi-k)) matches spi-k's forward tokens per instruction" \
        in lines[table_end + 2]
    assert "| spi-1 | 10 | 12 | 0 | 5 | 0 | 0 | 900 |" in lines  # the compute by model
    # under the paired table too
    assert lines[-1] == lines[table_end + 2]
    generated_only = _alpaca_sections(rows[:2], [])
    assert any(line.endswith("every comparison is at each system's own compute.") for line in generated_only)


def test_the_value_fits_table_shows_what_each_fit_cost(iterations):
    from evaluation.report import _value_fits

    for it in iterations:
        it["labels"]["stats"] = {"reward_mean": 0.1, "reward_best_mean": 0.2}
        it["value"]["report"].update(train_sequences=32, seconds=1.25)
    lines = _value_fits(iterations)
    assert "| fit: examples | epochs | tokens forward | tokens backward | seconds |" in lines[5]
    assert lines[-1].endswith("| n/a | 32 | 3 | 9000 | 8000 | 1.2 |")
