"""MLflow model registry for guided policies, value models (and judges): register, promote by alias, load.

A registered folder is opaque here: a guided policy (``spi.systems.write_guided_policy``: policy.json,
the base model's name and every value model with its beta), or a value model folder. It is logged as an
artifact directory of a child run and registered as a new version of a registered model, with its
evaluation numbers as version tags and the alias ``candidate``. ``promote`` moves the alias
``champion`` to the candidate only when it beats the champion by more than a margin. Registry
stages are deprecated in MLflow 3; they are mirrored only when asked (``use_stages=True``).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Mapping
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


class RegistryError(LookupError):
    """A registered model, version or alias does not exist (message lists what does)."""


@dataclass(frozen=True)
class PromotionDecision:
    """What ``promote`` decided and why."""

    name: str
    promoted: bool
    candidate_version: str
    champion_version: str | None  # the champion before the decision
    metric: str
    candidate_value: float | None
    champion_value: float | None
    margin: float
    reason: str


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
    client = client_for(tracking_uri)
    digest = tree_digest(folder)
    tags = {TAG_FOLDER_DIGEST: digest, TAG_ARTIFACT_PATH: artifact_path}
    tags.update({str(k): repr(float(v)) for k, v in (metrics or {}).items()})

    if not client.search_registered_models(filter_string=f"name = '{_q(name)}'"):
        try:
            client.create_registered_model(name, description="SPI value model")
        except MlflowException:
            pass  # created concurrently
    existing = [
        mv
        for mv in client.search_model_versions(f"name = '{_q(name)}' and run_id = '{_q(run_id)}'")
        if mv.tags.get(TAG_FOLDER_DIGEST) == digest and mv.tags.get(TAG_ARTIFACT_PATH) == artifact_path
    ]
    if existing:
        version = str(existing[0].version)
        for key, value in tags.items():
            if existing[0].tags.get(key) != value:
                client.set_model_version_tag(name, version, key, value)
    else:
        source = log_artifacts(tracking_uri, run_id, folder, artifact_path)
        mv = client.create_model_version(
            name, source, run_id=run_id, tags=tags, description=description, await_creation_for=0
        )
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
    value = get_version(tracking_uri, name, alias_or_version).tags.get(metric)
    return float(value) if value is not None else None


def promote(
    tracking_uri: str,
    name: str,
    margin: float,
    metric: str = "win_rate",
    use_stages: bool = False,
) -> PromotionDecision:
    """Move alias ``champion`` to the ``candidate`` version iff candidate's ``metric`` exceeds the
    champion's by more than ``margin`` points (no champion: promote). Records the reason as the tag
    ``spi.promotion`` on the candidate version; with ``use_stages`` also mirrors the deprecated stages
    (promoted -> Production, previous versions archived; not promoted -> Staging)."""
    client = client_for(tracking_uri)
    cand = get_version(tracking_uri, name, CANDIDATE)
    aliases = dict(client.get_registered_model(name).aliases)
    champ = client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None
    cand_value = _tag_float(cand, metric)
    champ_value = _tag_float(champ, metric) if champ is not None else None

    if champ is not None and str(champ.version) == str(cand.version):
        promoted, reason = False, f"version {cand.version} is already the champion"
    elif cand_value is None:
        promoted, reason = False, f"candidate version {cand.version} has no {metric!r} tag"
    elif champ is None:
        promoted, reason = True, f"no champion yet; candidate {metric}={cand_value:g}"
    elif champ_value is None:
        promoted, reason = (
            True,
            (f"champion version {champ.version} has no {metric!r} tag; candidate {metric}={cand_value:g}"),
        )
    else:
        gain = cand_value - champ_value
        promoted = gain > margin
        verb = "exceeds" if promoted else "does not exceed"
        reason = (
            f"candidate {metric}={cand_value:g} vs champion (version {champ.version}) "
            f"{champ_value:g}: gain {gain:+g} {verb} margin {margin:g}"
        )

    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(cand.version))
    client.set_model_version_tag(name, str(cand.version), TAG_PROMOTION, reason)
    if use_stages:
        stage = "Production" if promoted else "Staging"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stages are deprecated; the user asked for them
            client.transition_model_version_stage(
                name, str(cand.version), stage, archive_existing_versions=promoted
            )
    return PromotionDecision(
        name=name,
        promoted=promoted,
        candidate_version=str(cand.version),
        champion_version=str(champ.version) if champ is not None else None,
        metric=metric,
        candidate_value=cand_value,
        champion_value=champ_value,
        margin=float(margin),
        reason=reason,
    )


def load_registered_value_model(
    name: str, alias_or_version: str | int, tracking_uri: str, dest: str | os.PathLike
) -> Path:
    """Download the folder of ``models:/NAME@ALIAS`` (or version) into ``dest`` and return its path.

    The folder's digest is checked against the one recorded at registration. The caller then reads
    it (``spi.systems.read_guided_policy``, or ``spi.value.load_value_model`` for a value model folder).
    """
    mv = get_version(tracking_uri, name, alias_or_version)
    artifact_path = mv.tags.get(TAG_ARTIFACT_PATH)
    if not mv.run_id or not artifact_path:
        raise RegistryError(
            f"version {mv.version} of {name!r} was not registered by register_value_model "
            f"(no run id or {TAG_ARTIFACT_PATH} tag); source is {mv.source}"
        )
    dest = Path(dest)
    target = dest / artifact_path
    if target.exists():
        shutil.rmtree(target)  # stale download: never mix files of two versions
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
