"""A real interruption (kill -9 of ``spi run`` mid-run) and a rerun that skips finished stages;
bad input ends with one clear error line and a non-zero exit code, keeping finished work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
        # iteration 1 finished its last stage: the value folder and its key sidecar (written after the folder;
        # a kill between the two rightly recomputes the stage)
        while not (list(iteration1.glob("value-*/value.json")) and list(iteration1.glob("value-*.key"))):
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


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_model_fails_before_the_first_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: at once, no hub retries
    started = time.monotonic()
    assert run_cli("run", TINY, "--workdir", tmp_path, "--set", "policy.model=nobody/no-such-model") == 2
    assert time.monotonic() - started < 30
    err = _one_error_line(capsys)
    assert "policy.model" in err and "nobody/no-such-model" in err and "HF_HUB_OFFLINE" in err
    assert run_cli("run", TINY, "--workdir", tmp_path, "--set", f"reward.model={tmp_path / 'no-folder'}") == 2
    assert "reward.model" in _one_error_line(capsys)
    assert not (tmp_path / "tiny").exists()  # no stage output


def test_corrupt_eval_set_line_fails_before_the_first_stage(tmp_path, capsys):
    eval_set = tmp_path / "eval.jsonl"
    good = [json.dumps({"instruction": f"Say {i}.", "output": f"{i}"}) for i in range(7)]
    eval_set.write_text("\n".join(good) + '\n{"instruction": "Say 7.", "output": \n')
    started = time.monotonic()
    assert run_cli("run", TINY, "--workdir", tmp_path / "w", "--set", f"evaluation.eval_set={eval_set}") == 2
    assert time.monotonic() - started < 30
    err = _one_error_line(capsys)
    assert "evaluation.eval_set" in err and f"{eval_set}, row 8" in err and "column 37" in err, err  # after "output": 
    assert not (tmp_path / "w" / "tiny").exists()  # the iterations did not run


def test_leaderboard_with_a_corrupt_file_is_one_error_line(tmp_path, capsys):
    import gzip

    rows = [{"index": i, "instruction": f"Say {i}.", "output": f"{i}"} for i in range(5)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for folder, field, value in (("outputs", "output", "x"), ("preferences", "preference", 1.5)):
        (tmp_path / folder).mkdir()
        lines = "".join(json.dumps({"index": i, field: value}) + "\n" for i in range(5))
        with gzip.open(tmp_path / folder / "m.jsonl.gz", "wt") as fh:
            fh.write(lines if folder == "outputs" else lines[:-30] + "\n")
    args = ["eval", "leaderboard", "--eval-set", tmp_path / "eval.jsonl", "--outputs", tmp_path / "outputs",
            "--preferences", tmp_path / "preferences", "--out", tmp_path / "board.json"]
    assert run_cli(*args) == 2
    err = _one_error_line(capsys)
    assert "m.jsonl.gz, row 5" in err and "invalid JSON at column" in err
    (tmp_path / "preferences" / "m.jsonl.gz").write_bytes(b"not gzip")
    assert run_cli(*args) == 2
    assert "m.jsonl.gz: cannot be read" in _one_error_line(capsys)


def test_spi_eval_ifeval_bad_input_is_one_error_line(tmp_path, capsys):
    """`spi eval ifeval` follows every command: one `error:` line naming the file and row, exit 2."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"key": 1, "prompt": "x", "instruction_id_list": ["nope:nothing"], "kwargs": [{}]})
                       + "\n")
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n")
    args = ["eval", "ifeval", "--prompts", prompts, "--responses", responses, "--out", tmp_path / "out.json"]
    assert run_cli(*args) == 2
    assert "p.jsonl:1: unknown constraint 'nope:nothing'" in _one_error_line(capsys)
    args[3] = tmp_path / "absent.jsonl"
    assert run_cli(*args) == 2
    assert "absent.jsonl" in _one_error_line(capsys)
    assert not (tmp_path / "out.json").exists()


def test_promote_never_creates_a_database(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "elsewhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    assert run_cli("promote", "no-such-model", "--workdir", tmp_path) == 2  # MLFLOW_TRACKING_URI wins
    assert "no registered model named 'no-such-model'" in _one_error_line(capsys)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert run_cli("promote", "no-such-model", "--tracking-uri", f"sqlite:///{missing}") == 2
    assert str(missing) in _one_error_line(capsys)
    assert not missing.parent.exists() and not (tmp_path / "mlflow.db").exists()


def test_promote_fails_bad_input_once_and_retries_a_transient_error(new_workdir, monkeypatch):
    """A real Prefect run of the promote flow: a missing model is one attempt with the clear error (no
    retries); an error that may pass next time (the registry's server away) is retried twice."""
    from flows.model_flows import promote_value_model
    from mlflow_store import registry

    calls, real = [], registry.promote

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "promote", counted)
    with pytest.raises(registry.RegistryError, match="no registered model named 'no-such-model'"):
        promote_value_model(registered_model="no-such-model", workdir=str(new_workdir))
    assert calls == ["no-such-model"]

    def away(*args, **kwargs):
        calls.append("away")
        raise ConnectionError("the registry's server is away")

    monkeypatch.setattr(registry, "promote", away)
    with pytest.raises(ConnectionError):
        promote_value_model(registered_model="m", workdir=str(new_workdir))
    assert calls.count("away") == 3  # the first attempt and both retries


def test_sigkill_of_spi_run_leaves_no_prefect_server(tmp_path):
    """Without a configured API or a stack, `spi run` starts a temporary Prefect server as a child that
    the kernel kills with it (PR_SET_PDEATHSIG): after kill -9 nothing listens on its port."""
    import re
    import socket

    import psutil

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "SPI_HOME")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", XDG_STATE_HOME=str(tmp_path / "state"))
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "flows.commands", "run", str(TINY), "--workdir", str(tmp_path / "w")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    server = None
    try:
        for line in proc.stdout:  # the line printed once the server answers its health check
            found = re.search(r"Prefect API http://127\.0\.0\.1:(\d+)/api \(temporary server, pid (\d+)", line)
            if found:
                port, server = int(found[1]), psutil.Process(int(found[2]))
                break
        assert server is not None, "spi run ended without starting a temporary Prefect server"
        assert server.ppid() == proc.pid
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # listening
        proc.kill()  # SIGKILL: no atexit hook, no finally
        proc.wait()
        gone, _ = psutil.wait_procs([server], timeout=10)
        assert gone, "the temporary Prefect server outlived spi run"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server is not None and server.is_running():
            server.kill()
