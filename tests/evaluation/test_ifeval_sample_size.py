"""IFEval's intervals and paired differences need a sample size too: below it they are "n/a (why)",
in the metrics, the report's sections and its verdict, never a number."""

import json

import pytest

from evaluation import ifeval, ifeval_report
from evaluation.ifeval import METRICS, PromptResult
from evaluation.metrics import MIN_BOOTSTRAP_INSTRUCTIONS, NotEstimable

WHY = f"needs at least {MIN_BOOTSTRAP_INSTRUCTIONS} instructions, got 4"


def _results(n, offset=0):
    return [PromptResult(str(i), ("kind:a", "kind:b"), ((i + offset) % 2 == 0, True), (True, True)) for i in range(n)]


def _verified(tmp_path, name, results):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"annotations": [
        {"key": r.key, "instruction_id_list": list(r.instruction_ids), "strict": list(r.strict), "loose": list(r.loose)}
        for r in results]}))
    return {"path": str(path), "metrics": ifeval.report(results, n_boot=200)}


def test_four_prompts_have_no_intervals():
    m = ifeval.report(_results(4), n_boot=200)
    assert m["prompt_level_strict_acc"] == pytest.approx(50.0)  # the point estimate is still a number
    assert all(m["intervals"][k] == [None, None] for k in METRICS)
    assert f"a bootstrap interval over prompts {WHY}" == m["not_available"]["intervals"]
    with pytest.raises(NotEstimable):
        ifeval.bootstrap_intervals(_results(4))
    with pytest.raises(NotEstimable, match=f"a paired interval over prompts {WHY}"):
        ifeval.paired_differences("a", _results(4), "b", _results(4, 1))
    five = ifeval.report(_results(5), n_boot=200)
    assert five["not_available"] == {} and five["intervals"]["prompt_level_strict_acc"][0] is not None


def test_the_report_says_why_not(tmp_path):
    small = {"spi-1": _verified(tmp_path, "spi-1", _results(4)), "base": _verified(tmp_path, "base", _results(4, 1))}
    rows = [{"system": name, "iteration": k, "mean_reward": 0.0, "generated_tokens": 10,
             **ifeval_report.system_metrics(small[name]["metrics"])} for name, k in (("spi-1", 1), ("base", None))]
    assert rows[0]["prompt_level_strict_acc_ci_low"] is None
    section = "\n".join(ifeval_report.systems_section(rows))
    assert f"50.0 n/a (a bootstrap interval over prompts {WHY})" in section
    judged = {name: ({}, v) for name, v in small.items()}
    paired = ifeval_report.paired_rows(rows, judged)
    assert len(paired) == len(METRICS) and all(p["diff"] is None and p["within_noise"] for p in paired)
    text = "\n".join(ifeval_report.paired_section(paired))
    assert f"n/a (a paired interval over prompts {WHY})" in text
    assert ifeval_report.verdict(paired) == f"No paired difference is available: a paired interval over prompts {WHY}."
