"""``spi up``, ``spi down``, ``spi status``: the commands over flows.stack's plan, processes and health checks.

    spi up [--prefect-port 4200] [--mlflow-port 5000] [--serve-port 4201] [--db URL] [--home DIR]
    spi status [--home DIR] [--json]
    spi down [--home DIR]

``spi up`` starts the services of flows.stack.plan, each bound to 127.0.0.1 and detached in its own
process group, records each (pid, start time, log file, URL) in <home>/services.json, waits for the
HTTP health endpoints and prints start-up time and memory (RSS of the process tree). It records its
home (flows.stack.plan.pointer_path), so ``spi status``, ``spi down`` and the commands that track
(``spi run``, ``spi promote``) find the stack without --home. ``spi down`` stops exactly the recorded
processes and their descendants.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flows.stack.health import describe_schedule, http_ok, prefect_deployments, wait_healthy
from flows.stack.plan import (
    DEFAULT_PORTS,
    HOST,
    SERVICES,
    ServiceError,
    StackConfig,
    find_home,
    forget_home,
    record_home,
    resolve_home,
    services_to_start,
)
from flows.stack.process import (
    is_alive,
    listener,
    load_state,
    port_in_use,
    save_state,
    start,
    state_path,
    stop,
    tree_rss,
)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def cmd_up(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    cfg = StackConfig(
        home=home,
        prefect_port=args.prefect_port,
        mlflow_port=args.mlflow_port,
        serve_port=args.serve_port,
        db=args.db,
        prefect_db=args.prefect_db,
        deployments_module=args.deployments,
    )
    services, refused = _services_or_refusal(cfg, args)
    if refused:
        return refused
    (home / "prefect").mkdir(exist_ok=True)
    (home / "mlartifacts").mkdir(exist_ok=True)
    state = {"home": str(home), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "services": {}}
    t0 = time.time()
    print(f"starting on {HOST} (home {home}, state {state_path(home)}) ...", flush=True)
    try:
        _start_all(services, state, home, args.timeout)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for name in reversed(list(state["services"])):
            print(f"  {name}: {stop(state['services'][name])}", file=sys.stderr)
        state_path(home).unlink(missing_ok=True)
        return 1
    record_home(home)
    total = sum(tree_rss(r["pid"]) for r in state["services"].values())
    print(f"all up in {time.time() - t0:.1f} s, {_mib(total)} resident in all")
    if "serve" in state["services"]:
        _print_deployments(cfg.prefect_api_url)
    print(f"Prefect UI  {cfg.prefect_api_url[:-4]}\nMLflow UI   {cfg.mlflow_url}")
    print(
        f"to use them from a shell: export PREFECT_API_URL={cfg.prefect_api_url} MLFLOW_TRACKING_URI={cfg.mlflow_url}"
    )
    return 0


def _services_or_refusal(cfg: StackConfig, args: argparse.Namespace) -> tuple[list, int]:
    """The services to start and 0, or [] and the exit code after printing why nothing may start:
    1 when something already runs or a port is taken, 2 when the arguments contradict each other."""
    state = load_state(cfg.home)
    running = [n for n, r in state["services"].items() if is_alive(r)]
    if running:
        print(
            f"error: {', '.join(running)} already running from {state_path(cfg.home)}; "
            f"`spi status` shows them, `spi down` stops them",
            file=sys.stderr,
        )
        return [], 1
    try:
        if args.db and args.prefect_db and args.db == args.prefect_db:
            raise ServiceError(
                "--db and --prefect-db must name different databases (both keep an alembic_version table)"
            )
        services, note = services_to_start(cfg)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return [], 2
    if note:
        print(f"note: {note}")
    flags = {"prefect-server": "--prefect-port", "mlflow-server": "--mlflow-port", "serve": "--serve-port"}
    ports = [s.port for s in services]
    if len(set(ports)) != len(ports):
        print(
            f"error: the ports must differ ({', '.join(f'{s.name} {s.port}' for s in services)})",
            file=sys.stderr,
        )
        return [], 2
    for s in services:
        if port_in_use(s.port):
            print(
                f"error: port {s.port} on {HOST} (for {s.name}) is taken by {listener(s.port)}; "
                f"stop it or choose another with {flags[s.name]} N",
                file=sys.stderr,
            )
            return [], 1
    return services, 0


def _start_all(services: list, state: dict, home: Path, timeout: float) -> None:
    """Start the services, recording each in the state file as it starts; ServiceError when one fails.
    The two servers start together; the serving process needs the Prefect API, so it starts after."""
    for s in services[:2]:
        state["services"][s.name] = start(s, home / "logs" / f"{s.name}.log")
        save_state(home, state)
    for s in services[:2]:
        _report_ready(state["services"][s.name], wait_healthy(state["services"][s.name], timeout))
    for s in services[2:]:
        state["services"][s.name] = start(s, home / "logs" / f"{s.name}.log")
        save_state(home, state)
        _report_ready(state["services"][s.name], wait_healthy(state["services"][s.name], timeout))


def _print_deployments(api_url: str) -> None:
    try:
        for d in prefect_deployments(api_url):
            sched = "; ".join(describe_schedule(s) for s in d["schedules"]) or "no schedule"
            print(f"  deployment {d['flow_name']}/{d['name']}: {sched}{' (paused)' if d['paused'] else ''}")
    except OSError as exc:
        print(f"  (could not list deployments: {exc})")


def _report_ready(record: dict, seconds: float) -> None:
    record["ready_s"] = round(seconds, 2)
    record["rss_at_ready"] = tree_rss(record["pid"])
    print(
        f"  {record['name']:<15} {record['url']:<24} pid {record['pid']:<7} ready in {seconds:5.1f} s  "
        f"RSS {_mib(record['rss_at_ready'])}  log {record['log']}",
        flush=True,
    )
    home = Path(record["log"]).parent.parent
    state = load_state(home)
    if record["name"] in state["services"]:
        state["services"][record["name"]].update(
            ready_s=record["ready_s"], rss_at_ready=record["rss_at_ready"]
        )
        save_state(home, state)


def status_rows(home: Path) -> list[dict]:
    rows = []
    for name, record in load_state(home)["services"].items():
        alive = is_alive(record)
        rows.append(
            {
                "name": name,
                "url": record["url"],
                "pid": record["pid"],
                "alive": alive,
                "healthy": alive and http_ok(record["health_url"], timeout=2),
                "rss": tree_rss(record["pid"]) if alive else 0,
                "log": record["log"],
            }
        )
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    home = find_home(args.home)  # looking creates nothing
    rows = status_rows(home)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"nothing started by `spi up` with home {home}")
    else:
        for r in rows:
            state = ("healthy" if r["healthy"] else "alive, not answering") if r["alive"] else "not running"
            rss = f"RSS {_mib(r['rss'])}" if r["alive"] else ""
            print(f"{r['name']:<15} {r['url']:<24} pid {r['pid']:<7} {state:<21} {rss:<12} log {r['log']}")
    return 0 if rows and all(r["healthy"] for r in rows) else (0 if not rows else 1)


def cmd_down(args: argparse.Namespace) -> int:
    home = find_home(args.home)
    state = load_state(home)
    if not state["services"]:
        print(f"nothing to stop (no {state_path(home)})")
        return 0
    failed = False
    for name in reversed([n for n in SERVICES if n in state["services"]]):
        record = state["services"][name]
        outcome = stop(record, timeout=args.timeout)
        print(f"  {name:<15} pid {record['pid']:<7} {outcome}")
        failed |= is_alive(record)
    if failed:
        print("error: some processes outlived SIGKILL; the state file is kept", file=sys.stderr)
        return 1
    state_path(home).unlink(missing_ok=True)
    forget_home(home)
    return 0


def add_commands(subparsers) -> None:
    home_help = (
        "folder for the state file, logs and default databases (default $SPI_HOME, else the home the "
        "running `spi up` recorded, else ~/.spi)"
    )
    up = subparsers.add_parser(
        "up", help="start the Prefect server, MLflow server and serving process on 127.0.0.1"
    )
    up.add_argument("--prefect-port", type=int, default=DEFAULT_PORTS["prefect-server"])
    up.add_argument("--mlflow-port", type=int, default=DEFAULT_PORTS["mlflow-server"])
    up.add_argument(
        "--serve-port",
        type=int,
        default=DEFAULT_PORTS["serve"],
        help="health endpoint of the serving process",
    )
    up.add_argument(
        "--db",
        help="MLflow tracking + registry database URL (default sqlite:///<home>/mlflow.db); "
        "e.g. postgresql://user:pw@127.0.0.1:5432/mlflow",
    )
    up.add_argument(
        "--prefect-db",
        help="Prefect's database URL (default SQLite under <home>/prefect); must differ from --db",
    )
    up.add_argument("--home", help=home_help)
    up.add_argument(
        "--deployments",
        default="flows.deployments",
        help="module whose deployments() the serving process serves",
    )
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each health check")
    up.set_defaults(func=cmd_up)

    down = subparsers.add_parser("down", help="stop what `spi up` started")
    down.add_argument("--home", help=home_help)
    down.add_argument("--timeout", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL")
    down.set_defaults(func=cmd_down)

    status = subparsers.add_parser("status", help="what `spi up` started: URL, pid, alive, RSS")
    status.add_argument("--home", help=home_help)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.stack up|down|status ...``: the same commands without the rest of ``spi``."""
    parser = argparse.ArgumentParser(prog="python -m flows.stack", description="the local service stack")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
