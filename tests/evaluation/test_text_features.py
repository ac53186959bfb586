"""The text-statistics judge (local:text-bt): its features on hand-made answers, and on the AlpacaEval data
that it ranks held-out models better than length alone and than frozen embeddings do."""

import pytest

from evaluation.text_features import FEATURE_NAMES, text_statistics, text_statistics_matrix
from tests.evaluation.alpaca_data import DATA, needs


def features(answer: str) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, text_statistics(answer), strict=True))


def test_structure_is_counted():
    answer = "# Plan\n\n1. Mix **flour** and water.\n2. Bake.\n- Serve\n\n```py\nprint(1)\n```\nDone."
    f = features(answer)
    assert f["log_headers"] == pytest.approx(0.6931, abs=1e-3)  # log1p(1)
    assert f["log_list_items"] == pytest.approx(1.3863, abs=1e-3)  # log1p(3): "1.", "2.", "-"
    assert f["log_bold_spans"] == pytest.approx(0.6931, abs=1e-3) and f["log_code_blocks"] > 0
    assert f["ends_mid_sentence"] == 0.0 and f["refusal_opening"] == 0.0


def test_degenerate_answers_are_flagged():
    looping = "The answer is yes. " * 30
    assert features(looping)["repeated_trigrams"] > 0.9
    assert features("Paris is the capital of France.")["repeated_trigrams"] == 0.0
    assert features("line a\nline a\nline b\nline a")["repeated_lines"] == pytest.approx(0.5)
    assert features("I'm sorry, but I cannot help with that.")["refusal_opening"] == 1.0
    assert features("The recipe needs three cups of")["ends_mid_sentence"] == 1.0
    assert features("")["ends_mid_sentence"] == 1.0 and features("")["log_lines"] == 0.0


def test_typography():
    assert features("Cafe deja vu")["log_typographic_marks"] == 0.0
    assert features("It\u2019s \u201cfine\u201d \u2014 really\u2026")["log_typographic_marks"] == pytest.approx(1.7918, abs=1e-3)


def test_matrix_shape_even_when_empty():
    assert text_statistics_matrix([]).shape == (0, len(FEATURE_NAMES))
    assert text_statistics_matrix(["a", "b c"]).shape == (2, len(FEATURE_NAMES))


@needs("preferences")
def test_text_statistics_rank_held_out_models_better_than_length():
    """Trained on 26 models x 563 instructions, tested on the other 11 models x 242 instructions (the split of
    judge-agreement). Measured 2026-12-02: text-bt AUC 0.866, model-rank Spearman 0.891; length-only
    0.846 / 0.800."""
    from evaluation.data import load_eval_set
    from evaluation.trained_judge import judge_agreement

    eval_set = load_eval_set(DATA / "eval_set.jsonl")
    result = judge_agreement(eval_set, DATA / "outputs", DATA / "preferences", backbone=None, text_features=True)
    text, length = result["judge"], result["length_only"]
    print(f"\ntext-bt: {text}\nlength-only: {length}")
    assert result["split"]["n_test_pairs"] > 2000 and len(result["split"]["test_models"]) == 11
    assert text["auc_decisive"] > length["auc_decisive"] + 0.01
    assert text["model_rank_spearman"] > length["model_rank_spearman"] + 0.05
    assert text["winrate_error"] < length["winrate_error"] - 1.0
