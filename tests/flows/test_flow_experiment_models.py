"""The model flows on the experiment's registered guided policies: promotion through the flow (paired
gate, margin) and the evaluate flow (the champion, a file of outputs, its child run)."""

import json
from pathlib import Path

import pytest

from tests.flows.conftest import TINY, run_cli

NAME = "tiny-value"


def test_promotion_through_the_flow_with_and_without_margin(experiment, tmp_path, capsys):
    from mlflow_store import tracking
    from mlflow_store.registry import (
        ANNOTATIONS_ARTIFACT,
        get_version,
        register_guided_policy,
        version_judgements,
    )

    workdir, summary, _ = experiment
    uri = summary["tracking_uri"]
    champion = get_version(uri, NAME, "champion")
    # a new candidate judged the best possible (p = 2) on every one of the champion's instructions
    judged = version_judgements(uri, NAME, champion, tmp_path / "judged")
    assert all(a["preference"] < 1.99 for a in judged["annotations"])
    for a in judged["annotations"]:
        a["preference"] = 2.0
    better = tmp_path / "better" / "judge.json"
    better.parent.mkdir()
    better.write_text(json.dumps(judged))
    run_id = tracking.start_experiment_run(uri, "tiny-promotion", {}, "promotion-test", "test")
    tracking.log_artifacts(uri, run_id, better, ANNOTATIONS_ARTIFACT)
    folder = load_champion_folder(uri, tmp_path)
    version = register_guided_policy(uri, NAME, run_id, folder, {"win_rate": 0.0})  # the gate pairs, ignores tags
    capsys.readouterr()
    assert run_cli("promote", NAME, "--workdir", workdir, "--margin", "-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --margin") and ">= 0" in err[0]
    assert get_version(uri, NAME, "champion").version == champion.version
    assert run_cli("promote", NAME, "--workdir", workdir, "--margin", "100") == 0  # no difference exceeds 100
    assert "not promoted" in capsys.readouterr().out
    assert get_version(uri, NAME, "champion").version == champion.version
    assert run_cli("promote", NAME, "--workdir", workdir, "--margin", "1") == 0
    assert "promoted" in capsys.readouterr().out
    mv = get_version(uri, NAME, "champion")
    assert str(mv.version) == str(version) and float(mv.tags["spi.promotion.ci_low"]) > 1
    assert mv.tags["spi.promotion.instructions"] == ",".join(str(a["index"]) for a in judged["annotations"])


def test_promote_unknown_name_in_an_existing_registry(experiment, capsys):
    workdir, _, _ = experiment
    assert run_cli("promote", "tiny-valeu", "--workdir", workdir) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "tiny-valeu" in err and "tiny-value" in err  # names what exists


def load_champion_folder(uri, tmp_path):
    from mlflow_store.registry import load_registered_value_model

    return load_registered_value_model(NAME, "champion", uri, tmp_path / "champ")


def test_evaluate_flow_scores_the_champion_and_a_file_of_outputs(experiment, tmp_path):
    from flows.model_flows import evaluate_value_model
    from mlflow_store.registry import get_version

    workdir, summary, full = experiment
    uri = summary["tracking_uri"]
    champion = get_version(uri, NAME, "champion")
    result = evaluate_value_model(recipe=str(TINY), workdir=str(workdir), alias="champion")
    assert result["version"] == str(champion.version)
    # the champion decodes the system it was registered as (earlier tests may have promoted a version of
    # another run of the same registered model: the system is read from the folder)
    assert result["guided_system"] in ("spi-1", "spi-2")
    # version 2, this experiment's spi-2, decodes exactly its spi-2: V_1/beta_1 + V_2/beta_2 (the same
    # decode, found by its key), not V_2 alone as spi-1
    result2 = evaluate_value_model(recipe=str(TINY), workdir=str(workdir), alias="2")
    assert result2["guided_system"] == "spi-2"
    for key in ("mean_reward", "policy_tokens", "win_rate"):
        assert result2[key] == pytest.approx(summary["systems"]["spi-2"][key]), key
    tags = get_version(uri, NAME, champion.version).tags
    assert float(tags["eval_win_rate"]) == pytest.approx(result["win_rate"])

    # a file of outputs (AlpacaEval format) scores exactly as the same outputs did inside the experiment
    path = next(p for p in (workdir / "tiny" / "eval").glob("base-sampled-*.json") if p.name.count(".") == 1)
    decoded = json.loads(path.read_text())
    outputs = tmp_path / "outputs.json"
    outputs.write_text(
        json.dumps([{k: o[k] for k in ("instruction", "output", "generator")} for o in decoded["outputs"]])
    )
    scored = evaluate_value_model(recipe=str(TINY), workdir=str(workdir), outputs=str(outputs))
    assert scored["win_rate"] == pytest.approx(summary["systems"]["base-sampled"]["win_rate"])
    assert scored["version"] is None


def test_evaluate_flow_logs_its_child_run_like_the_experiment(experiment):
    """The evaluation's child run carries the system's params, the not-available reasons and the times of
    the stages it describes; the parent it starts (a new experiment) records the workdir actually used."""
    from flows.model_flows import evaluate_value_model
    from mlflow_store import tracking

    workdir, summary, _ = experiment
    uri = summary["tracking_uri"]
    result = evaluate_value_model(recipe=str(TINY), overrides={"tracking": {"experiment": "tiny-nightly"}},
                                  workdir=str(workdir), alias="2")
    client = tracking.client_for(uri)
    parent = client.search_runs([client.get_experiment_by_name("tiny-nightly").experiment_id],
                                filter_string=f"tags.`{tracking.TAG_ROLE}` = 'experiment'")[0]
    assert parent.data.params["execution.workdir"] == str(workdir.resolve())
    assert parent.data.params["tracking.experiment"] == "tiny-nightly"
    (child,) = tracking.child_runs(uri, parent.info.run_id)
    assert child["system"] == f"evaluate-{result['system']}"
    run = client.get_run(child["run_id"])
    p = run.data.params
    assert (p["system"], p["guide"], p["search.W"], p["version"]) == ("spi-2", "1*V_1 + 0.5*V_2", "2", "2")
    assert (p["values.V_1.beta"], p["values.V_2.beta"]) == ("1.0", "2.0")
    assert "length_controlled_winrate" not in run.data.metrics
    assert "got 6" in run.data.tags[tracking.TAG_NOT_AVAILABLE + "length_controlled_winrate"]

    def ran(artifact):  # (start, end) in ms of the stage whose file the run logged, from its task's sidecar
        (logged,) = client.list_artifacts(run.info.run_id, artifact)
        meta = json.loads((workdir / "tiny" / "eval" / (Path(logged.path).name + ".stage.json")).read_text())
        return int(meta["started_at"] * 1000), int(meta["ended_at"] * 1000)

    assert run.info.start_time == ran("generations")[0] and run.info.end_time == ran("judge_annotations")[1]
