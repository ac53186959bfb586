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


def test_register_versions_aliases_and_promotion(tracking_uri, value_folder, tmp_path):
    client = T.client_for(tracking_uri)
    v1 = R.register_value_model(
        tracking_uri,
        "value-tiny",
        _child(tracking_uri, 1),
        value_folder("a"),
        {"win_rate": 40.0, "lc_win_rate": 38.5},
    )
    assert v1 == "1"
    mv = client.get_model_version_by_alias("value-tiny", "candidate")
    assert (
        str(mv.version) == "1"
        and float(mv.tags["win_rate"]) == 40.0
        and float(mv.tags["lc_win_rate"]) == 38.5
    )

    first = R.promote(tracking_uri, "value-tiny", margin=1.0)
    assert first.promoted and first.champion_version is None and "no champion" in first.reason
    assert str(client.get_model_version_by_alias("value-tiny", "champion").version) == "1"
    assert client.get_model_version("value-tiny", "1").tags[R.TAG_PROMOTION] == first.reason

    again = R.promote(tracking_uri, "value-tiny", margin=1.0)
    assert not again.promoted and "already the champion" in again.reason

    # a candidate above the champion but within the margin does not move champion
    v2 = R.register_value_model(
        tracking_uri, "value-tiny", _child(tracking_uri, 2), value_folder("b"), {"win_rate": 40.8}
    )
    assert v2 == "2"
    held = R.promote(tracking_uri, "value-tiny", margin=1.0)
    assert not held.promoted
    assert (held.candidate_version, held.champion_version) == ("2", "1")
    assert held.candidate_value == pytest.approx(40.8) and held.champion_value == 40.0
    assert "does not exceed margin 1" in held.reason
    assert str(client.get_model_version_by_alias("value-tiny", "champion").version) == "1"
    assert client.get_model_version("value-tiny", "2").tags[R.TAG_PROMOTION] == held.reason

    # the same candidate passes with no margin
    assert R.promote(tracking_uri, "value-tiny", margin=0.0).promoted
    assert str(client.get_model_version_by_alias("value-tiny", "champion").version) == "2"

    # a clearly better candidate passes the margin
    v3 = R.register_value_model(
        tracking_uri, "value-tiny", _child(tracking_uri, 3), value_folder("c"), {"win_rate": 45.0}
    )
    decision = R.promote(tracking_uri, "value-tiny", margin=1.0)
    assert decision.promoted and decision.champion_version == "2" and "exceeds margin" in decision.reason
    assert str(client.get_model_version_by_alias("value-tiny", "champion").version) == v3
    assert R.metric_of(tracking_uri, "value-tiny", "champion", "win_rate") == 45.0

    # champion comes back byte-identical; a version number works too
    out = R.load_registered_value_model("value-tiny", "champion", tracking_uri, tmp_path / "dl")
    assert _same_tree(value_folder("c"), out)
    old = R.load_registered_value_model("value-tiny", 1, tracking_uri, tmp_path / "dl1")
    assert _same_tree(value_folder("a"), old)


def test_register_is_idempotent_for_same_run_and_folder(tracking_uri, value_folder):
    run = _child(tracking_uri, 1)
    folder = value_folder("a")
    assert R.register_value_model(tracking_uri, "vm", run, folder, {"win_rate": 1.0}) == "1"
    assert R.register_value_model(tracking_uri, "vm", run, folder, {"win_rate": 2.0}) == "1"
    assert R.metric_of(tracking_uri, "vm", "candidate", "win_rate") == 2.0
    assert len(T.client_for(tracking_uri).search_model_versions("name = 'vm'")) == 1


def test_stages_are_mirrored_when_asked(tracking_uri, value_folder):
    client = T.client_for(tracking_uri)
    R.register_value_model(
        tracking_uri, "staged", _child(tracking_uri, 1), value_folder("a"), {"win_rate": 10}
    )
    assert R.promote(tracking_uri, "staged", margin=0, use_stages=True).promoted
    R.register_value_model(
        tracking_uri, "staged", _child(tracking_uri, 2), value_folder("b"), {"win_rate": 9}
    )
    assert not R.promote(tracking_uri, "staged", margin=0, use_stages=True).promoted
    assert client.get_model_version("staged", "1").current_stage == "Production"
    assert client.get_model_version("staged", "2").current_stage == "Staging"
    R.register_value_model(
        tracking_uri, "staged", _child(tracking_uri, 3), value_folder("c"), {"win_rate": 20}
    )
    assert R.promote(tracking_uri, "staged", margin=0, use_stages=True).promoted
    assert client.get_model_version("staged", "3").current_stage == "Production"
    assert client.get_model_version("staged", "1").current_stage == "Archived"


def test_candidate_without_metric_is_not_promoted(tracking_uri, value_folder):
    R.register_value_model(tracking_uri, "nometric", _child(tracking_uri, 1), value_folder("a"))
    decision = R.promote(tracking_uri, "nometric", margin=0)
    assert not decision.promoted and "no 'win_rate' tag" in decision.reason


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
