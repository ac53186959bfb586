"""`spi bench flow`: the plain-call arm does the flow's work (same answers, same judgements) without
Prefect runs, MLflow or the store, and the benchmark reports both arms."""

import json
from pathlib import Path

import pytest

from tests.flows.conftest import TINY


def _answers(folder: Path) -> dict[str, list[str]]:
    """system -> its answers, from the decode files of an experiment's eval folder."""
    out = {}
    for path in (folder / "tiny" / "eval").glob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "outputs" in data and "system" in data:
            out[data["system"]] = [o["output"] for o in data["outputs"]]
    return out


def _win_rates(folder: Path) -> dict[str, float]:
    """system -> its win rate, from the judgement files of an experiment's eval folder."""
    return {
        data["system"]: data["metrics"]["win_rate"]
        for data in (json.loads(p.read_text()) for p in (folder / "tiny" / "eval").glob("judge-*.json")
                     if not p.name.endswith(".stage.json"))
    }


def test_flow_bench_compares_the_flow_with_the_same_work_as_plain_calls(tmp_path, mlflow_db_template):
    from flows.bench import format_flow_table, run_flow_bench

    result = run_flow_bench(str(TINY), threads=1, workdir=str(tmp_path), log=lambda msg: None,
                            repeats=1, burn_in=0)
    plain, flow = tmp_path / "plain-0", tmp_path / "flow-0"
    assert set(result["systems"]) >= {"base-greedy", "base-sampled", "spi-1", "spi-2"}
    assert any(name.startswith("best-of-n:") for name in result["systems"])
    # the same answers from every system, so the difference in time is orchestration
    assert _answers(plain) == _answers(flow) and set(_answers(plain)) == set(result["systems"])
    assert _win_rates(plain) == pytest.approx(_win_rates(flow)) and set(_win_rates(plain)) == set(result["systems"])
    plain_report = next((plain / "tiny").glob("report-*.md")).read_text()
    assert all(name in plain_report for name in result["systems"])
    # plain calls: no Prefect results, no MLflow database, no store
    assert (flow / "mlflow.db").exists() and (flow / "store.db").exists() and (flow / ".prefect-results").exists()
    assert not any((plain / name).exists() for name in ("mlflow.db", "store.db", ".prefect-results"))
    assert result["plain_seconds"] > 0 and result["flow_seconds"] > 0 and result["flow_rerun_seconds"] > 0
    assert result["flow_over_plain"] == pytest.approx(result["flow_seconds"] / result["plain_seconds"])
    assert "plain calls" in format_flow_table(result)
