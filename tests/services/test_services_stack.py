"""`spi up` / `spi status` / `spi down` for real: a Prefect server, an MLflow server and the serving
process on free loopback ports (one stack for the module, ~1 minute), and the nightly schedule
surviving a restart of the serving process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import psutil
from conftest import HERE, STANDIN, services_cli, stop_stack
from standin_deployments import STANDIN_CRON, STANDIN_TZ

from flows.stack import health, process
from flows.stack import plan as P


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read()


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_up_starts_three_healthy_services_on_loopback(stack):
    out = stack.up.stdout
    print(out)  # start-up times and memory, for the record
    state = stack.state
    assert set(state["services"]) == set(P.SERVICES)
    for name, record in state["services"].items():
        assert process.is_alive(record), name
        assert f"{name}" in out and "ready in" in out
        assert record["ready_s"] > 0 and record["rss_at_ready"] > 10 * 2**20, record
        listening = {
            (c.laddr.ip, c.laddr.port)
            for p in _tree(record["pid"])
            for c in p.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert ("127.0.0.1", record["port"]) in listening, (name, listening)
        assert all(ip == "127.0.0.1" for ip, _ in listening), (name, listening)  # nothing on 0.0.0.0
    assert "resident in all" in out
    assert _get(stack.api + "/health") == (200, b"true")
    assert _get(stack.mlflow + "/health")[0] == 200
    # the MLflow server serves the registry too (same database)
    status, body = _get(stack.mlflow + "/api/2.0/mlflow/registered-models/search?max_results=1")
    assert status == 200 and isinstance(json.loads(body), dict)
    # the UI knows where its API is
    assert _get(stack.api.removesuffix("/api") + "/")[0] == 200


def test_status_reports_url_pid_alive_rss(stack):
    res = services_cli("status", "--home", str(stack.home), "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(rows) == set(P.SERVICES)
    for name, row in rows.items():
        assert row["alive"] and row["healthy"], row
        assert row["pid"] == stack.state["services"][name]["pid"]
        assert row["rss"] > 10 * 2**20
    assert rows["prefect-server"]["url"] == f"http://127.0.0.1:{stack.ports['prefect']}"
    assert rows["mlflow-server"]["url"] == f"http://127.0.0.1:{stack.ports['mlflow']}"
    text = services_cli("status", "--home", str(stack.home))
    assert text.returncode == 0 and text.stdout.count("healthy") == 3


def test_second_up_refuses(stack, tmp_path):
    again = services_cli("up", "--home", str(stack.home), "--timeout", "5")
    assert again.returncode == 1 and "already running" in again.stderr
    other_home = services_cli(
        "up", "--home", str(tmp_path), "--prefect-port", str(stack.ports["prefect"]), "--timeout", "5"
    )
    assert other_home.returncode == 1
    assert f"port {stack.ports['prefect']} on 127.0.0.1 (for prefect-server) is taken" in other_home.stderr
    assert not (tmp_path / "services.json").exists()


RUNNER_SETTLE_S = 25.0  # seconds after its start before the serving process is stopped


def _scheduled(api: str) -> dict[str, dict]:
    """{deployment name: deployment} for every deployment with a cron schedule."""
    return {
        d["name"]: d for d in health.prefect_deployments(api) if any(s.get("cron") for s in d["schedules"])
    }


def _crons(deployment: dict) -> list[tuple]:
    return sorted(
        (s["cron"], s.get("timezone"), s.get("active")) for s in deployment["schedules"] if s.get("cron")
    )


def _restart_serve(stack, while_down=None) -> None:
    """Stop the serving process as `spi down` does (SIGTERM to its group), call while_down(), start it
    again as `spi up` does."""
    record = stack.state["services"]["serve"]
    # The runner's health endpoint answers a moment before the runner counts as started, and a runner
    # stopped before that exits without its shutdown hooks (Prefect's default one pauses every served
    # deployment): give it time to start, so that this test sees what a restart in production does.
    time.sleep(max(0.0, RUNNER_SETTLE_S - (time.time() - record["started_at"])))
    assert process.stop(record, timeout=30) == "stopped"
    assert not process.is_alive(record)
    if while_down is not None:
        while_down()
    cfg = P.StackConfig(
        home=stack.home,
        prefect_port=stack.ports["prefect"],
        mlflow_port=stack.ports["mlflow"],
        serve_port=stack.ports["serve"],
        deployments_module=stack.deployments,
    )
    service = [s for s in P.plan(cfg) if s.name == "serve"][0]
    env = P.service_environment(service)
    env["PYTHONPATH"] += os.pathsep + str(HERE)
    new = process.start(service, stack.home / "logs" / "serve.log", env=env)
    state = stack.state
    state["services"]["serve"] = new
    process.save_state(stack.home, state)  # so `spi down` (and the fixture) stop the new one
    health.wait_healthy(new, timeout=180)


def test_nightly_schedule_survives_restart_of_serving_process(stack):
    """The served deployments (flows.deployments, or the stand-in while it does not exist) include a cron
    schedule with an explicit time zone; after the serving process restarts it is still there, active,
    on the same deployment, which is not paused."""
    before = _scheduled(stack.api)
    assert before, f"no deployment with a cron schedule is served by {stack.deployments}"
    for name, d in before.items():
        assert d["paused"] is False, name
        for cron, tz, active in _crons(d):
            assert tz, f"{name}: cron {cron!r} without an explicit time zone"
            assert active, name
    if stack.deployments == STANDIN:
        assert _crons(before["standin-nightly-eval"]) == [(STANDIN_CRON, STANDIN_TZ, True)]
    old_pid = stack.state["services"]["serve"]["pid"]

    def while_down():
        # Prefect's default (pause_on_shutdown=True) pauses the deployments here and deletes their
        # scheduled runs, so a nightly run falling due while the process restarts would be lost.
        down = _scheduled(stack.api)
        assert set(down) == set(before)
        for name, d in down.items():
            assert d["paused"] is False, f"{name}: stopping the serving process paused it"
            assert _crons(d) == _crons(before[name])

    _restart_serve(stack, while_down)
    after = _scheduled(stack.api)  # registered again by the new process
    assert stack.state["services"]["serve"]["pid"] != old_pid
    assert set(after) == set(before)
    for name, d in after.items():
        assert d["id"] == before[name]["id"]
        assert d["paused"] is False, f"{name}: the restart left it paused, so its schedule would never fire"
        assert _crons(d) == _crons(before[name])


def test_commands_find_the_stack_without_home(stack, tmp_path):
    """`spi up` recorded its home: `spi status` finds it without --home, and `spi promote` looks the
    model up on the stack's MLflow server, creating no local database."""
    env = {k: v for k, v in os.environ.items() if k not in ("SPI_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(P.PROJECT_ROOT), env.get("PYTHONPATH", "")])

    def spi(*args):
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=180)

    status = spi("status", "--json")
    assert status.returncode == 0, status.stderr
    assert {r["name"]: r["url"] for r in json.loads(status.stdout)}["mlflow-server"] == stack.mlflow
    promote = spi("promote", "no-such-model")
    err = promote.stderr.strip().splitlines()
    assert promote.returncode == 2 and len(err) == 1, promote.stderr
    assert "no registered model named 'no-such-model'" in err[0] and stack.mlflow in err[0]
    assert not (tmp_path / "runs").exists()


def test_down_stops_exactly_what_up_started(stack):
    """Last in this module: it takes the module's stack down."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        procs = [p for r in stack.state["services"].values() for p in _tree(r["pid"])]
        ports = [r["port"] for r in stack.state["services"].values()]
        assert len(procs) >= 3
        serve = stack.state["services"]["serve"]  # a runner stopped while starting hangs until SIGKILL
        time.sleep(max(0.0, RUNNER_SETTLE_S - (time.time() - serve["started_at"])))
        t0 = time.monotonic()
        down = services_cli("down", "--home", str(stack.home))
        print(f"spi down took {time.monotonic() - t0:.1f} s\n{down.stdout}")
        assert down.returncode == 0, down.stderr
        assert down.stdout.count("stopped") == 3, down.stdout  # all three ended on SIGTERM
        _, alive = psutil.wait_procs(procs, timeout=10)
        assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive), alive  # exited (this test started one)
        assert not (stack.home / "services.json").exists()
        assert not any(process.port_in_use(p) for p in ports)
        assert bystander.poll() is None  # not ours to stop
        again = services_cli("down", "--home", str(stack.home))
        assert again.returncode == 0 and "nothing to stop" in again.stdout
    finally:
        stop_stack(stack)
        bystander.kill()
        bystander.wait()
