"""flows.stack without servers: what `spi up` would start, with which environment, and how it stops."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import psutil
import pytest

from flows.stack import commands, process
from flows.stack import plan as P


def _cfg(tmp_path, **kw):
    return P.StackConfig(home=tmp_path, **kw)


def test_every_service_binds_loopback_only(tmp_path):
    for service in P.plan(_cfg(tmp_path, prefect_port=14200, mlflow_port=15000, serve_port=14201)):
        joined = " ".join(service.argv) + " " + " ".join(service.env.values())
        assert "0.0.0.0" not in joined, service.name
        assert service.url.startswith("http://127.0.0.1:"), service.name
        assert service.health_url.startswith("http://127.0.0.1:"), service.name
        if "--host" in service.argv:
            assert service.argv[service.argv.index("--host") + 1] == "127.0.0.1"
    names = [s.name for s in P.plan(_cfg(tmp_path))]
    assert tuple(names) == P.SERVICES


def test_ports_and_urls_follow_the_config(tmp_path):
    prefect, mlflow, serve = P.plan(_cfg(tmp_path, prefect_port=14200, mlflow_port=15000, serve_port=14201))
    assert prefect.argv[prefect.argv.index("--port") + 1] == "14200"
    assert prefect.env["PREFECT_SERVER_UI_API_URL"] == "http://127.0.0.1:14200/api"
    assert prefect.health_url == "http://127.0.0.1:14200/api/health"
    assert mlflow.argv[mlflow.argv.index("--port") + 1] == "15000"
    assert mlflow.health_url == "http://127.0.0.1:15000/health"
    assert serve.env["PREFECT_API_URL"] == "http://127.0.0.1:14200/api"
    assert serve.env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:15000"
    assert serve.env["PREFECT_RUNNER_SERVER_PORT"] == "14201"
    assert serve.argv[1:] == ["-m", "flows.serve", "--module", "flows.deployments"]


def test_mlflow_tracking_and_registry_share_the_named_database(tmp_path):
    _, mlflow, _ = P.plan(_cfg(tmp_path))
    backend = mlflow.argv[mlflow.argv.index("--backend-store-uri") + 1]
    assert backend == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mlflow.argv[mlflow.argv.index("--registry-store-uri") + 1] == backend
    _, mlflow, _ = P.plan(_cfg(tmp_path, db="postgresql://u:p@127.0.0.1:5432/ml"))
    assert (
        mlflow.argv[mlflow.argv.index("--backend-store-uri") + 1]
        == "postgresql+psycopg://u:p@127.0.0.1:5432/ml"
    )
    assert (
        mlflow.argv[mlflow.argv.index("--registry-store-uri") + 1]
        == "postgresql+psycopg://u:p@127.0.0.1:5432/ml"
    )


def test_without_deployments_module_the_servers_start_alone(tmp_path):
    services, note = P.services_to_start(_cfg(tmp_path, deployments_module="flows.no_such_deployments"))
    assert [s.name for s in services] == ["prefect-server", "mlflow-server"]
    assert "flows.no_such_deployments does not exist yet" in note
    services, note = P.services_to_start(_cfg(tmp_path, deployments_module="standin_deployments"))
    assert [s.name for s in services] == list(P.SERVICES) and note is None


def test_database_urls(tmp_path):
    assert P.prefect_db_url(None, tmp_path) == f"sqlite+aiosqlite:///{tmp_path / 'prefect' / 'prefect.db'}"
    assert P.prefect_db_url("postgresql://u@h/p", tmp_path) == "postgresql+asyncpg://u@h/p"
    assert P.prefect_db_url("sqlite:////x/p.db", tmp_path) == "sqlite+aiosqlite:////x/p.db"
    with pytest.raises(P.ServiceError, match="not a database URL"):
        P.mlflow_db_url("mlflow.db", tmp_path)
    with pytest.raises(P.ServiceError, match="not a SQLite or PostgreSQL URL"):
        P.prefect_db_url("mysql://x/y", tmp_path)


def test_offline_settings_are_defaults_the_user_can_override(tmp_path):
    serve = P.plan(_cfg(tmp_path))[2]
    env = P.service_environment(
        serve, base={"HF_HUB_OFFLINE": "0", "PREFECT_API_URL": "http://elsewhere/api"}
    )
    assert env["HF_HUB_OFFLINE"] == "0"  # the user's setting wins
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"  # the service's own setting wins
    for key in set(P.SERVICE_ENV) - {"HF_HUB_OFFLINE"}:
        assert env[key] == P.SERVICE_ENV[key]
    assert env["NO_PROXY"] == "127.0.0.1,localhost"  # loopback never goes through a proxy
    env = P.service_environment(serve, base={"no_proxy": "corp.example"})
    assert env["no_proxy"] == "corp.example,127.0.0.1,localhost"
    for key in (
        "PREFECT_SERVER_ANALYTICS_ENABLED",
        "DO_NOT_TRACK",
        "MLFLOW_DISABLE_TELEMETRY",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
        "HF_HUB_OFFLINE",
    ):
        assert key in P.SERVICE_ENV


def test_stop_never_signals_a_reused_pid():
    """A record whose start time does not match the live process is treated as gone."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        real = psutil.Process(proc.pid).create_time()
        stale = {"name": "x", "pid": proc.pid, "pgid": proc.pid, "create_time": real - 1000}
        assert not process.is_alive(stale)
        assert process.stop(stale, timeout=1) == "not running"
        time.sleep(0.2)
        assert proc.poll() is None  # untouched
        record = {**stale, "create_time": real}
        assert process.is_alive(record)
        assert process.stop(record, timeout=10) == "stopped"
        assert proc.wait(timeout=5) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_reaches_descendants_in_other_sessions():
    """Prefect starts flow runs in sessions of their own: killpg alone would leave them running."""
    code = (
        "import subprocess, sys, time;"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True);"
        "print(p.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    child_pid = int(parent.stdout.readline())
    try:
        child = psutil.Process(child_pid)
        assert child.pid and child.ppid() == parent.pid
        record = {
            "name": "x",
            "pid": parent.pid,
            "pgid": parent.pid,
            "create_time": psutil.Process(parent.pid).create_time(),
        }
        process.stop(record, timeout=10)
        parent.wait(timeout=5)
        child.wait(timeout=5)
        assert not psutil.pid_exists(child_pid) or child.status() == psutil.STATUS_ZOMBIE
    finally:
        for pid in (child_pid, parent.pid):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        parent.wait()


def test_port_taken_is_a_clear_error(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        parser = argparse.ArgumentParser()
        commands.add_commands(parser.add_subparsers(dest="command"))
        argv = ["up", "--home", str(tmp_path), "--mlflow-port", str(taken)]
        argv += ["--prefect-port", str(_free()), "--serve-port", str(_free())]
        assert commands.cmd_up(parser.parse_args(argv)) == 1
    err = capsys.readouterr().err
    assert f"port {taken} on 127.0.0.1 (for mlflow-server) is taken" in err
    assert "--mlflow-port" in err
    assert not (tmp_path / "services.json").exists()  # nothing was started


def test_down_and_status_with_nothing_started(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    commands.add_commands(parser.add_subparsers(dest="command"))
    home = tmp_path / "never-used"
    assert commands.cmd_status(parser.parse_args(["status", "--home", str(home)])) == 0
    assert "nothing started" in capsys.readouterr().out
    assert commands.cmd_down(parser.parse_args(["down", "--home", str(home)])) == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert not home.exists()  # looking creates nothing


def test_spi_cli_mounts_up_down_status():
    from flows.cli import build_parser

    parser = build_parser()
    for command in ("up", "down", "status"):
        args = parser.parse_args([command, "--home", "/tmp/x"])
        assert args.func.__module__ == "flows.stack.commands"


def _free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
