"""Servers the tests start (mlflow server, mlflow models serve): on 127.0.0.1, in a process group of
their own, waited for until a URL answers, and stopped by their process group id."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to the server and its workers (the group it leads), SIGKILL if they outlive ``timeout``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


@contextlib.contextmanager
def serving(argv: list[str], ready_url: str, log_path: Path, env: dict | None = None,
            timeout: float = 120.0) -> Iterator[subprocess.Popen]:
    """Start ``argv``, wait until ``ready_url`` answers 200 (failing with the log's tail if the server
    exits or the time runs out), yield it, and stop its process group on the way out."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not _answers(ready_url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[:4]} did not answer {ready_url} (exit code {proc.poll()}): "
                                       + Path(log_path).read_text(errors="replace")[-3000:])
                time.sleep(0.5)
            yield proc
        finally:
            stop_group(proc)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False
