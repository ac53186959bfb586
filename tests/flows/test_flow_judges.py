"""A judge registered once (tests/evaluation/toy_judge.py) runs from a recipe: ``spi run`` checks the
recipe's judge against the registry before anything starts, the judge stage the flow calls scores with
it, and a whole tiny experiment (plain stage calls) is judged by it."""

import json

import pytest

from flows import tasks as T
from tests.evaluation.toy_judge import registered_toy_judge
from tests.flows.conftest import TINY, run_cli

REWARD = {"kind": "hf-classifier", "model": "tiny-reward", "head": None, "batch_size": 16}


@pytest.fixture
def toy():
    with registered_toy_judge() as judge_class:
        yield judge_class


def test_spi_run_checks_the_recipe_judge_against_the_registry(toy, tmp_path, capsys):
    assert run_cli("run", TINY, "--workdir", tmp_path, "--set", "evaluation.judge=no-such-judge") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown judge 'no-such-judge'" in err[0]
    assert "length[:SCALE]" in err[0] and "toy[:BIAS]" in err[0]  # the registered judges, toy included
    assert run_cli("run", TINY, "--workdir", tmp_path, "--set", "evaluation.judge=toy:0.75") == 2
    assert "bias 0.75 is not in [0, 0.5]" in capsys.readouterr().err  # the toy's availability hook
    assert not (tmp_path / "tiny").exists()  # nothing ran


def test_the_judge_stage_scores_with_a_registered_judge(toy, tmp_path):
    rows = [{"index": i, "instruction": f"q{i}", "reference_output": "r" * 5} for i in range(3)]
    (tmp_path / "refs.json").write_text(json.dumps(rows))
    answers = [{"instruction": f"q{i}", "output": o} for i, o in enumerate(["a toy", "no", "toys"])]
    (tmp_path / "spi-1.json").write_text(json.dumps({"outputs": answers}))
    result = T.judge_task.fn(
        "spi-1", str(tmp_path / "refs.json"), str(tmp_path / "spi-1.json"), "toy:0.125", REWARD,
        str(tmp_path / "judge.json"), "key", cache=str(tmp_path / "judgements.sqlite"),
    )
    payload = json.loads((tmp_path / "judge.json").read_text())
    assert result["judge"] == payload["judge"] == "toy:bias=0.125" and payload["judge_spec"] == "toy:0.125"
    assert [a["preference"] for a in payload["annotations"]] == [1.875, 1.125, 1.875]
    assert payload["metrics"]["win_rate"] == pytest.approx(100 * (0.875 + 0.125 + 0.875) / 3)


def test_a_tiny_experiment_is_judged_by_a_registered_judge(toy, tmp_path):
    import torch

    from flows.experiment import run_plain

    torch.set_num_threads(1)
    out = run_plain(str(TINY), {"evaluation": {"judge": "toy:0.125"}}, str(tmp_path))
    judged = [p for p in sorted((tmp_path / "tiny" / "eval").glob("judge-*.json")) if p.name.count(".") == 1]
    assert {json.loads(p.read_text())["system"] for p in judged} == set(out["systems"])
    for path in judged:
        payload = json.loads(path.read_text())
        assert payload["judge"] == "toy:bias=0.125"
        prefs = [a["preference"] for a in payload["annotations"]]
        assert prefs == [1.875 if "toy" in a["output"] else 1.125 for a in payload["annotations"]]
        assert out["systems"][payload["system"]]["win_rate"] == pytest.approx(100 * sum(p - 1 for p in prefs) / len(prefs))


def test_the_experiment_deployment_names_the_registered_judges(toy):
    from flows.deployments import deployments

    experiment = next(d for d in deployments() if d.name == "spi-experiment")
    assert "toy[:BIAS]" in experiment.description and "local[:NAME]" in experiment.description
