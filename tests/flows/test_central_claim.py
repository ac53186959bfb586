"""SPI's central claim as a test, through the experiment flow's own stages (flows.experiment.run_plain:
the loop, the stage functions, the verify stage and the paired report a `spi run` uses).

The model is small and its reward is decided as the tokens are written: tiny-char-llama writes 32
characters over a 12-character alphabet, and the verifier's constraint is "no comma" (one sample of pi_0
follows it about a quarter of the time). V_1 is fitted on pi_0's samples of 64 generated training
prompts, V_2 on draws of the policy V_1 guides; the systems are scored on 128 held-out generated prompts.
"""

from pathlib import Path

import pytest

CLAIM = Path(__file__).with_name("claim.yaml")


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    from flows.experiment import run_plain

    return run_plain(str(CLAIM), workdir=str(tmp_path_factory.mktemp("claim")))


def paired(summary, a, b):
    [p] = [p for p in summary["paired"] if (p["a"], p["b"], p["metric"]) == (a, b, "prompt_level_strict_acc")]
    return p


def test_cbs_guided_by_the_fitted_value_beats_best_of_n_at_the_same_rows_and_tokens(summary):
    systems = summary["systems"]
    # same rows: W*K = 2*2 = N; same tokens: both decode 32 characters on every one of the 4 rows
    assert systems["spi-1"]["generated_tokens"] <= 1.05 * systems["best-of-n"]["generated_tokens"]
    p = paired(summary, "spi-1", "best-of-n")
    assert p["ci_low"] > 0, p  # the paired 95% interval over the 128 prompts excludes 0
    assert p["diff"] >= 5.0, p  # and the margin is at least 5 points of prompt-level accuracy


def test_the_fitted_value_ranks_held_out_samples(summary):
    assert summary["value_fits"]["1"]["holdout_pair_accuracy"] >= 0.65


def test_the_second_iteration_is_not_worse(summary):
    # "V_1 + V_2 beats V_1" is not shown at this scale (README, issue 14): spi-1 already follows the
    # constraint on about 90% of the prompts and V_2, fitted on independent draws of the guided policy, only
    # re-ranks the rows where it disagrees with V_1. What must hold is that adding V_2/beta_2 does not make
    # the policy worse: the paired 95% interval against spi-1 reaches 0. (V_2 fitted on the beam search's
    # leaves, value.later_iterations: search-leaves, failed this at seed 0: -6.2 [-11.7, -0.8].)
    p = paired(summary, "spi-2", "spi-1")
    assert p["ci_high"] >= 0, p
