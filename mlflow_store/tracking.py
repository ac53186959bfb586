"""MLflow tracking with explicit run ids.

One MLflow experiment per recipe name, one parent run per experiment run, one child run per SPI
iteration and per baseline. Every function takes the tracking URI and a run id and talks to MLflow
through ``MlflowClient``: Prefect runs tasks in threads and MLflow's "active run" is thread-local, so
nothing here touches ``mlflow.start_run`` or the global tracking URI.

Default layout in a work directory: ``<workdir>/mlflow.db`` (SQLite tracking + registry) and
``<workdir>/mlartifacts`` (artifacts). The experiment's artifact_location is set explicitly so
artifacts never land in ``./mlruns``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

# Offline / fail-fast defaults. setdefault: a user's own settings win.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

TAG_ROLE = "spi.role"  # "experiment" (parent) or "child"
TAG_DIGEST = "spi.recipe_digest"
TAG_CODE_VERSION = "spi.code_version"
TAG_SYSTEM = "spi.system"
TAG_ITERATION = "spi.iteration"
TAG_PARENT = "mlflow.parentRunId"
TAG_OVERRIDES = "spi.overrides"  # the overrides (--set, the UI form's) the parent run was started with
TAG_NOT_AVAILABLE = "spi.not_available."  # + metric name: why a child run has no such metric
# MLflow 3 records what an experiment is for as this tag; "custom_model_development" is the runs view's
# kind (the UI's "Model training"), "genai_development" the traces view's.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

_KNOWN_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks"}
_CONNECT_TIMEOUT_S = 3.0
_PARAM_MAX_LEN = 6000  # MLflow 3's limit on a param value
_PARAM_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")

_verified: dict[str, MlflowClient] = {}  # checked URIs and their client (its artifact-repo cache kept)
_verified_lock = threading.Lock()
_artifact_roots: dict[tuple[str, str], str] = {}  # (tracking URI, run id) -> the run's artifact URI
_child_lock = threading.Lock()  # find-or-create must not race between threads of one process


class TrackingURIError(RuntimeError):
    """The tracking URI is malformed or its server/database cannot be reached."""


# --------------------------------------------------------------------------- URIs and clients


def default_tracking_uri(workdir: str | os.PathLike) -> str:
    """``sqlite:///<workdir>/mlflow.db`` (absolute path; creates the work directory)."""
    root = Path(workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """``<dir of the SQLite file>/mlartifacts`` as a file URI; None (server decides) otherwise."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    db_path = Path(tracking_uri[len("sqlite:///") :])
    return (db_path.parent / "mlartifacts").resolve().as_uri()


def _check_uri_syntax(tracking_uri: str) -> None:
    if not isinstance(tracking_uri, str) or not tracking_uri.strip():
        raise TrackingURIError(f"MLflow tracking URI {tracking_uri!r} is empty")
    scheme = urlparse(tracking_uri).scheme.split("+", 1)[0]
    if scheme not in _KNOWN_SCHEMES or ("://" not in tracking_uri and scheme != "databricks"):
        raise TrackingURIError(
            f"MLflow tracking URI {tracking_uri!r} is malformed: expected e.g. "
            f"'sqlite:////abs/path/mlflow.db', 'postgresql+psycopg://user@host/db' or "
            f"'http://127.0.0.1:5000' (known schemes: {', '.join(sorted(_KNOWN_SCHEMES))})"
        )
    if scheme in ("http", "https"):
        parsed = urlparse(tracking_uri)
        if not parsed.hostname:
            raise TrackingURIError(f"MLflow tracking URI {tracking_uri!r} has no host")
        try:
            port = parsed.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise TrackingURIError(f"MLflow tracking URI {tracking_uri!r} has a bad port") from exc
        try:  # fail in seconds, not after MLflow's minutes of retries
            with socket.create_connection((parsed.hostname, port), timeout=_CONNECT_TIMEOUT_S):
                pass
        except OSError as exc:
            raise TrackingURIError(
                f"MLflow tracking server at {tracking_uri!r} is unreachable ({exc}); "
                f"start it (mlflow server --host 127.0.0.1 ...) or use a sqlite:/// URI"
            ) from exc
    if scheme == "sqlite":
        path = tracking_uri[len("sqlite:///") :]
        if path and path != ":memory:":
            try:
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrackingURIError(
                    f"MLflow tracking URI {tracking_uri!r}: cannot create the folder of its database ({exc})"
                ) from exc


def client_for(tracking_uri: str) -> MlflowClient:
    """An ``MlflowClient`` for tracking and registry at ``tracking_uri``, checked once per process.

    Raises TrackingURIError (naming the URI) when the URI is malformed or unreachable.
    """
    _check_uri_syntax(tracking_uri)
    with _verified_lock:
        client = _verified.get(tracking_uri)
    if client is not None:
        return client
    if tracking_uri.startswith("sqlite:///"):
        _new_sqlite_from_template(Path(tracking_uri[len("sqlite:///") :]))
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # MlflowException, SQLAlchemy errors, requests errors
        raise TrackingURIError(f"cannot use MLflow tracking URI {tracking_uri!r}: {exc}") from exc
    with _verified_lock:
        return _verified.setdefault(tracking_uri, client)


def _new_sqlite_from_template(path: Path) -> None:
    """A new SQLite tracking database starts as a copy of an empty one made once per MLflow version
    (in $SPI_CACHE_DIR/mlflow/): MLflow otherwise replays its ~60 schema migrations for every new work
    directory, about 20 s here, most of a small experiment's orchestration time."""
    import mlflow
    from filelock import FileLock

    if path.exists() or os.environ.get("SPI_MLFLOW_TEMPLATE", "1") == "0":
        return
    folder = Path(os.environ.get("SPI_CACHE_DIR") or Path.home() / ".cache" / "spi") / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    template = folder / f"empty-{mlflow.__version__}.db"
    with FileLock(str(template) + ".lock"):
        if not template.exists():
            building = template.with_suffix(".building.db")
            building.unlink(missing_ok=True)
            MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments(max_results=1)
            os.replace(building, template)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(template.read_bytes())
    try:
        os.link(partial, path)  # fails if another process created the database meanwhile: keep theirs
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)


# --------------------------------------------------------------------------- params and versions


def flatten_params(recipe: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}``; lists and other values become JSON/str."""
    flat: dict[str, str] = {}
    for key, value in recipe.items():
        name = _PARAM_KEY_BAD.sub("_", f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else (
            json.dumps(value, sort_keys=True, default=str) if isinstance(value, (list, tuple, dict)) else str(value))
        if len(text) > _PARAM_MAX_LEN:
            text = text[: _PARAM_MAX_LEN - 3] + "..."
        flat[name] = text
    return flat


def code_version(repo_dir: str | os.PathLike | None = None) -> str:
    """The git commit of ``repo_dir`` (with ``-dirty`` when the tree has changes), else the package version."""
    cwd = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent.parent
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return "spi-platform==" + version("spi-platform")
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------- experiments and runs


def get_or_create_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created with ``artifact_location`` (default: beside the DB) if new.

    The experiment is of MLflow 3's kind "custom_model_development" (tag ``mlflow.experimentKind``): its
    runs, not GenAI traces, are what it holds. An existing experiment without a kind gets it; one a user
    gave another kind keeps it."""
    client = client_for(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if TAG_EXPERIMENT_KIND not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return experiment.experiment_id
    location = artifact_location or default_artifact_location(tracking_uri)
    try:
        return client.create_experiment(name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # created by a concurrent caller
        if experiment is None:
            raise
        return experiment.experiment_id


def start_experiment_run(
    tracking_uri: str,
    experiment: str,
    recipe: Mapping,
    digest: str,
    code_version: str,
    run_name: str | None = None,
    artifact_location: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create the parent run of one experiment run (params = flattened recipe, extra ``tags``) and
    return its id."""
    client = client_for(tracking_uri)
    experiment_id = get_or_create_experiment(tracking_uri, experiment, artifact_location)
    tags = {
        TAG_ROLE: "experiment",
        TAG_DIGEST: digest,
        TAG_CODE_VERSION: code_version,
        "mlflow.source.git.commit": code_version,
        **(tags or {}),
    }
    run = client.create_run(experiment_id, tags=tags, run_name=run_name or f"{experiment}-{digest[:8]}")
    log_params(tracking_uri, run.info.run_id, flatten_params(recipe))
    return run.info.run_id


def find_experiment_run(tracking_uri: str, experiment: str, digest: str) -> str | None:
    """The newest parent run of ``experiment`` with recipe digest ``digest``, or None."""
    client = client_for(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = 'experiment' and tags.`{TAG_DIGEST}` = '{_q(digest)}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def find_or_create_child_run(tracking_uri: str, parent_run_id: str, system: str, iteration: int = 0,
                             start_time: float | None = None) -> str:
    """The child run of ``parent_run_id`` for (system, iteration); created only if none exists, starting
    at ``start_time`` (epoch seconds; default now): when the first stage it describes started.

    Baselines use iteration 0. Safe against concurrent calls from threads of one process.
    """
    client = client_for(tracking_uri)
    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    flt = (
        f"tags.`{TAG_PARENT}` = '{_q(parent_run_id)}' and tags.`{TAG_SYSTEM}` = '{_q(system)}' "
        f"and tags.`{TAG_ITERATION}` = '{int(iteration)}'"
    )
    with _child_lock:
        found = client.search_runs(
            [experiment_id], filter_string=flt, order_by=["attributes.start_time ASC"], max_results=1
        )
        if found:
            return found[0].info.run_id
        tags = {
            TAG_ROLE: "child",
            TAG_PARENT: parent_run_id,
            TAG_SYSTEM: system,
            TAG_ITERATION: str(int(iteration)),
        }
        for key in (TAG_DIGEST, TAG_CODE_VERSION):
            if key in parent.data.tags:
                tags[key] = parent.data.tags[key]
        run = client.create_run(experiment_id, tags=tags, run_name=f"{system}-iter{int(iteration)}",
                                start_time=_ms(start_time))
        return run.info.run_id


def child_runs(tracking_uri: str, parent_run_id: str) -> list[dict]:
    """``[{"run_id", "system", "iteration", "status", "metrics"}]`` for every child of a parent run."""
    client = client_for(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{_q(parent_run_id)}'"
    )
    return [
        {
            "run_id": r.info.run_id,
            "system": r.data.tags.get(TAG_SYSTEM),
            "iteration": int(r.data.tags.get(TAG_ITERATION, 0)),
            "status": r.info.status,
            "metrics": dict(r.data.metrics),
        }
        for r in runs
    ]


# --------------------------------------------------------------------------- logging


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, object]) -> None:
    """Log params (already flat); values equal to ones logged before are skipped, so reruns are safe."""
    client = client_for(tracking_uri)
    existing = client.get_run(run_id).data.params
    new = [Param(str(k), str(v)) for k, v in params.items() if existing.get(str(k)) != str(v)]
    for start in range(0, len(new), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=new[start : start + 100])


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, object]) -> None:
    """Set (overwrite) tags on a run."""
    client = client_for(tracking_uri)
    client.log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])


def log_metrics(
    tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None
) -> None:
    """Log numeric metrics at ``step`` (default 0); non-finite values are logged as MLflow allows."""
    client = client_for(tracking_uri)
    now = int(time.time() * 1000)
    batch = [Metric(str(k), float(v), now, int(step or 0)) for k, v in metrics.items()]
    for start in range(0, len(batch), 1000):  # MLflow's batch limit for metrics
        client.log_batch(run_id, metrics=batch[start : start + 1000])


def log_artifacts(
    tracking_uri: str, run_id: str, path: str | os.PathLike, artifact_path: str | None = None
) -> str:
    """Upload a file or folder to the run's artifacts under ``artifact_path``; returns its artifact URI."""
    client = client_for(tracking_uri)
    local = Path(path)
    if not local.exists():
        raise FileNotFoundError(f"cannot log artifacts: {local} does not exist")
    if local.is_dir():
        client.log_artifacts(run_id, str(local), artifact_path)
        rel = artifact_path or ""
    else:
        client.log_artifact(run_id, str(local), artifact_path)
        rel = f"{artifact_path}/{local.name}" if artifact_path else local.name
    return artifact_uri(tracking_uri, run_id, rel)


def artifact_uri(tracking_uri: str, run_id: str, artifact_path: str = "") -> str:
    """The underlying URI (e.g. file:///.../mlartifacts/<run>/artifacts/x) of a run's artifact."""
    base = _artifact_roots.get((tracking_uri, run_id))
    if base is None:  # a run's artifact location never changes
        base = client_for(tracking_uri).get_run(run_id).info.artifact_uri.rstrip("/")
        _artifact_roots[(tracking_uri, run_id)] = base
    return f"{base}/{artifact_path.strip('/')}" if artifact_path else base


def download_artifacts(tracking_uri: str, run_id: str, artifact_path: str, dest: str | os.PathLike) -> Path:
    """Download a run's artifact file or folder into ``dest`` (created); returns the local path."""
    Path(dest).mkdir(parents=True, exist_ok=True)
    return Path(client_for(tracking_uri).download_artifacts(run_id, artifact_path, str(dest)))


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED", end_time: float | None = None) -> None:
    """Mark a run FINISHED (or FAILED / KILLED), ending at ``end_time`` (epoch seconds; default now)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"run status must be FINISHED, FAILED or KILLED, not {status!r}")
    client_for(tracking_uri).set_terminated(run_id, status=status, end_time=_ms(end_time))


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """The MLflow UI's page of an experiment's runs (or of one run), for an http(s) tracking URI; None
    otherwise. ``workflowType=machine_learning`` opens the runs view, not the GenAI traces view."""
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        return None
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "/runs")
    return f"{tracking_uri.rstrip('/')}/#/{page}?workflowType=machine_learning"


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def _q(value: str) -> str:
    """Escape a value for a single-quoted MLflow filter string."""
    return str(value).replace("\\", "\\\\").replace("'", "\\'")
