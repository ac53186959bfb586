import filecmp

import pytest

from mlflow_store import registry as R
from mlflow_store import tracking as T


def _child(tracking_uri, iteration):
    parent = T.start_experiment_run(tracking_uri, "reg", {"x": 1}, "dig", "v")
    return T.find_or_create_child_run(tracking_uri, parent, "spi", iteration)


def _same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    files = [p.relative_to(a) for p in a.rglob("*") if p.is_file()]
    assert sorted(files) == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    return not cmp.diff_files


def _judged_child(tracking_uri, iteration, tmp_path, prefs, judge="length:scale=1.0"):
    """A child run that logged the judge stage's file: preference prefs[i] on instruction i."""
    import json

    run = _child(tracking_uri, iteration)
    annotations = [{"index": i, "instruction": f"q{i}", "reference": f"r{i}", "output": f"o{i}-{iteration}",
                    "preference": p} for i, p in enumerate(prefs)]
    path = tmp_path / f"judged-{iteration}" / "judge.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"judge": judge, "annotations": annotations}))
    T.log_artifacts(tracking_uri, run, path, R.ANNOTATIONS_ARTIFACT)
    return run


BASE = [1.2, 1.4, 1.5, 1.3, 1.6, 1.2, 1.4, 1.5, 1.3, 1.6] * 3  # 30 instructions


def test_register_versions_aliases_and_promotion(tracking_uri, value_folder, tmp_path):
    from evaluation.metrics import promotion_gate

    client = T.client_for(tracking_uri)
    v1 = R.register_value_model(
        tracking_uri, "value-tiny", _judged_child(tracking_uri, 1, tmp_path, BASE), value_folder("a"),
        {"win_rate": 40.0, "lc_win_rate": 38.5},
    )
    assert v1 == "1"
    mv = client.get_model_version_by_alias("value-tiny", "candidate")
    assert str(mv.version) == "1" and float(mv.tags["win_rate"]) == 40.0 and float(mv.tags["lc_win_rate"]) == 38.5

    first = R.promote(tracking_uri, "value-tiny", 1.0, promotion_gate)
    assert first.promoted and first.champion_version is None and "no champion" in first.reason
    assert str(client.get_model_version_by_alias("value-tiny", "champion").version) == "1"
    assert client.get_model_version("value-tiny", "1").tags[R.TAG_PROMOTION] == first.reason

    again = R.promote(tracking_uri, "value-tiny", 1.0, promotion_gate)
    assert not again.promoted and "already the champion" in again.reason

    # better on average (+2 points), but the paired interval's lower bound is not above the margin
    noisy = [p + d for p, d in zip(BASE, [0.3, -0.2, 0.1, -0.1, 0.2, -0.2, 0.2, 0.1, -0.2, 0.1] * 3, strict=True)]
    assert sum(noisy) > sum(BASE)
    R.register_value_model(tracking_uri, "value-tiny", _judged_child(tracking_uri, 2, tmp_path, noisy),
                           value_folder("b"), {"win_rate": 99.0})  # a point estimate the gate ignores
    held = R.promote(tracking_uri, "value-tiny", 0.0, promotion_gate)
    assert not held.promoted and (held.candidate_version, held.champion_version) == ("2", "1")
    assert held.ci_low <= 0.0 < held.mean_difference and "does not exceed margin 0" in held.reason
    assert str(client.get_model_version_by_alias("value-tiny", "champion").version) == "1"
    tags = client.get_model_version("value-tiny", "2").tags
    assert tags[R.TAG_PROMOTION] == held.reason and tags["spi.promotion.decision"] == "not promoted"
    assert float(tags["spi.promotion.ci_low"]) == pytest.approx(held.ci_low)
    assert tags["spi.promotion.instructions"] == ",".join(str(i) for i in range(30))

    # consistently better by 10 points: the lower bound clears a margin of 5, not one of 15
    better = [p + 0.1 for p in BASE]
    v3 = R.register_value_model(tracking_uri, "value-tiny", _judged_child(tracking_uri, 3, tmp_path, better),
                                value_folder("c"), {"win_rate": 45.0})
    assert not R.promote(tracking_uri, "value-tiny", 15.0, promotion_gate).promoted
    decision = R.promote(tracking_uri, "value-tiny", 5.0, promotion_gate)
    assert decision.promoted and decision.champion_version == "1" and "exceeds margin 5" in decision.reason
    assert decision.ci_low > 5.0 and len(decision.instructions) == 30
    assert str(client.get_model_version_by_alias("value-tiny", "champion").version) == v3
    assert R.metric_of(tracking_uri, "value-tiny", "champion", "win_rate") == 45.0

    # champion comes back byte-identical; a version number works too
    out = R.load_registered_value_model("value-tiny", "champion", tracking_uri, tmp_path / "dl")
    assert _same_tree(value_folder("c"), out)
    old = R.load_registered_value_model("value-tiny", 1, tracking_uri, tmp_path / "dl1")
    assert _same_tree(value_folder("a"), old)


def test_a_negative_margin_is_refused(tracking_uri, value_folder, tmp_path):
    from evaluation.metrics import promotion_gate

    R.register_value_model(tracking_uri, "neg", _judged_child(tracking_uri, 1, tmp_path, BASE), value_folder("a"))
    with pytest.raises(ValueError, match="margin must be >= 0"):
        R.promote(tracking_uri, "neg", -1.0, promotion_gate)
    assert "champion" not in T.client_for(tracking_uri).get_registered_model("neg").aliases


def test_versions_without_judgements_or_with_other_judges_are_not_promoted(tracking_uri, value_folder, tmp_path):
    from evaluation.metrics import promotion_gate

    R.register_value_model(tracking_uri, "pair", _judged_child(tracking_uri, 1, tmp_path, BASE), value_folder("a"))
    assert R.promote(tracking_uri, "pair", 0.0, promotion_gate).promoted
    R.register_value_model(tracking_uri, "pair", _child(tracking_uri, 2), value_folder("b"), {"win_rate": 99})
    lacking = R.promote(tracking_uri, "pair", 0.0, promotion_gate)
    assert not lacking.promoted and "version 2 logged no judge_annotations" in lacking.reason
    better = [p + 0.2 for p in BASE]
    R.register_value_model(tracking_uri, "pair", _judged_child(tracking_uri, 3, tmp_path, better, judge="other"),
                           value_folder("c"))
    other = R.promote(tracking_uri, "pair", 0.0, promotion_gate)
    assert not other.promoted and "different judges" in other.reason


def test_register_is_idempotent_for_same_run_and_folder(tracking_uri, value_folder):
    run = _child(tracking_uri, 1)
    folder = value_folder("a")
    assert R.register_value_model(tracking_uri, "vm", run, folder, {"win_rate": 1.0}) == "1"
    assert R.register_value_model(tracking_uri, "vm", run, folder, {"win_rate": 2.0}) == "1"
    assert R.metric_of(tracking_uri, "vm", "candidate", "win_rate") == 2.0
    assert len(T.client_for(tracking_uri).search_model_versions("name = 'vm'")) == 1


def test_stages_are_mirrored_when_asked(tracking_uri, value_folder, tmp_path):
    from evaluation.metrics import promotion_gate

    client = T.client_for(tracking_uri)
    R.register_value_model(tracking_uri, "staged", _judged_child(tracking_uri, 1, tmp_path, BASE), value_folder("a"))
    assert R.promote(tracking_uri, "staged", 0, promotion_gate, use_stages=True).promoted
    worse = [p - 0.1 for p in BASE]
    R.register_value_model(tracking_uri, "staged", _judged_child(tracking_uri, 2, tmp_path, worse), value_folder("b"))
    assert not R.promote(tracking_uri, "staged", 0, promotion_gate, use_stages=True).promoted
    assert client.get_model_version("staged", "1").current_stage == "Production"
    assert client.get_model_version("staged", "2").current_stage == "Staging"
    better = [p + 0.1 for p in BASE]
    R.register_value_model(tracking_uri, "staged", _judged_child(tracking_uri, 3, tmp_path, better), value_folder("c"))
    assert R.promote(tracking_uri, "staged", 0, promotion_gate, use_stages=True).promoted
    assert client.get_model_version("staged", "3").current_stage == "Production"
    assert client.get_model_version("staged", "1").current_stage == "Archived"


def test_unknown_registry_name_lists_existing(tracking_uri, value_folder, tmp_path):
    R.register_value_model(
        tracking_uri, "exists-1", _child(tracking_uri, 1), value_folder("a"), {"win_rate": 1}
    )
    with pytest.raises(R.RegistryError, match=r"no registered model named 'missing'.*existing: exists-1"):
        R.promote(tracking_uri, "missing", margin=1)
    with pytest.raises(R.RegistryError, match="existing: exists-1"):
        R.load_registered_value_model("missing", "champion", tracking_uri, tmp_path / "x")
    with pytest.raises(R.RegistryError, match=r"no version or alias 'champion'.*candidate"):
        R.load_registered_value_model("exists-1", "champion", tracking_uri, tmp_path / "x")


def test_load_detects_tampered_artifacts(tracking_uri, value_folder, tmp_path):
    run = _child(tracking_uri, 1)
    R.register_value_model(tracking_uri, "tamper", run, value_folder("a"), {"win_rate": 1})
    stored = T.artifact_uri(tracking_uri, run, "value_model/head.safetensors")
    from urllib.parse import urlparse

    with open(urlparse(stored).path, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(R.RegistryError, match="does not match its registered digest"):
        R.load_registered_value_model("tamper", "candidate", tracking_uri, tmp_path / "dl")


def test_tree_digest_sees_names_and_bytes(value_folder):
    from spi.stagefiles import tree_digest

    a = value_folder("a")
    before = tree_digest(a)
    assert tree_digest(a) == before
    (a / "value.json").rename(a / "other.json")
    assert tree_digest(a) != before
