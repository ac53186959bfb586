"""Fixtures for the service tests: free loopback ports, and one real stack (`spi up`) per module.

Every process started here is stopped here, by pid (the recorded process groups), never by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import free_port

# `spi up` records its home under $XDG_STATE_HOME/spi (flows.stack.plan.pointer_path): tests/conftest.py
# points it (and SPI_HOME) at a private folder, never the user's.

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
STANDIN = "standin_deployments"  # tests/services/standin_deployments.py


def served_module() -> str:
    """What the test stack serves: the project's deployments once flows/deployments.py exists."""
    import importlib.util

    return "flows.deployments" if importlib.util.find_spec("flows.deployments") else STANDIN


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def services_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m flows.stack ARGS`` (the code behind ``spi up|down|status``)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), full_env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "flows.stack", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=timeout,
    )


class Stack:
    def __init__(self, home: Path, ports: dict[str, int], up: subprocess.CompletedProcess, deployments: str):
        self.home, self.ports, self.up, self.deployments = home, ports, up, deployments

    @property
    def state(self) -> dict:
        return json.loads((self.home / "services.json").read_text())

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"


def start_stack(home: Path, deployments: str | None = None, extra: tuple[str, ...] = ()) -> Stack:
    deployments = deployments or served_module()
    prefect, mlflow, serve = free_ports(3)
    up = services_cli(
        "up",
        "--home",
        str(home),
        "--prefect-port",
        str(prefect),
        "--mlflow-port",
        str(mlflow),
        "--serve-port",
        str(serve),
        "--deployments",
        deployments,
        *extra,
    )
    return Stack(home, {"prefect": prefect, "mlflow": mlflow, "serve": serve}, up, deployments)


def stop_stack(stack: Stack) -> subprocess.CompletedProcess | None:
    """`spi down`; if that fails, kill the recorded groups directly so no test leaves a server behind."""
    if not (stack.home / "services.json").exists():
        return None
    down = services_cli("down", "--home", str(stack.home), "--timeout", "15", timeout=120)
    if (stack.home / "services.json").exists():
        from flows.stack.process import load_state, stop

        for record in load_state(stack.home)["services"].values():
            stop(record, timeout=5)
    return down


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A real stack from `spi up` on free ports with the stand-in deployments; `spi down` afterwards."""
    home = tmp_path_factory.mktemp("spi_home")
    s = start_stack(home)
    try:
        if s.up.returncode != 0:
            pytest.fail(f"spi up failed ({s.up.returncode}):\n{s.up.stdout}\n{s.up.stderr}")
        yield s
    finally:
        stop_stack(s)
