"""Where commands find the stack, without servers: the home `spi up` records, and the one tracking location
(flag > MLFLOW_TRACKING_URI > the running stack > the work directory's SQLite file).

A "running" stack here is a state file whose records name this very test process (pid and start time),
so flows.stack sees it alive; nothing is started and nothing is signalled.
"""

from __future__ import annotations

import argparse
import json
import os

import psutil
import pytest

from flows.context import resolve_tracking_uri
from flows.stack import commands, process
from flows.stack import plan as P
from mlflow_store.tracking import TrackingURIError


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No SPI_HOME, MLFLOW_TRACKING_URI or PREFECT_API_URL from outside; a private pointer folder."""
    for key in ("SPI_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path


def fake_running_stack(home, mlflow_port=5999, prefect_port=4299) -> None:
    """A state file in home whose services are 'alive': each record names this process."""
    me = psutil.Process(os.getpid())
    record = {"pid": me.pid, "pgid": me.pid, "create_time": me.create_time(), "log": str(home / "x.log")}
    services = {
        "prefect-server": {**record, "name": "prefect-server", "url": f"http://127.0.0.1:{prefect_port}",
                           "health_url": f"http://127.0.0.1:{prefect_port}/api/health"},
        "mlflow-server": {**record, "name": "mlflow-server", "url": f"http://127.0.0.1:{mlflow_port}",
                          "health_url": f"http://127.0.0.1:{mlflow_port}/health"},
    }
    home.mkdir(parents=True, exist_ok=True)
    (home / P.STATE_FILE).write_text(json.dumps({"home": str(home), "services": services}))


def test_home_order_flag_then_env_then_recorded_then_default(clean_env, monkeypatch):
    recorded = clean_env / "elsewhere"
    assert P.find_home(None) == (P.Path.home() / ".spi").resolve()  # nothing recorded
    fake_running_stack(recorded)
    P.record_home(recorded)
    assert P.find_home(None) == recorded
    monkeypatch.setenv("SPI_HOME", str(clean_env / "env-home"))
    assert P.find_home(None) == clean_env / "env-home"
    assert P.find_home(str(clean_env / "flag-home")) == clean_env / "flag-home"
    monkeypatch.delenv("SPI_HOME")
    (recorded / P.STATE_FILE).unlink()  # `spi down` done by hand: the record no longer counts
    assert P.find_home(None) == (P.Path.home() / ".spi").resolve()
    P.forget_home(recorded)
    assert not P.pointer_path().exists()


def test_status_and_down_find_the_recorded_home_without_flag(clean_env, capsys):
    home = clean_env / "stack-home"
    fake_running_stack(home, mlflow_port=5998)
    P.record_home(home)
    assert commands.cmd_status(argparse.Namespace(home=None, json=True)) in (0, 1)
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {"prefect-server", "mlflow-server"}
    assert all(r["alive"] for r in rows) and rows[1]["url"] == "http://127.0.0.1:5998"
    # `spi down` without --home reaches the same state file (with nothing alive there, so it signals nobody)
    state = json.loads((home / P.STATE_FILE).read_text())
    for record in state["services"].values():
        record["create_time"] -= 1000.0  # a different process now: never signalled
    (home / P.STATE_FILE).write_text(json.dumps(state))
    assert commands.cmd_down(argparse.Namespace(home=None, timeout=1)) == 0
    assert "not running" in capsys.readouterr().out
    assert not (home / P.STATE_FILE).exists() and not P.pointer_path().exists()


def test_running_stack_urls(clean_env):
    home = clean_env / "h"
    assert process.stack_mlflow_url(home) is None and process.stack_prefect_api(home) is None
    assert not home.exists()  # looking did not create the home
    fake_running_stack(home, mlflow_port=5997, prefect_port=4297)
    assert process.stack_mlflow_url(home) == "http://127.0.0.1:5997"
    assert process.stack_prefect_api(home) == "http://127.0.0.1:4297/api"


def test_tracking_uri_order(clean_env, monkeypatch):
    workdir = clean_env / "work"
    local = f"sqlite:///{workdir / 'mlflow.db'}"
    assert resolve_tracking_uri(None, workdir) == local
    home = clean_env / "home"
    fake_running_stack(home, mlflow_port=5996)
    monkeypatch.setenv("SPI_HOME", str(home))
    assert resolve_tracking_uri(None, workdir) == "http://127.0.0.1:5996"  # the running stack
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5995")
    assert resolve_tracking_uri(None, workdir) == "http://127.0.0.1:5995"  # the environment, as in MLflow
    assert resolve_tracking_uri("http://127.0.0.1:5994", workdir) == "http://127.0.0.1:5994"  # the flag


def test_readers_never_create_a_database(clean_env):
    workdir = clean_env / "work"
    with pytest.raises(TrackingURIError, match=r"no MLflow database at .*work/mlflow\.db"):
        resolve_tracking_uri(None, workdir, must_exist=True)
    missing = clean_env / "other" / "mlflow.db"
    with pytest.raises(TrackingURIError, match="no MLflow database"):
        resolve_tracking_uri(f"sqlite:///{missing}", workdir, must_exist=True)
    assert not workdir.exists() and not missing.parent.exists()


def test_run_context_tracks_to_the_running_stack(clean_env, monkeypatch):
    from flows.context import RunContext
    from spi.config import load_recipe

    recipe = load_recipe(str(P.PROJECT_ROOT / "tests" / "flows" / "tiny.yaml"))
    home = clean_env / "home"
    fake_running_stack(home, mlflow_port=5993)
    P.record_home(home)  # found through the record `spi up` leaves, no SPI_HOME needed
    assert RunContext(recipe, str(clean_env / "w")).tracking_uri == "http://127.0.0.1:5993"
    assert not (clean_env / "w" / "mlflow.db").exists()


def test_spi_run_uses_the_stacks_prefect_api(clean_env):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.stack.temporary import prefect_api

    home = clean_env / "home"
    fake_running_stack(home, prefect_port=4296)
    P.record_home(home)
    seen = []
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with prefect_api(seen.append) as url:
            assert url == "http://127.0.0.1:4296/api"
            assert PREFECT_API_URL.value() == url and os.environ["PREFECT_API_URL"] == url
        assert "PREFECT_API_URL" not in os.environ
    assert seen == ["Prefect API http://127.0.0.1:4296/api (the stack's)"]


def test_spi_bench_flow_uses_the_stacks_prefect_api(clean_env, monkeypatch, capsys):
    """`spi bench flow` reaches the Prefect API as `spi run` does: here the running stack's, no server of its own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import bench
    from flows.cli import main

    home = clean_env / "home"
    fake_running_stack(home, prefect_port=4295)
    P.record_home(home)
    seen = []
    monkeypatch.setattr(bench, "run_flow_bench", lambda *args, **kwargs: seen.append(PREFECT_API_URL.value()) or {})
    monkeypatch.setattr(bench, "format_flow_table", lambda result: "table")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["bench", "flow", "--repeats", "1"]) == 0
    assert seen == ["http://127.0.0.1:4295/api"]
    assert "Prefect API http://127.0.0.1:4295/api (the stack's)" in capsys.readouterr().err


def test_promote_flow_resolves_the_tracking_location_when_it_runs(clean_env, monkeypatch):
    """The promote deployment's defaults (tracking_uri None, workdir runs) resolve when the flow runs: the
    serving process's MLFLOW_TRACKING_URI (the stack's server); with none, a missing database is an
    error and is not created (the flow once retried and left an empty mlflow.db behind)."""
    from flows import model_flows, records

    seen = []
    monkeypatch.setattr(records, "promote_task", lambda uri, *args, **kwargs: seen.append(uri) or {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5992")
    model_flows.promote_value_model.fn(registered_model="m")
    assert seen == ["http://127.0.0.1:5992"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(TrackingURIError, match="no MLflow database"):
        model_flows.promote_value_model.fn(registered_model="m", workdir=str(clean_env / "w"))
    assert seen == ["http://127.0.0.1:5992"] and not (clean_env / "w" / "mlflow.db").exists()
