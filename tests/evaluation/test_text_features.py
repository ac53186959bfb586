"""The text-statistics judge (local:text-bt): its features on hand-made answers, its per-instruction offsets
on a synthetic case, and on the AlpacaEval data that it judges held-out models better than length alone and
that the offsets help unseen models on known instructions while changing nothing elsewhere."""

import numpy as np
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


def test_offsets_recover_instruction_effects_and_shrink_with_few_rows():
    from evaluation.trained_judge import _fit_offsets

    rng = np.random.default_rng(0)
    truth = {f"k{j}": float(v) for j, v in enumerate(rng.normal(0, 1.5, 40))}
    keys = [f"k{j}" for j in range(40) for _ in range(200)]
    z = rng.normal(0, 1, len(keys))
    y = 1 / (1 + np.exp(-(z + np.array([truth[k] for k in keys]))))  # soft labels: the expected preference
    offsets = _fit_offsets(z, y, keys, strength=100.0)
    assert np.corrcoef([offsets[k] for k in truth], list(truth.values()))[0, 1] > 0.99
    assert max(abs(offsets[k] - v) for k, v in truth.items()) < 0.1
    few = _fit_offsets(z[:2], y[:2], keys[:2], strength=0.01)  # a strong prior: two rows barely move it
    assert abs(few["k0"]) < 0.05 * abs(truth["k0"]) + 1e-3


@needs("preferences")
def test_offsets_help_unseen_models_on_known_instructions_only():
    """Trained on 26 models x all 805 instructions; tested on the other 11 models. Measured 2026-12-02 (seed 0):
    AUC 0.874 -> 0.922 and win-rate MAE 10.0 -> 6.2 points with the offsets."""
    from evaluation.data import load_eval_set
    from evaluation.trained_judge import (
        TrainedJudge,
        agreement_metrics,
        collect_pairs,
        split_models_and_instructions,
    )

    eval_set = load_eval_set(DATA / "eval_set.jsonl")
    refs = {e["index"]: e for e in eval_set}
    pairs = collect_pairs(eval_set, DATA / "outputs", DATA / "preferences")
    train_models, test_models, _, _ = split_models_and_instructions(sorted({p[0] for p in pairs}), [0])
    train = [p for p in pairs if p[0] in train_models]
    test = [p for p in pairs if p[0] in test_models]

    def columns(rows):
        return ([refs[i]["instruction"] for _, i, _, _ in rows], [o for _, _, o, _ in rows],
                [refs[i]["reference_output"] for _, i, _, _ in rows], [p for *_, p in rows])

    q, o, r, p = columns(train)
    groups = [m for m, *_ in train]
    plain = TrainedJudge.fit(q, o, r, p, backbone=None, text_features=True, groups=groups)
    offset = TrainedJudge.fit(q, o, r, p, backbone=None, text_features=True, groups=groups, instruction_offsets=True)
    np.testing.assert_array_equal(plain.coef, offset.coef)  # the offsets sit on top of the same scores
    assert len(offset.offsets) == 805 and offset.meta["offset_strength"] > 0
    q, o, r, p = columns(test)
    before = agreement_metrics([m for m, *_ in test], plain.probability(q, o, r), p)
    after = agreement_metrics([m for m, *_ in test], offset.probability(q, o, r), p)
    print(f"\nunseen models x all instructions: without offsets {before}\nwith offsets {after}")
    assert after["auc_decisive"] > before["auc_decisive"] + 0.02
    assert after["winrate_error"] < before["winrate_error"] - 1.0
    other_reference = [x + " (another reference)" for x in r[:50]]  # no offset for a reference it never saw
    np.testing.assert_allclose(offset.probability(q[:50], o[:50], other_reference),
                               plain.probability(q[:50], o[:50], other_reference))


def test_the_length_term_can_be_dropped_lc_style():
    from evaluation.judges import resolve_judge

    with_length = resolve_judge("local:text-bt")
    without = resolve_judge("local:text-bt", with_length=False)
    assert without.identity == with_length.identity + ":nolen" and without.coef[-1] == 0.0
    short, padded = "Yes, it is.", "Yes, it is." + " " * 40  # the same text statistics, another length
    reference = ["No."]
    assert with_length.probability(["Q?"], [padded], reference)[0] != with_length.probability(["Q?"], [short], reference)[0]
    assert without.probability(["Q?"], [padded], reference)[0] == without.probability(["Q?"], [short], reference)[0]
