"""A real interruption (kill -9 of ``spi run`` mid-run) and a rerun that skips finished stages;
bad input ends with one clear error line and a non-zero exit code, keeping finished work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.flows.conftest import TINY, run_cli

REPO = Path(__file__).resolve().parents[2]


def _mtimes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_kill_mid_run_then_resume(prefect_harness, new_workdir, tmp_path, capsys):
    workdir = new_workdir
    env = {**os.environ, "PREFECT_API_URL": prefect_harness, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.commands", "run", str(TINY), "--workdir", str(workdir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    iteration1 = workdir / "tiny" / "iteration-1"
    deadline = time.monotonic() + 400
    try:
        while not list(iteration1.glob("value-*/value.json")):  # iteration 1 finished its last stage
            assert proc.poll() is None, "spi run ended before it could be interrupted"
            assert time.monotonic() < deadline, "iteration 1 never finished"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list((workdir / "tiny").glob("summary-*.json")), "the run was killed after it had finished"
    finished = _mtimes(iteration1)

    summary_file = tmp_path / "summary.json"
    assert run_cli("run", TINY, "--workdir", workdir, "--summary-json", summary_file) == 0
    summary = json.loads(summary_file.read_text())
    for stage in ("iteration-1/rollouts", "iteration-1/labels", "iteration-1/value"):
        assert summary["stages"][stage] in ("cached", "reused"), (stage, summary["stages"][stage])
    assert summary["stages"]["eval/judge-spi-2"] == "computed"
    after = _mtimes(iteration1)
    assert {k: after[k] for k in finished} == finished  # nothing of iteration 1 was rewritten
    assert {s for s in summary["systems"] if not s.startswith("best-of-n:")} == {"base-greedy", "base-sampled", "spi-1", "spi-2"}

    # the killed run's MLflow parent run was resumed, not duplicated
    from mlflow_store import tracking

    client = tracking.client_for(summary["tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`spi.role` = 'experiment'")
    assert [p.info.run_id for p in parents] == [summary["experiment_run_id"]]

    # a corrupted stage file: one clear error line naming it, exit code 2, other work kept
    rollouts = next(iteration1.glob("rollouts-*.jsonl"))
    rollouts.write_text(rollouts.read_text()[:-40] + "\n{not json\n")
    capsys.readouterr()
    assert run_cli("run", TINY, "--workdir", workdir) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and rollouts.name in err
    assert next(iteration1.glob("labels-*.jsonl")).exists() and list(iteration1.glob("value-*/value.json"))


def test_unknown_recipe_field(tmp_path, capsys):
    assert run_cli("run", TINY, "--workdir", tmp_path, "--set", "search.widht=3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "search.widht" in err[0]
    assert not (tmp_path / "tiny").exists()


def test_unreachable_tracking_uri(tmp_path, capsys):
    assert (
        run_cli("run", TINY, "--workdir", tmp_path, "--set", "tracking.tracking_uri=http://127.0.0.1:9") == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreachable" in err[0] and "127.0.0.1:9" in err[0]


def test_unknown_recipe(tmp_path, capsys):
    assert run_cli("run", "no-such-recipe", "--workdir", tmp_path) == 2
    assert "no-such-recipe" in capsys.readouterr().err


def test_promote_unknown_registered_model(tmp_path, capsys):
    assert run_cli("promote", "no-such-model", "--workdir", tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no registered model named 'no-such-model'" in err[0]
    assert not (tmp_path / "mlflow.db").exists()  # nothing created by a failed look-up


def test_judge_problems_fail_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPI_ALPACA_DATA", str(tmp_path / "no-data"))
    assert (
        run_cli("run", TINY, "--workdir", tmp_path, "--set", "evaluation.judge=local:my-judge") == 2
    )  # an unshipped name (minilm-bt ships with the package)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "my-judge" in err[0] and "SPI_ALPACA_DATA" in err[0]
    assert run_cli("run", TINY, "--workdir", tmp_path, "--set", "evaluation.judge=reward") == 2
    assert "reward model the experiment was trained on" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()
