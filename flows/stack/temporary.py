"""The Prefect API of a command that runs flows in its own process (``spi run``).

    1. the API the user configured (PREFECT_API_URL, a Prefect profile), as it is;
    2. else the Prefect server of the running ``spi up`` stack (flows.stack.process.stack_prefect_api);
    3. else a temporary server started here, the way Prefect starts its own temporary one (uvicorn on
       ``prefect.server.api.server:create_app``, no UI), but as a child that the kernel kills when this
       process dies: Linux's PR_SET_PDEATHSIG, set in the child before it execs. A ``kill -9`` of
       ``spi run`` then leaves nothing listening (Prefect's own temporary server outlives a SIGKILL of
       its parent: it is stopped by an atexit hook, which SIGKILL skips).

The death signal belongs to the thread that started the child, so call :func:`prefect_api` from the
thread that runs the command (the main thread of ``spi``). On systems without prctl the temporary
server is stopped on a normal exit only.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flows.stack.health import http_ok
from flows.stack.plan import HOST, ServiceError
from flows.stack.process import stack_prefect_api

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@contextmanager
def prefect_api(announce: Callable[[str], None] = print) -> Iterator[str]:
    """The Prefect API URL flows of this process report to, for the duration of the block."""
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    url = stack_prefect_api()
    if url:
        announce(f"Prefect API {url} (the stack's)")
        with _use_api(url):
            yield url
        return
    server = start_temporary_server()
    try:
        announce(f"Prefect API {server.url} (temporary server, pid {server.pid}; it stops with this command)")
        with _use_api(server.url):
            yield server.url
            _send_queued_logs()
    finally:
        server.stop()


def _send_queued_logs() -> None:
    """Prefect ships run logs to the API from a background worker: send what is queued while the
    temporary server still listens, so that no "Error logging to API" follows a finished run."""
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


@contextmanager
def _use_api(url: str) -> Iterator[None]:
    """PREFECT_API_URL = url in Prefect's settings of this process and in the environment of its children."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


class TemporaryServer:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.pid = proc.pid
        self.url = f"http://{HOST}:{port}/api"

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_temporary_server(timeout: float | None = None) -> TemporaryServer:
    """A Prefect API server on a free loopback port, healthy, dying with this process (Linux)."""
    from prefect.settings import get_current_settings

    timeout = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
            "--host", HOST, "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    guard = functools.partial(_die_with_parent, os.getpid()) if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=guard)
    server = TemporaryServer(proc, port)
    deadline = time.monotonic() + timeout
    while not http_ok(f"{server.url}/health", timeout=2):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            why = f"exited with code {proc.returncode}" if proc.returncode is not None else f"not healthy in {timeout:.0f} s"
            raise ServiceError(f"the temporary Prefect server on port {port} {why}; start the stack with "
                               "`spi up` or set PREFECT_API_URL")
        time.sleep(0.2)
    return server


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGKILL me when the thread that started me dies; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(1)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]
