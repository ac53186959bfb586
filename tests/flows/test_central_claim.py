"""SPI's central claim as a test, through the experiment flow's own stages (flows.experiment.run_plain:
the loop, the stage functions, the verify stage and the paired report a `spi run` uses).

The model is small and its reward is decided as the tokens are written: tiny-char-llama writes 32
characters over a 12-character alphabet, and the verifier's constraint is "no comma" (one sample of pi_0
follows it about a quarter of the time). V_1 is fitted on pi_0's samples of 64 generated training
prompts, V_2 on independent draws of the policy V_1 guides; the systems are scored on 1024 held-out
generated prompts. The experiment runs with three seeds (training prompts' draws, fits and decoding).
"""

from dataclasses import replace
from pathlib import Path

import pytest

CLAIM = Path(__file__).with_name("claim.yaml")
SEEDS = (0, 1, 2)
HEADLINE = "prompt_level_strict_acc"


@pytest.fixture(scope="module")
def summaries(tmp_path_factory):
    from flows.experiment import run_plain

    return {seed: run_plain(str(CLAIM), {"seed": seed}, workdir=str(tmp_path_factory.mktemp(f"claim-{seed}")))
            for seed in SEEDS}


def paired(summary, a, b):
    [p] = [p for p in summary["paired"] if (p["a"], p["b"], p["metric"]) == (a, b, HEADLINE)]
    return p


def verdicts(summaries, system):
    """The system's per-prompt verdicts of every seed, keyed (seed, prompt): one pool of paired units."""
    from evaluation.ifeval_report import results_of

    return [replace(r, key=f"{seed}/{r.key}") for seed, summary in summaries.items()
            for r in results_of({"path": summary["outputs"][system]["judged"]})]


@pytest.mark.parametrize("seed", SEEDS)
def test_cbs_guided_by_the_fitted_value_beats_best_of_n_at_the_same_rows_and_tokens(summaries, seed):
    summary = summaries[seed]
    systems = summary["systems"]
    # same rows: W*K = 2*2 = N; same tokens: both decode 32 characters on every one of the 4 rows
    assert systems["spi-1"]["generated_tokens"] <= 1.05 * systems["best-of-n"]["generated_tokens"]
    p = paired(summary, "spi-1", "best-of-n")
    assert p["ci_low"] > 0, p  # the paired 95% interval over the 1024 prompts excludes 0
    assert p["diff"] >= 5.0, p  # and the margin is at least 5 points of prompt-level accuracy


@pytest.mark.parametrize("seed", SEEDS)
def test_the_fitted_value_ranks_held_out_samples(summaries, seed):
    assert summaries[seed]["value_fits"]["1"]["holdout_pair_accuracy"] >= 0.65


def test_the_second_iteration_improves_on_the_first(summaries):
    # spi-1 already follows the constraint on ~88% of the prompts, so V_2's gain is about one point:
    # per seed its interval may hold 0 (README, issue 14), pooled over the three seeds' 3 x 1024 paired
    # prompts it must exclude 0, and no seed may be significantly worse.
    from evaluation.ifeval import paired_differences

    pooled = {p["metric"]: p for p in paired_differences("spi-2", verdicts(summaries, "spi-2"),
                                                         "spi-1", verdicts(summaries, "spi-1"))}[HEADLINE]
    assert pooled["ci_low"] > 0, pooled
    for seed, summary in summaries.items():
        assert paired(summary, "spi-2", "spi-1")["ci_high"] >= 0, seed
