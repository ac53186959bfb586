"""The local service stack: ``spi up``, ``spi down``, ``spi status``.

    spi up [--prefect-port 4200] [--mlflow-port 5000] [--serve-port 4201] [--db URL] [--home DIR]
    spi status [--home DIR] [--json]
    spi down [--home DIR]

``spi up`` starts, each bound to 127.0.0.1 and detached in its own process group:

    prefect-server   ``prefect server start`` (API + UI), database <home>/prefect/prefect.db or --prefect-db
    mlflow-server    ``mlflow server`` (tracking + model registry on one database: --db, default
                     sqlite:///<home>/mlflow.db; artifacts proxied to <home>/mlartifacts)
    serve            ``python -m flows.serve``: registers the deployments of flows.deployments with the
                     Prefect server and runs their flow runs (health: the runner's webserver)

It records each process (pid, start time, log file, URL) in <home>/services.json, waits for the HTTP
health endpoints and prints start-up time and memory (RSS of the process tree). ``spi down`` stops
exactly the recorded processes (checked by pid *and* start time, so a reused pid is never signalled)
and their descendants. docker/compose.yaml runs the same services with the same environment
(``SERVICE_ENV``; tests/docker compares them).

Prefect and MLflow each keep their own schema history in a table named ``alembic_version``, so they
cannot share one database: --db names MLflow's (tracking and registry together), --prefect-db Prefect's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_PORTS = {"prefect-server": 4200, "mlflow-server": 5000, "serve": 4201}
SERVICES = ("prefect-server", "mlflow-server", "serve")  # start order; stopped in reverse
STATE_FILE = "services.json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Offline settings shared by every service, here and in docker/ (compose.yaml, Dockerfiles).
# A value the user already has in the environment wins (e.g. HF_HUB_OFFLINE=0 with a reachable hub).
SERVICE_ENV: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# Every URL here is on 127.0.0.1: never send it through an HTTP(S)_PROXY from the environment.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServiceError(RuntimeError):
    """A service cannot be started, reached or stopped; the message says which and why."""


# --------------------------------------------------------------------------- what to start


@dataclass
class StackConfig:
    home: Path
    prefect_port: int = DEFAULT_PORTS["prefect-server"]
    mlflow_port: int = DEFAULT_PORTS["mlflow-server"]
    serve_port: int = DEFAULT_PORTS["serve"]
    db: str | None = None  # MLflow tracking + registry; default sqlite:///<home>/mlflow.db
    prefect_db: str | None = None  # default sqlite+aiosqlite:///<home>/prefect/prefect.db
    deployments_module: str = "flows.deployments"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]  # on top of the caller's environment and SERVICE_ENV
    url: str  # what a user opens
    health_url: str
    port: int
    cwd: str = str(PROJECT_ROOT)


def resolve_home(home: str | os.PathLike | None) -> Path:
    """--home, else $SPI_HOME, else ~/.spi (absolute, created)."""
    root = Path(home or os.environ.get("SPI_HOME") or Path.home() / ".spi").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def mlflow_db_url(db: str | None, home: Path) -> str:
    """The MLflow backend URI: SQLite file under home by default; postgresql:// gets the psycopg 3 driver."""
    if not db:
        return f"sqlite:///{home / 'mlflow.db'}"
    if db.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    if db.startswith(("sqlite:///", "postgresql+", "mysql", "mssql")):
        return db
    raise ServiceError(
        f"--db {db!r} is not a database URL: use e.g. sqlite:////abs/path/mlflow.db or "
        f"postgresql://user:password@127.0.0.1:5432/mlflow"
    )


def prefect_db_url(db: str | None, home: Path) -> str:
    """Prefect's database: SQLite (aiosqlite) under home by default; PostgreSQL through asyncpg."""
    if not db:
        return f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}"
    scheme, rest = db.split("://", 1) if "://" in db else ("", db)
    if scheme in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+asyncpg"):
        return "postgresql+asyncpg://" + rest
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return "sqlite+aiosqlite://" + rest
    raise ServiceError(f"--prefect-db {db!r} is not a SQLite or PostgreSQL URL")


def plan(cfg: StackConfig) -> list[Service]:
    """The services ``spi up`` starts, in start order (the compose file mirrors this; see tests/docker)."""
    py = sys.executable
    mlflow_db = mlflow_db_url(cfg.db, cfg.home)
    prefect_home = cfg.home / "prefect"
    prefect = Service(
        name="prefect-server",
        argv=[
            py,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            HOST,
            "--port",
            str(cfg.prefect_port),
            "--workers",
            "1",
            "--analytics-off",
        ],
        env={
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": prefect_db_url(cfg.prefect_db, cfg.home),
            "PREFECT_SERVER_UI_API_URL": cfg.prefect_api_url,
            "PREFECT_API_URL": cfg.prefect_api_url,
        },
        url=f"http://{HOST}:{cfg.prefect_port}",
        health_url=f"{cfg.prefect_api_url}/health",
        port=cfg.prefect_port,
    )
    mlflow = Service(
        name="mlflow-server",
        argv=[
            py,
            "-m",
            "mlflow",
            "server",
            "--host",
            HOST,
            "--port",
            str(cfg.mlflow_port),
            "--backend-store-uri",
            mlflow_db,
            "--registry-store-uri",
            mlflow_db,
            "--artifacts-destination",
            str(cfg.home / "mlartifacts"),
            "--serve-artifacts",
            "--workers",
            "1",
        ],
        env={},
        url=cfg.mlflow_url,
        health_url=f"{cfg.mlflow_url}/health",
        port=cfg.mlflow_port,
    )
    serve = Service(
        name="serve",
        argv=[py, "-m", "flows.serve", "--module", cfg.deployments_module],
        env={
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_API_URL": cfg.prefect_api_url,
            "MLFLOW_TRACKING_URI": cfg.mlflow_url,
            "SPI_HOME": str(cfg.home),
            "PREFECT_RUNNER_SERVER_ENABLE": "true",
            "PREFECT_RUNNER_SERVER_HOST": HOST,
            "PREFECT_RUNNER_SERVER_PORT": str(cfg.serve_port),
        },
        url=f"http://{HOST}:{cfg.serve_port}",
        health_url=f"http://{HOST}:{cfg.serve_port}/health",
        port=cfg.serve_port,
    )
    return [prefect, mlflow, serve]


def service_environment(service: Service, base: dict[str, str] | None = None) -> dict[str, str]:
    """base (default os.environ) + SERVICE_ENV where base lacks a key + the service's own settings."""
    env = dict(os.environ if base is None else base)
    for key, value in SERVICE_ENV.items():
        env.setdefault(key, value)
    env.update(service.env)
    for key in ("NO_PROXY", "no_proxy"):  # the services talk to each other on loopback, never via a proxy
        hosts = [h for h in env.get(key, "").split(",") if h]
        env[key] = ",".join(hosts + [h for h in ("127.0.0.1", "localhost") if h not in hosts])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# --------------------------------------------------------------------------- processes


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _listener(port: int) -> str:
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(clean, indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- Prefect API helpers


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


# --------------------------------------------------------------------------- commands


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
    state = load_state(home)
    running = [n for n, r in state["services"].items() if is_alive(r)]
    if running:
        print(
            f"error: {', '.join(running)} already running from {state_path(home)}; "
            f"`spi status` shows them, `spi down` stops them",
            file=sys.stderr,
        )
        return 1
    try:
        if args.db and args.prefect_db and args.db == args.prefect_db:
            raise ServiceError(
                "--db and --prefect-db must name different databases (both keep an alembic_version table)"
            )
        services, note = services_to_start(cfg)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if note:
        print(f"note: {note}")
    flags = {"prefect-server": "--prefect-port", "mlflow-server": "--mlflow-port", "serve": "--serve-port"}
    ports = [s.port for s in services]
    if len(set(ports)) != len(ports):
        print(
            f"error: the ports must differ ({', '.join(f'{s.name} {s.port}' for s in services)})",
            file=sys.stderr,
        )
        return 2
    for s in services:
        if port_in_use(s.port):
            print(
                f"error: port {s.port} on {HOST} (for {s.name}) is taken by {_listener(s.port)}; "
                f"stop it or choose another with {flags[s.name]} N",
                file=sys.stderr,
            )
            return 1
    (home / "prefect").mkdir(exist_ok=True)
    (home / "mlartifacts").mkdir(exist_ok=True)
    state = {"home": str(home), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "services": {}}
    t0 = time.time()
    print(f"starting on {HOST} (home {home}, state {state_path(home)}) ...", flush=True)
    try:
        # the two servers start together; the serving process needs the Prefect API
        for s in services[:2]:
            state["services"][s.name] = start(s, home / "logs" / f"{s.name}.log")
            save_state(home, state)
        for s in services[:2]:
            _report_ready(state["services"][s.name], wait_healthy(state["services"][s.name], args.timeout))
        for s in services[2:]:
            state["services"][s.name] = start(s, home / "logs" / f"{s.name}.log")
            save_state(home, state)
            _report_ready(state["services"][s.name], wait_healthy(state["services"][s.name], args.timeout))
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for name in reversed(list(state["services"])):
            print(f"  {name}: {stop(state['services'][name])}", file=sys.stderr)
        state_path(home).unlink(missing_ok=True)
        return 1
    total = sum(tree_rss(r["pid"]) for r in state["services"].values())
    print(f"all up in {time.time() - t0:.1f} s, {_mib(total)} resident in all")
    if "serve" in state["services"]:
        try:
            for d in prefect_deployments(cfg.prefect_api_url):
                sched = "; ".join(describe_schedule(s) for s in d["schedules"]) or "no schedule"
                print(
                    f"  deployment {d['flow_name']}/{d['name']}: {sched}{' (paused)' if d['paused'] else ''}"
                )
        except OSError as exc:
            print(f"  (could not list deployments: {exc})")
    print(f"Prefect UI  {cfg.prefect_api_url[:-4]}\nMLflow UI   {cfg.mlflow_url}")
    print(
        f"to use them from a shell: export PREFECT_API_URL={cfg.prefect_api_url} MLFLOW_TRACKING_URI={cfg.mlflow_url}"
    )
    return 0


def services_to_start(cfg: StackConfig) -> tuple[list[Service], str | None]:
    """plan(cfg), less the serving process while its deployments module does not exist (with a note why)."""
    services = plan(cfg)
    if _find_module(cfg.deployments_module) is None:
        note = (
            f"{cfg.deployments_module} does not exist yet: starting the Prefect and MLflow servers "
            f"without the serving process"
        )
        return [s for s in services if s.name != "serve"], note
    return services, None


def _find_module(name: str):
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None


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
    home = resolve_home(args.home)
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
    home = resolve_home(args.home)
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
    return 0


def add_commands(subparsers) -> None:
    home_help = "folder for the state file, logs and default databases (default $SPI_HOME or ~/.spi)"
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
    """``python -m flows.services up|down|status ...``: the same commands without the rest of ``spi``."""
    parser = argparse.ArgumentParser(prog="python -m flows.services", description="the local service stack")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
