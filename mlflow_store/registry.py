"""MLflow model registry for guided policies, value models (and judges): register, promote by alias, load.

A guided policy (``spi.systems.write_guided_policy``: policy.json, the base model's name and every
value model with its beta) is registered as an MLflow Model with a pyfunc flavor
(``mlflow_store.policy_model``: ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(prompts)``
answers as spi-k); a value model (or judge) folder is logged as an artifact directory of a child run.
Either becomes a new version of a registered model, with its evaluation numbers as version tags and
the alias ``candidate``; ``load_registered_value_model`` gives back the folder either way. ``promote`` moves the alias
``champion`` to the candidate only when a gate (given by the caller: the paired bootstrap interval of
the two versions' judgements on the same instructions) puts it above the champion by more than a margin. Registry
stages are deprecated in MLflow 3; they are mirrored only when asked (``use_stages=True``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from mlflow_store.tracking import client_for, download_artifacts, log_artifacts
from spi.stagefiles import tree_digest

CANDIDATE = "candidate"
CHAMPION = "champion"
TAG_FOLDER_DIGEST = "spi.folder_sha256"
TAG_ARTIFACT_PATH = "spi.artifact_path"
TAG_PROMOTION = "spi.promotion"
TAG_FORMAT = "spi.format"  # PYFUNC on a guided policy logged as an MLflow Model
PYFUNC = "mlflow-pyfunc"


class RegistryError(LookupError):
    """A registered model, version or alias does not exist (message lists what does)."""


@dataclass(frozen=True)
class PromotionDecision:
    """What ``promote`` decided and why; the interval is the paired win-rate difference candidate -
    champion (points) on ``instructions``, None where none was formed."""

    name: str
    promoted: bool
    candidate_version: str
    champion_version: str | None  # the champion before the decision
    margin: float
    reason: str
    mean_difference: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    instructions: tuple = ()


ANNOTATIONS_ARTIFACT = "judge_annotations"  # the child run's artifact folder: the judge stage's file
def register_value_model(
    tracking_uri: str,
    name: str,
    run_id: str,
    folder: str | os.PathLike,
    metrics: Mapping[str, float] | None = None,
    artifact_path: str = "value_model",
    description: str | None = None,
) -> str:
    """Log ``folder`` as artifacts of ``run_id``, register it as a version of ``name`` tagged with
    ``metrics`` and alias it ``candidate``; returns the version (as a string).

    Idempotent: if a version of ``name`` from the same run with the same folder digest exists, it is
    reused (its tags updated) instead of creating a duplicate.
    """
    def upload() -> tuple[str, str | None]:
        return log_artifacts(tracking_uri, run_id, folder, artifact_path), None

    return _register(tracking_uri, name, run_id, folder, metrics, {TAG_ARTIFACT_PATH: artifact_path}, upload,
                     description, "SPI value model")


def register_guided_policy(
    tracking_uri: str,
    name: str,
    run_id: str,
    folder: str | os.PathLike,
    metrics: Mapping[str, float] | None = None,
    description: str | None = None,
) -> str:
    """Log the guided policy in ``folder`` as an MLflow Model of ``run_id`` (pyfunc flavor, signature,
    input example, metadata: ``mlflow_store.policy_model``) and register it as a version of ``name``
    tagged with ``metrics``, alias ``candidate``; idempotent as ``register_value_model``."""
    from mlflow_store.policy_model import ARTIFACT, log_guided_policy

    def upload() -> tuple[str, str | None]:  # source: the model's location (a models:/ source would make
        model_id = log_guided_policy(tracking_uri, run_id, folder)  # MLflow look it up at the global URI)
        return client_for(tracking_uri).get_logged_model(model_id).artifact_location, model_id

    return _register(tracking_uri, name, run_id, folder, metrics, {TAG_ARTIFACT_PATH: ARTIFACT, TAG_FORMAT: PYFUNC},
                     upload, description, "SPI guided policy")


def _register(tracking_uri: str, name: str, run_id: str, folder, metrics, kind: dict[str, str], upload,
              description: str | None, model_description: str) -> str:
    """A new version of ``name`` from ``upload()`` -> (source, model id), unless the run already
    registered this folder (same digest and kind): then that version, its tags updated."""
    client = client_for(tracking_uri)
    digest = tree_digest(folder)
    tags = {TAG_FOLDER_DIGEST: digest, **kind}
    tags.update({str(k): repr(float(v)) for k, v in (metrics or {}).items()})

    if not client.search_registered_models(filter_string=f"name = '{_q(name)}'"):
        try:
            client.create_registered_model(name, description=model_description)
        except MlflowException:
            pass  # created concurrently
    existing = [
        mv
        for mv in client.search_model_versions(f"name = '{_q(name)}' and run_id = '{_q(run_id)}'")
        if mv.tags.get(TAG_FOLDER_DIGEST) == digest and all(mv.tags.get(k) == v for k, v in kind.items())
    ]
    if existing:
        version = str(existing[0].version)
        for key, value in tags.items():
            if existing[0].tags.get(key) != value:
                client.set_model_version_tag(name, version, key, value)
    else:
        source, model_id = upload()
        mv = client.create_model_version(name, source, run_id=run_id, tags=tags, description=description,
                                         await_creation_for=0, model_id=model_id)
        version = str(mv.version)
    client.set_registered_model_alias(name, CANDIDATE, version)
    return version


def get_version(tracking_uri: str, name: str, alias_or_version: str | int):
    """The ``ModelVersion`` of ``name`` named by an alias (``champion``) or a version number."""
    client = client_for(tracking_uri)
    _require_model(client, tracking_uri, name)
    ref = str(alias_or_version)
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as exc:
        aliases = client.get_registered_model(name).aliases  # {alias: version}
        raise RegistryError(
            f"registered model {name!r} at {tracking_uri!r} has no version or alias {ref!r} "
            f"(aliases: {dict(aliases) or 'none'})"
        ) from exc


def metric_of(tracking_uri: str, name: str, alias_or_version: str | int, metric: str) -> float | None:
    """The evaluation number ``metric`` recorded as a tag on a version, or None."""
    return _tag_float(get_version(tracking_uri, name, alias_or_version), metric)


def version_judgements(tracking_uri: str, name: str, mv, dest: str | os.PathLike) -> dict | None:
    """The judge stage's file ({"judge", "annotations"}) logged with the run of version ``mv``, or None."""
    client = client_for(tracking_uri)
    if not mv.run_id:
        return None
    files = [f for f in client.list_artifacts(mv.run_id, ANNOTATIONS_ARTIFACT) if f.path.endswith(".json")]
    if len(files) != 1:
        return None
    local = download_artifacts(tracking_uri, mv.run_id, files[0].path, Path(dest) / f"{name}-v{mv.version}")
    return json.loads(Path(local).read_text())


def promote(
    tracking_uri: str,
    name: str,
    margin: float,
    gate: Callable[[dict, dict, float], dict] | None = None,
    use_stages: bool = False,
) -> PromotionDecision:
    """Move alias ``champion`` to the ``candidate`` version when ``gate`` says so (no champion yet:
    promote). ``gate(candidate, champion, margin)`` gets both versions' judgements (the judge stage's
    files logged with their runs) and returns {promoted, reason, mean_difference, ci_low, ci_high,
    instructions} (flows pass evaluation.metrics.promotion_gate: the paired interval's lower bound must
    exceed the margin). A negative margin is an error. The decision, the interval and the instructions
    used are recorded as ``spi.promotion*`` tags on the candidate version; with ``use_stages`` the
    deprecated stages are mirrored too (promoted -> Production, previous archived; else Staging)."""
    if not (float(margin) >= 0):
        raise ValueError(f"margin must be >= 0 (win-rate points the candidate must gain), got {margin}")
    client = client_for(tracking_uri)
    cand = get_version(tracking_uri, name, CANDIDATE)
    aliases = dict(client.get_registered_model(name).aliases)
    champ = client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None
    result: dict = {}
    if champ is not None and str(champ.version) == str(cand.version):
        promoted, reason = False, f"version {cand.version} is already the champion"
    elif champ is None:
        promoted, reason = True, "no champion yet"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            found = {v.version: version_judgements(tracking_uri, name, v, tmp) for v in (cand, champ)}
        lacking = [f"version {v}" for v, j in found.items() if j is None]
        if lacking:
            promoted, reason = False, f"{' and '.join(lacking)} logged no {ANNOTATIONS_ARTIFACT}: nothing to pair"
        elif gate is None:
            raise TypeError("promote needs a gate to compare a candidate with a champion "
                            "(flows pass evaluation.metrics.promotion_gate)")
        else:
            result = gate(found[cand.version], found[champ.version], float(margin))
            promoted, reason = bool(result["promoted"]), f"against champion version {champ.version}: {result['reason']}"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(cand.version))
    decision = PromotionDecision(
        name=name, promoted=promoted, candidate_version=str(cand.version),
        champion_version=str(champ.version) if champ is not None else None, margin=float(margin), reason=reason,
        mean_difference=result.get("mean_difference"), ci_low=result.get("ci_low"), ci_high=result.get("ci_high"),
        instructions=tuple(result.get("instructions", ())),
    )
    for key, value in _promotion_tags(decision).items():
        client.set_model_version_tag(name, str(cand.version), key, value)
    if use_stages:
        stage = "Production" if promoted else "Staging"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stages are deprecated; the user asked for them
            client.transition_model_version_stage(
                name, str(cand.version), stage, archive_existing_versions=promoted
            )
    return decision


def _promotion_tags(d: PromotionDecision) -> dict[str, str]:
    """The decision as version tags: spi.promotion (the reason), .decision, .margin, .champion_version, the
    interval and the instructions used (indices, and their count)."""
    tags = {TAG_PROMOTION: d.reason, f"{TAG_PROMOTION}.decision": "promoted" if d.promoted else "not promoted",
            f"{TAG_PROMOTION}.margin": repr(d.margin), f"{TAG_PROMOTION}.champion_version": str(d.champion_version)}
    for key in ("mean_difference", "ci_low", "ci_high"):
        value = getattr(d, key)
        tags[f"{TAG_PROMOTION}.{key}"] = "n/a" if value is None else repr(float(value))
    tags[f"{TAG_PROMOTION}.n_instructions"] = str(len(d.instructions))
    tags[f"{TAG_PROMOTION}.instructions"] = ",".join(str(i) for i in d.instructions)[:5000] or "none"
    return tags


def load_registered_value_model(
    name: str, alias_or_version: str | int, tracking_uri: str, dest: str | os.PathLike
) -> Path:
    """Download the folder of ``models:/NAME@ALIAS`` (or version) into ``dest`` and return its path:
    the guided policy folder inside a pyfunc model's artifacts (the folder its ``load_context`` reads),
    or the folder registered by ``register_value_model``.

    The folder's digest is checked against the one recorded at registration. The caller then reads
    it (``spi.generate.policy_plan``, or ``spi.value.load_value_model`` for a value model folder).
    """
    mv = get_version(tracking_uri, name, alias_or_version)
    artifact_path = mv.tags.get(TAG_ARTIFACT_PATH)
    if not mv.run_id or not artifact_path:
        raise RegistryError(
            f"version {mv.version} of {name!r} was registered by neither register_value_model nor "
            f"register_guided_policy "
            f"(no run id or {TAG_ARTIFACT_PATH} tag); source is {mv.source}"
        )
    dest = Path(dest)
    target = dest / artifact_path
    if target.exists():
        shutil.rmtree(target)  # stale download: never mix files of two versions
    if mv.tags.get(TAG_FORMAT) == PYFUNC:
        from mlflow_store.policy_model import policy_folder_of

        local = policy_folder_of(tracking_uri, mv.source, dest)
    else:
        local = download_artifacts(tracking_uri, mv.run_id, artifact_path, dest)
    expected = mv.tags.get(TAG_FOLDER_DIGEST)
    if expected and tree_digest(local) != expected:
        raise RegistryError(
            f"downloaded folder {local} of {name!r} version {mv.version} does not match its "
            f"registered digest {expected}"
        )
    return local


def _require_model(client, tracking_uri: str, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        names = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(
            f"no registered model named {name!r} at {tracking_uri!r}; "
            f"existing: {', '.join(names) if names else 'none'}"
        ) from exc


def _tag_float(mv, key: str) -> float | None:
    value = mv.tags.get(key)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _q(value: str) -> str:
    return str(value).replace("'", "\\'")
