"""One run's context: the recipe (parsed once), where its files, tracking and store live, and how its
stages run.

    plain    every stage is a plain call of its task function (no Prefect engine): ``run_plain``
    task     every stage is a Prefect task with its result persisted in the work directory (cached by
             its stage key); with ``execution.task_runner: dask`` the rollouts, labels, decodes and
             judgements are sharded by prompt on the flow's Dask runner (flows.sharded) and the value
             fit runs as one task on a worker

Work directory layout (``--workdir`` / ``execution.workdir``)::

    <root>/mlflow.db, mlartifacts/    MLflow tracking + registry (default tracking URI)
    <root>/store.db                   the SQL store (default store URL)
    <root>/judgements.sqlite          judge cache
    <root>/.prefect-results/          persisted task results (the Prefect cache)
    <root>/<recipe>/iteration-K/      rollouts-<key>.jsonl, labels-<key>.jsonl, value-<key>/, shards/
    <root>/<recipe>/eval/             eval set, references, <system>-<key>.json, judge-<system>-<key>.json
    <root>/<recipe>/registry/         guided policies as registered (spi-k with V_1..V_k)
    <root>/<recipe>/report-<digest>.md / summary-<digest>.json
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from spi.config import Recipe, load_recipe
from spi.stagefiles import output_digest

RUNNERS = ("plain", "task")
_PARSED: dict = {}


class StageError(RuntimeError):
    """A stage output that cannot be used (changed on disk, corrupt); the message names the file."""


def resolve_tracking_uri(explicit: str | None = None, workdir: str | os.PathLike | None = None,
                         must_exist: bool = False) -> str:
    """The MLflow tracking/registry URI every command and flow uses, resolved when called (never at import):
    ``explicit`` (a flag, the recipe's tracking.tracking_uri) > $MLFLOW_TRACKING_URI > the MLflow server of
    the running ``spi up`` stack (flows.stack) > the SQLite file <workdir>/mlflow.db (workdir default runs).

    ``must_exist`` is for readers (promote, generate, evaluate): a SQLite database that does not exist
    yet is an error naming the file, so that looking something up never leaves an empty database behind.
    """
    from mlflow_store.tracking import TrackingURIError

    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or _stack_mlflow_url()
    if not uri:
        uri = f"sqlite:///{Path(workdir or 'runs').expanduser().resolve() / 'mlflow.db'}"
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if must_exist and db is not None and not db.is_file():
        raise TrackingURIError(
            f"no MLflow database at {db} (nothing has been tracked there); pass --workdir or --tracking-uri, "
            "set MLFLOW_TRACKING_URI, or start the stack with `spi up`"
        )
    if db is not None and not must_exist:
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


# Names Prefect gives a flow run nobody named: the server's two-word slug (coolname: crimson-otter) and
# the UI's Custom run form's prefill (a Greek letter, digits, a constellation: alpha7-andromedae[-cloud]).
_GREEK = ("alpha|beta|gamma|delta|epsilon|zeta|eta|theta|iota|kappa|lambda|mu|nu|xi|omicron|pi|rho|sigma|tau|"
          "upsilon|phi|chi|psi|omega")
_GENERATED_NAME = re.compile(rf"^(?:[a-z]+-[a-z]+|(?:{_GREEK})[0-9]*-[a-z]+(?:-[a-z]+)?)$")


def typed_run_name(default: str) -> str:
    """For a flow's ``flow_run_name`` callable: the name the user gave the flow run (the Custom run form,
    ``prefect deployment run --flow-run-name``, the client), else ``default``. Prefect renames every run of
    a flow that has a flow_run_name; a name that has the shape of one Prefect generates (see
    ``_GENERATED_NAME``) counts as not given."""
    from prefect.runtime import flow_run

    current = flow_run.name
    if current and not _GENERATED_NAME.fullmatch(current):
        return current
    return default


def _stack_mlflow_url() -> str | None:
    from flows.stack.process import stack_mlflow_url

    return stack_mlflow_url()


def load_run_recipe(recipe: str, overrides: dict | None) -> Recipe:
    """The recipe of a run, parsed once per (source, overrides, file version) in this process: the run
    name, the CLI's checks, the Dask re-entry and the flow body all read the same object."""
    path = Path(recipe)
    stamp = path.stat().st_mtime_ns if path.is_file() else None
    key = (str(recipe), repr(sorted((overrides or {}).items())), stamp)
    if key not in _PARSED:
        _PARSED[key] = load_recipe(recipe, overrides or None)
    return _PARSED[key]


class RunContext:
    """Where one run's files, tracking and store live, and the stage states it saw (plain data only;
    tasks get paths, keys and the recipe, never this object)."""

    def __init__(self, recipe: Recipe, workdir: str | None = None, runner: str = "task"):
        from mlflow_store.store import default_store_url

        if runner not in RUNNERS:
            raise ValueError(f"unknown stage runner '{runner}' (known: {', '.join(RUNNERS)})")
        self.recipe, self.runner = recipe, runner
        self.data = recipe.model_dump(mode="json")
        self.root = Path(workdir or recipe.execution.workdir).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.dir = self.root / recipe.name
        self.results = self.root / ".prefect-results"
        # The recipe wins; then MLFLOW_TRACKING_URI; then the running stack (spi up); then files in the workdir.
        self.tracking_uri = resolve_tracking_uri(recipe.tracking.tracking_uri, self.root)
        self.store_url = recipe.tracking.store_url or os.environ.get("SPI_STORE_URL") or default_store_url(self.root)
        self.experiment = recipe.tracking.experiment or recipe.name
        self.registered_model = recipe.tracking.registered_model or f"{recipe.name}-value"
        self.judge_cache = str(self.root / "judgements.sqlite")
        self.run_key = f"{recipe.name}:{recipe.digest}"
        self.reward_name = f"{recipe.reward.kind}:{recipe.reward.model}:{recipe.section_digest('reward')[:8]}"
        self.sharded = runner == "task" and recipe.execution.task_runner == "dask"
        self.stages: dict[str, str] = {}  # stage label -> computed | reused | cached

    def record(self, label: str, result: dict, cached: bool = False) -> dict:
        """Note a stage's state; a stage asked for twice in one run keeps its first state."""
        self.stages.setdefault(label, "cached" if cached else ("computed" if result["computed"] else "reused"))
        return result

    def run_stage(self, label: str, task, on_worker: bool = False, **params) -> dict:
        """Run a stage task (plain call, or Prefect task with its result persisted; ``on_worker``:
        submitted to the flow's task runner). A cached result whose output is gone is recomputed; one
        whose output changed is an error naming the file."""
        if self.runner == "plain":
            return self.record(label, task.fn(**params))
        state = _call(task.with_options(result_storage=self.results), on_worker, params)
        result, cached = state.result(), state.name == "Cached"
        if cached:
            path = Path(result["path"])
            if not path.exists():  # output deleted since: recompute it
                fresh = task.with_options(result_storage=self.results, refresh_cache=True)
                result, cached = _call(fresh, on_worker, params).result(), False
            elif output_digest(path) != result["digest"]:
                raise StageError(
                    f"{path} changed after it was written (digest {output_digest(path)}, recorded "
                    f"{result['digest']}); delete it and its .key file to recompute it"
                )
        return self.record(label, result, cached)


def _call(task, on_worker: bool, params: dict):
    if on_worker:
        future = task.submit(**params)
        future.wait()
        return future.state
    return task(**params, return_state=True)
