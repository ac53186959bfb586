"""Raw win rates against the public leaderboard, bootstrap CIs and paired comparisons."""

import numpy as np
import pandas as pd
import pytest

from evaluation.data import load_eval_set, model_files, read_indexed
from evaluation.metrics import bootstrap_ci, paired_comparison, win_rate_ci, win_rate_metrics
from tests.evaluation.alpaca_data import DATA, needs

needs_data = needs("preferences")


@needs_data
def test_raw_win_rates_equal_the_leaderboard_for_every_model():
    es = load_eval_set(DATA)
    published = pd.read_csv(DATA / "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv", index_col=0)
    files = model_files(DATA / "preferences")
    assert len(files) >= 30
    for model, path in files.items():
        prefs = read_indexed(path, "preference", es)
        m = win_rate_metrics(list(prefs.values()))
        row = published.loc[model]
        assert m["win_rate"] == pytest.approx(row["win_rate"], abs=1e-6), model
        assert m["standard_error"] == pytest.approx(row["standard_error"], abs=1e-6), model
        assert m["discrete_win_rate"] == pytest.approx(row["discrete_win_rate"], abs=1e-6), model
        assert (m["n_wins"], m["n_wins_base"], m["n_draws"], m["n_total"]) == (
            row["n_wins"], row["n_wins_base"], row["n_draws"], row["n_total"]), model


def test_counts_and_discrete_rate():
    m = win_rate_metrics([1.0, 2.0, 1.5, 1.9])
    assert (m["n_wins"], m["n_wins_base"], m["n_draws"]) == (2, 1, 1)
    assert m["discrete_win_rate"] == pytest.approx(100 * 2.5 / 4)
    assert m["win_rate"] == pytest.approx(100 * (0 + 1 + 0.5 + 0.9) / 4)
    with pytest.raises(ValueError):
        win_rate_metrics([1.0, 2.1])


def test_bootstrap_ci_contains_point_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 200, 800):
        prefs = 1 + rng.beta(2, 3, size=n)
        point, low, high = win_rate_ci(prefs, n_boot=1000, seed=1)
        assert low < point < high
        assert point == pytest.approx(100 * (prefs - 1).mean())
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.35)  # ~ 1/sqrt(n)
    point, low, high = bootstrap_ci([1.0, 3.0, 2.0, 5.0], statistic=np.median, n_boot=200)
    assert low <= point <= high


def test_paired_comparison_detects_a_real_difference_only():
    rng = np.random.default_rng(0)
    base = 1 + rng.beta(2, 2, size=400)
    same = paired_comparison(base, base)
    assert same["mean_difference"] == 0 and same["p_value"] == 1.0
    better = np.clip(base + 0.08 + rng.normal(0, 0.05, size=400), 1, 2)
    res = paired_comparison(better, base)
    assert res["ci_low"] > 0 and res["p_value"] < 0.01
    noise = np.clip(base + rng.normal(0, 0.05, size=400), 1, 2)
    assert paired_comparison(noise, base)["p_value"] > 0.01
    with pytest.raises(ValueError):
        paired_comparison(base, base[:-1])
