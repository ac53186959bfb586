"""The processes of the stack: start one detached, see whether it is still the same process, measure its
memory, stop it and its descendants, and the state file that records them (<home>/services.json).

A process is identified by pid *and* start time, so a reused pid is never signalled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from flows.stack.plan import HOST, STATE_FILE, Service, ServiceError, find_home, service_environment
from spi.stagefiles import write_atomic


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def listener(port: int) -> str:
    """'pid 123 (python)' for the process listening on the port, when it can be seen."""
    try:
        import psutil

        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except Exception:
        pass
    return "another process"


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def is_alive(record: dict) -> bool:
    """The recorded process still runs and is the same process (pid + start time)."""
    created = _create_time(int(record["pid"]))
    return created is not None and abs(created - float(record["create_time"])) < 0.5


def tree_rss(pid: int) -> int:
    """Resident memory in bytes of a process and all its descendants (0 if gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def start(service: Service, log_path: Path, env: dict[str, str] | None = None) -> dict:
    """Start a service detached (own session and process group); returns its state record."""
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} spi up: {' '.join(service.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            service.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else service_environment(service),
            cwd=service.cwd,
            start_new_session=True,
            close_fds=True,
        )
    return {
        "name": service.name,
        "pid": proc.pid,
        "pgid": proc.pid,
        "create_time": psutil.Process(proc.pid).create_time(),
        "started_at": time.time(),
        "argv": service.argv,
        "url": service.url,
        "health_url": service.health_url,
        "port": service.port,
        "log": str(log_path),
        "_popen": proc,  # dropped when saved; lets `spi up` reap its own children
    }


def stop(record: dict, timeout: float = 20.0) -> str:
    """SIGTERM the recorded process group and the descendants seen before it; SIGKILL what outlives timeout.

    Only acts when pid and start time still match the record. Returns what happened, in words.
    """
    import psutil

    pid = int(record["pid"])
    if not is_alive(record):
        return "not running"
    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    try:
        os.killpg(int(record["pgid"]), signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in tree[1:]:  # flow-run children may sit in sessions of their own
        try:
            proc.terminate()
        except psutil.Error:
            pass
    popen = record.get("_popen")
    alive = _wait_gone(tree, timeout)
    if popen is not None:
        popen.poll()
    if not alive:
        return "stopped"
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(int(record["pgid"]), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _wait_gone(alive, 5)
    if popen is not None:
        popen.poll()
    return f"killed after {timeout:.0f} s"


def _wait_gone(procs: list, timeout: float) -> list:
    """Wait until every process has exited; returns those still running. A zombie counts as gone: it
    has exited and only waits for its parent (which may be a process other than us) to reap it."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


# --------------------------------------------------------------------------- state file


def state_path(home: Path) -> Path:
    return home / STATE_FILE


def load_state(home: Path) -> dict:
    path = state_path(home)
    if not path.exists():
        return {"services": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ServiceError(f"cannot read {path} ({exc}); remove it after checking that nothing runs") from exc


def save_state(home: Path, state: dict) -> None:
    path = state_path(home)
    clean = {
        **state,
        "services": {
            k: {f: v for f, v in r.items() if not f.startswith("_")} for k, r in state["services"].items()
        },
    }
    write_atomic(path, json.dumps(clean, indent=2) + "\n")


def running_services(home: str | os.PathLike | None = None) -> dict[str, dict]:
    """The services of the stack in :func:`flows.stack.plan.find_home` that still run, by name ({} when
    none, or when nothing was started there). Reads only: no folder or file is created."""
    return {name: r for name, r in load_state(find_home(home))["services"].items() if is_alive(r)}


def stack_mlflow_url(home: str | os.PathLike | None = None) -> str | None:
    """The running stack's MLflow server (http://127.0.0.1:PORT), or None."""
    record = running_services(home).get("mlflow-server")
    return record["url"] if record else None


def stack_prefect_api(home: str | os.PathLike | None = None) -> str | None:
    """The running stack's Prefect API (http://127.0.0.1:PORT/api), or None."""
    record = running_services(home).get("prefect-server")
    return record["health_url"].removesuffix("/health") if record else None
