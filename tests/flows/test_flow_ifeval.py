"""evaluation.task ifeval through the experiment flow: the verifier reward on generated prompts, every
system scored by the verifiers (IFEval's four accuracies), paired differences, value fits, MLflow child
runs. Tiny random models: the numbers are whatever they are; the test checks they are the right ones."""

import json
import re
from pathlib import Path

import pytest

from evaluation.ifeval import METRICS, ifeval_metrics, score_records
from tests.flows.conftest import TINY, run_cli

SETTINGS = [
    "reward.kind=verifier", "prompts.train=generated:train", "prompts.max_constraints=2",
    "prompts.kinds=[punctuation:no_comma, change_case:english_lowercase, startend:quotation]",
    "evaluation.task=ifeval", "evaluation.eval_set=generated:heldout", "evaluation.n_instructions=6",
    "baselines.names=[base-sampled, best-of-n]", "baselines.budget_matched_best_of_n=true",
]


def overrides() -> dict:
    from spi.config import parse_overrides

    return parse_overrides(SETTINGS)


def test_plain_run_scores_every_system_by_the_verifiers(tmp_path):
    from flows.experiment import run_plain
    from spi.config import load_recipe
    from spi.pipeline import eval_prompt_set

    summary = run_plain(str(TINY), overrides(), workdir=str(tmp_path))
    recipe = load_recipe(TINY, overrides())
    records = eval_prompt_set(recipe).records
    assert len(records) == 6 and all(1 <= len(r["instruction_id_list"]) <= 2 for r in records)
    systems = summary["systems"]
    assert {"base-sampled", "best-of-n", "spi-1", "spi-2"} <= set(systems)
    assert any(name.startswith("best-of-n:") for name in systems)
    for name, row in systems.items():
        for m in METRICS:
            assert row[f"{m}_ci_low"] <= row[m] <= row[f"{m}_ci_high"], (name, m)
        # the row's numbers are the verifiers' verdicts on the outputs that system decoded
        stem = name.replace(":", "-")
        [path] = [p for p in (tmp_path / "tiny" / "eval").glob(f"{stem}-*.json") if re.fullmatch(rf"{stem}-[0-9a-f]{{16}}\.json", p.name)]
        decoded = json.loads(path.read_text())
        answers = {o["instruction"]: o["output"] for o in decoded["outputs"]}
        assert ifeval_metrics(score_records(records, answers)) == pytest.approx({m: row[m] for m in METRICS})
    pairs = {(p["a"], p["b"], p["why"]) for p in summary["paired"] if p["metric"] == "prompt_level_strict_acc"}
    assert ("spi-2", "spi-1", "previous iteration") in pairs
    assert {a for a, _, why in pairs if why == "best baseline"} == {"spi-1", "spi-2"}
    assert {a for a, _, why in pairs if why == "same generated tokens"} == {"spi-1", "spi-2"}
    for p in summary["paired"]:
        assert p["ci_low"] <= p["diff"] <= p["ci_high"]
        assert p["diff"] == pytest.approx(systems[p["a"]][p["metric"]] - systems[p["b"]][p["metric"]])
    assert set(summary["value_fits"]) == {"1", "2"}
    assert all("holdout_pair_accuracy" in fit for fit in summary["value_fits"].values())
    report = Path(summary["report"]).read_text()
    assert "prompt strict" in report and "value.first_iteration: policy-samples" in report
    assert "value.later_iterations: policy-samples" in report
    assert "Strict accuracy per constraint kind" in report
    plots = {p.name for p in (tmp_path / "tiny").glob("report-*-plots/*.png")}
    assert plots == {"prompt-level-strict-acc-vs-iteration.png", "prompt-level-strict-acc-vs-compute.png"}


def test_spi_run_summary_json_and_mlflow_child_runs(new_workdir):
    from mlflow_store import tracking

    summary_file = new_workdir / "summary.json"
    args = [a for s in SETTINGS for a in ("--set", s)]
    assert run_cli("run", TINY, "--workdir", new_workdir, "--summary-json", summary_file, *args) == 0
    summary = json.loads(summary_file.read_text())
    assert summary["task"] == "ifeval" and summary["first_iteration"] == "policy-samples"
    assert summary["later_iterations"] == "policy-samples"
    for name, row in summary["systems"].items():
        assert set(METRICS) <= set(row["metrics"]), name
        assert all(0 <= row["metrics"][m] <= 100 for m in METRICS)
    assert summary["paired"] and all(
        {"a", "b", "metric", "diff", "ci_low", "ci_high"} <= set(p) for p in summary["paired"])
    assert set(summary["value_fits"]) == {"1", "2"}
    assert all("holdout_pair_accuracy" in fit for fit in summary["value_fits"].values())

    uri, run_id = summary["tracking_uri"], summary["experiment_run_id"]
    children = tracking.child_runs(uri, run_id)
    assert len(children) == len(summary["systems"])
    for child in children:
        name = f"spi-{child['iteration']}" if child["system"] == "spi" else child["system"]
        for m in METRICS:
            assert child["metrics"][m] == pytest.approx(summary["systems"][name]["metrics"][m]), (name, m)
    history = tracking.client_for(uri).get_metric_history(run_id, "spi_prompt_level_strict_acc")
    assert [m.step for m in history] == [1, 2]
