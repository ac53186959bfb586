"""What ``spi up`` starts: the services, their ports, databases and environment (no process is touched here).

docker/compose.yaml runs the same services with the same environment (``SERVICE_ENV``; tests/docker
compares them). Prefect and MLflow each keep their own schema history in a table named
``alembic_version``, so they cannot share one database: --db names MLflow's (tracking and registry
together), --prefect-db Prefect's.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_PORTS = {"prefect-server": 4200, "mlflow-server": 5000, "serve": 4201}
SERVICES = ("prefect-server", "mlflow-server", "serve")  # start order; stopped in reverse
STATE_FILE = "services.json"
PROJECT_ROOT = Path(__file__).resolve().parents[2]

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


class ServiceError(RuntimeError):
    """A service cannot be started, reached or stopped; the message says which and why."""


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


def pointer_path() -> Path:
    """Where ``spi up`` records its home, so that ``spi status``, ``spi down``, ``spi run`` and ``spi promote``
    find the running stack without --home: $XDG_STATE_HOME/spi/stack-home (default ~/.local/state)."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state).expanduser() / "spi" / "stack-home"


def find_home(home: str | os.PathLike | None = None) -> Path:
    """--home, else $SPI_HOME, else the home the last ``spi up`` recorded (while its state file exists),
    else ~/.spi. Absolute; nothing is created."""
    given = home or os.environ.get("SPI_HOME")
    if given:
        return Path(given).expanduser().resolve()
    try:
        recorded = Path(pointer_path().read_text().strip())
    except OSError:
        recorded = None
    if recorded and recorded.is_absolute() and (recorded / STATE_FILE).is_file():
        return recorded
    return (Path.home() / ".spi").resolve()


def resolve_home(home: str | os.PathLike | None) -> Path:
    """:func:`find_home`, created."""
    root = find_home(home)
    root.mkdir(parents=True, exist_ok=True)
    return root


def record_home(home: Path) -> None:
    """Remember ``home`` as the home of the running stack (see :func:`pointer_path`)."""
    path = pointer_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{home}\n")


def forget_home(home: Path) -> None:
    """Drop the record of ``home`` (only if it still names this home)."""
    path = pointer_path()
    try:
        if Path(path.read_text().strip()) == home:
            path.unlink()
    except OSError:
        pass


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
