"""``spi eval judge-agreement --judge NAME``: an already-trained judge measured on every given model without
training, beside length-only and the recipes' default judge, with bootstrap intervals; and the metrics
themselves on hand-made cases."""

import json

import numpy as np
import pytest

from evaluation.agreement import default_judge_spec, measure
from evaluation.cli import main
from tests.evaluation.alpaca_data import DATA, needs

MODELS = ["alpaca-7b", "claude-2", "gpt4_1106_preview_verbose", "vicuna-7b"]


def test_measure_on_a_perfect_and_a_reversed_judge():
    rng = np.random.default_rng(0)
    models = np.repeat(["a", "b", "c", "d"], 50)
    instructions = np.tile(np.arange(50), 4)
    strength = {"a": -2.0, "b": -0.5, "c": 0.5, "d": 2.0}
    truth = 1 / (1 + np.exp(-np.array([strength[m] for m in models]) - rng.normal(0, 1, 200)))
    prefs = 1 + (truth > 0.5)  # GPT-4 decisive: 1 or 2
    perfect = measure(models, instructions, truth, prefs, n_boot=50)
    assert perfect["auc"] == pytest.approx(1.0) and perfect["model_rank_spearman"] == pytest.approx(1.0)
    reversed_ = measure(models, instructions, 1 - truth, prefs, n_boot=50)
    assert reversed_["auc"] == pytest.approx(0.0) and reversed_["model_rank_spearman"] == pytest.approx(-1.0)
    for key, (low, high) in perfect["intervals"].items():
        assert low <= perfect[key] + 1e-9 and perfect[key] <= high + 1e-9, key
    assert perfect["n_instructions"] == 50 and perfect["n_models"] == 4
    assert perfect["per_model"]["d"]["gpt4_win_rate"] > perfect["per_model"]["a"]["gpt4_win_rate"]


def test_the_default_judge_is_the_recipes():
    from spi.config import EvaluationConfig

    assert default_judge_spec() == EvaluationConfig().judge


@needs("preferences")
def test_judge_agreement_of_a_given_judge_writes_the_top_level_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("SPI_CACHE_DIR", str(tmp_path / "cache"))  # nothing trained or cached beforehand
    out = tmp_path / "agreement.json"
    code = main(["judge-agreement", "--judge", "length", "--eval-set", str(DATA / "eval_set.jsonl"),
                 "--outputs", str(DATA / "outputs"), "--preferences", str(DATA / "preferences"),
                 "--n", "40", "--no-current", "--n-boot", "50", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["judge"] == "length"
    for key in ("auc", "model_rank_spearman", "win_rate_mae"):
        low, high = result["intervals"][key]
        assert low <= result[key] <= high
    # 37 models less gpt4_1106_preview, whose outputs are the references
    assert result["n_models"] == 36 and result["n_instructions"] == 40 and result["held_out"] is False
    # the length judge and the length-only model order pairs by the same log length ratio: the same AUC
    assert result["auc"] == pytest.approx(result["baselines"]["length_only"]["auc"])
    assert result["difference_vs"]["length_only"]["auc"] == pytest.approx([0.0, 0.0], abs=1e-12)  # paired resamples
    low, high = result["difference_vs"]["length_only"]["win_rate_mae"]  # unscaled sigmoid vs fitted: worse win rates
    assert 0 < low <= high
    assert 0.6 < result["auc"] < 1.0


@needs("preferences")
@pytest.mark.parametrize(("mode", "n_models", "n_instructions"),
                         [(None, 11, 18), ("models", 11, 60), ("instructions", 36, 18)])
def test_held_out_evaluates_only_the_split_test_group(tmp_path, mode, n_models, n_instructions):
    out = tmp_path / "agreement.json"
    held_out = ["--held-out"] + ([mode] if mode else [])  # alone: held-out models x held-out instructions
    code = main(["judge-agreement", "--judge", "length", *held_out, "--eval-set", str(DATA / "eval_set.jsonl"),
                 "--outputs", str(DATA / "outputs"), "--preferences", str(DATA / "preferences"),
                 "--n", "60", "--no-current", "--n-boot", "20", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["held_out"] == (mode or "both")
    assert result["n_models"] == n_models and result["n_instructions"] == n_instructions
    from evaluation.trained_judge import split_models_and_instructions

    all_models = sorted(p.name.removesuffix(".jsonl.gz") for p in (DATA / "preferences").glob("*.jsonl.gz")
                        if p.name != "gpt4_1106_preview.jsonl.gz")  # the references' own outputs: no pairs
    test_models = split_models_and_instructions(all_models, range(60), test_fraction=0.3, seed=0)[1]
    assert sorted(result["per_model"]) == (all_models if mode == "instructions" else test_models)


@needs("preferences")
def test_an_unknown_judge_is_one_clear_error(capsys):
    code = main(["judge-agreement", "--judge", "nope", "--eval-set", str(DATA / "eval_set.jsonl"),
                 "--outputs", str(DATA / "outputs"), "--preferences", str(DATA / "preferences"), "--n", "5"])
    assert code == 2 and "unknown judge 'nope'" in capsys.readouterr().err
