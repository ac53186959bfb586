"""HTTP checks of the stack: health endpoints, waiting for a service to answer, and the Prefect API's
list of deployments with their schedules."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

from flows.stack.plan import ServiceError
from flows.stack.process import is_alive

# Every URL here is on 127.0.0.1: never send it through an HTTP(S)_PROXY from the environment.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with _LOCAL.open(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (OSError, ValueError):
        return False


def wait_healthy(record: dict, timeout: float) -> float:
    """Seconds from start until the health URL answered 2xx; ServiceError if the process died or timed out."""
    deadline = time.monotonic() + timeout
    popen = record.get("_popen")
    while True:
        if http_ok(record["health_url"]):
            return time.time() - record["started_at"]
        died = popen.poll() is not None if popen is not None else not is_alive(record)
        if died or time.monotonic() > deadline:
            why = "exited" if died else f"did not answer {record['health_url']} within {timeout:.0f} s"
            raise ServiceError(
                f"{record['name']} {why}; last lines of {record['log']}:\n{log_tail(record['log'])}"
            )
        time.sleep(0.3)


def log_tail(path: str | os.PathLike, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def prefect_deployments(api_url: str, timeout: float = 5.0) -> list[dict]:
    """Every deployment the Prefect API knows: [{"name", "flow_name", "paused", "schedules": [...]}]."""
    req = urllib.request.Request(
        f"{api_url}/deployments/filter",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with _LOCAL.open(req, timeout=timeout) as resp:
        deployments = json.loads(resp.read())
    flows: dict[str, str] = {}
    if deployments:
        req = urllib.request.Request(
            f"{api_url}/flows/filter", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
        )
        with _LOCAL.open(req, timeout=timeout) as resp:
            flows = {f["id"]: f["name"] for f in json.loads(resp.read())}
    return [
        {
            "id": d["id"],
            "name": d["name"],
            "flow_name": flows.get(d["flow_id"], "?"),
            "paused": d.get("paused"),
            "schedules": [
                {"active": s.get("active"), **(s.get("schedule") or {})} for s in d.get("schedules") or []
            ],
        }
        for d in deployments
    ]


def describe_schedule(schedule: dict) -> str:
    if schedule.get("cron"):
        text = f"cron '{schedule['cron']}' {schedule.get('timezone') or 'UTC (implicit)'}"
    elif schedule.get("interval"):
        text = f"every {schedule['interval']} s"
    else:
        text = f"rrule {schedule.get('rrule')}"
    return text + ("" if schedule.get("active", True) else " (inactive)")
