"""The SPI loop, once: K iterations of rollouts -> labels -> value fit, then the systems decode.

    iterate(recipe, stages)   iteration k: rollouts of pi_{k-1} (guided by V_1..V_{k-1}), their reward
                              labels, V_k fitted on them; each V_k steers the next rollouts
    systems(recipe)           the systems an experiment compares: its baselines, then spi-1..spi-K,
                              each with the value models it reads (spi.systems)

``stages`` runs each stage: anything with ``rollouts(k, value_dirs)``, ``labels(k, rollouts)`` and
``value(k, rollouts, labels)`` returning a dict with the output's ``path``. :class:`FileStages` calls
``spi.pipeline`` in this process (a Python prompt, the tests); ``flows.stages.FlowStages`` runs the
same stages as plain calls, Prefect tasks or sharded Prefect tasks. :func:`run_spi` is the loop with
file stages and a decode of each system: the library's whole experiment without judging.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from spi import pipeline
from spi.config import Recipe
from spi.systems import value_count

log = logging.getLogger("spi")


def iterate(recipe: Recipe, stages, on_iteration=None) -> tuple[list[dict], list[str]]:
    """The K iterations in order; ``on_iteration(it)`` after each. Returns (iterations, V_1..V_K paths)."""
    iterations, value_dirs = [], []
    for k in range(1, recipe.iterations.count + 1):
        log.info("iteration %d/%d of %s", k, recipe.iterations.count, recipe.name)
        rollouts = stages.rollouts(k, list(value_dirs))
        labels = stages.labels(k, rollouts)
        value = stages.value(k, rollouts, labels)
        it = {"iteration": k, "rollouts": rollouts, "labels": labels, "value": value}
        iterations.append(it)
        value_dirs.append(value["path"])
        if on_iteration:
            on_iteration(it)
    return iterations, value_dirs


def systems(recipe: Recipe) -> list[tuple[str, int | None, int]]:
    """(system, its SPI iteration or None, how many value models it reads) for every compared system."""
    out = [(name, None, value_count(name)) for name in recipe.baselines.names]
    return out + [(f"spi-{k}", k, k) for k in range(1, recipe.iterations.count + 1)]


class FileStages:
    """The stages as plain calls of spi.pipeline, writing ``<workdir>/iteration-k/...``."""

    def __init__(self, recipe: Recipe, workdir: Path, progress: bool = True):
        self.recipe, self.workdir, self.progress = recipe, Path(workdir), progress

    def rollouts(self, k: int, value_dirs: list) -> dict:
        out = self.workdir / f"iteration-{k}" / "rollouts.jsonl"
        return {"path": str(pipeline.generate_rollouts(self.recipe, k, value_dirs, out, self.progress))}

    def labels(self, k: int, rollouts: dict) -> dict:
        out = self.workdir / f"iteration-{k}" / "labels.jsonl"
        return {"path": str(pipeline.label_rollouts(self.recipe, Path(rollouts["path"]), out))}

    def value(self, k: int, rollouts: dict, labels: dict) -> dict:
        out = self.workdir / f"iteration-{k}" / "value"
        path = pipeline.fit_value_stage(self.recipe, k, Path(rollouts["path"]), Path(labels["path"]), out)
        return {"path": str(path), "report": json.loads((path / "value.json").read_text())["report"]}


def run_spi(recipe: Recipe, workdir: Path, instructions: list[str], names: list[str], progress: bool = True) -> dict:
    """:func:`iterate` with :class:`FileStages`; then every system in ``names`` decodes ``instructions``."""
    workdir = Path(workdir)
    iterations, value_dirs = iterate(recipe, FileStages(recipe, workdir, progress))
    summary = {"recipe": recipe.name, "digest": recipe.digest, "systems": {},
               "value_fits": {it["iteration"]: it["value"]["report"] for it in iterations}}
    for system in names:
        log.info("decoding with %s", system)
        path = pipeline.decode_system(recipe, system, value_dirs[:value_count(system)], instructions,
                                      workdir / "eval" / f"{system}.json", progress=progress)
        data = json.loads(path.read_text())
        summary["systems"][system] = {"mean_reward": data["mean_reward"], "compute": data["compute"],
                                      "iteration": int(system.split("-")[1]) if system.startswith("spi-") else None}
    return summary
