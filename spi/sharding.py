"""Sharding by prompt: split a stage's prompts into shards, run a stage on one shard, merge by key.

A shard is a contiguous, stable range of prompt indices: shard membership depends only on the number
of prompts and the shard size, never on how many workers run them or in which order they finish.
Every row a shard writes carries its global ``prompt_index``, and each prompt's randomness comes from
its own seed (``spi.pipeline.seed_for(..., i)``) while ``spi.search.search`` is batch-composition
independent, so a prompt decoded in any shard gives the tokens the unsharded stage gives.

Merging is by key (the prompt index): a repeated shard (a retry, a worker that died after writing)
is collapsed when its rows are identical and refused when they conflict; a lost shard is refused with
the missing prompt indices named. Nothing is silently dropped or doubled.

Shard stages (``rollout_shard``, ``label_shard``, ``decode_shard``) are ``spi.pipeline``'s stages on
some prompt indices (``spi.stagefiles``: atomic writes, a ``.key`` sidecar), so a shard whose output
exists with the same key is skipped. They call ``spi.search.search`` (through a generation backend) and ``spi.pipeline``'s
helpers; the module itself imports neither torch nor transformers at import time.

Generation backends: ``transformers`` (the default, ``spi.search.search`` on ``spi.models.CausalLM``)
and ``vllm`` (for GPU workers), both in ``spi.backends``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from spi.stagefiles import is_done, mark_done, read_jsonl, write_atomic, write_jsonl

KEY = "prompt_index"


# --------------------------------------------------------------------------- split and merge


@dataclass(frozen=True)
class Shard:
    number: int
    start: int  # first prompt index (inclusive)
    stop: int  # last prompt index + 1

    @property
    def indices(self) -> list[int]:
        return list(range(self.start, self.stop))

    @property
    def name(self) -> str:
        return f"shard-{self.start:06d}-{self.stop:06d}"

    def __len__(self) -> int:
        return self.stop - self.start


def split(n_prompts: int, shard_prompts: int) -> list[Shard]:
    """Contiguous shards of at most ``shard_prompts`` prompt indices covering ``0..n_prompts-1``."""
    if n_prompts < 0 or shard_prompts < 1:
        raise ValueError(f"cannot split {n_prompts} prompts into shards of {shard_prompts}")
    return [
        Shard(n, s, min(s + shard_prompts, n_prompts))
        for n, s in enumerate(range(0, n_prompts, shard_prompts))
    ]


def shard_key(stage_key: str, shard: Shard) -> str:
    """A shard's key: its stage's key (sharded layout, ``spi.stages``) and its prompt indices."""
    from spi.config import digest_of

    return digest_of([stage_key, shard.indices])


class MergeError(ValueError):
    """Shard outputs that cannot be merged: missing prompts, conflicting duplicates or stray keys."""


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``'0-2, 5, 7-8'`` (for error messages about many prompts)."""
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def _canonical(row: dict) -> str:
    return json.dumps(row, sort_keys=True)


def merge_rows(
    parts: Iterable[Iterable[dict]], expected: int | Iterable[int], what: str = "rows"
) -> list[dict]:
    """Rows of every part, one per ``prompt_index``, in index order.

    ``expected``: the number of prompts (indices ``0..n-1``) or the indices themselves. Identical
    duplicates are collapsed; a duplicate with other content, a missing index or an index not expected
    raises :class:`MergeError` naming the prompt indices.
    """
    wanted = set(range(expected)) if isinstance(expected, int) else set(expected)
    by_key: dict[int, dict] = {}
    conflicts, stray = set(), set()
    for part in parts:
        for row in part:
            if KEY not in row:
                raise MergeError(f"{what}: a row has no '{KEY}': {str(row)[:120]}")
            i = row[KEY]
            if i not in wanted:
                stray.add(i)
            elif i in by_key:
                if _canonical(by_key[i]) != _canonical(row):
                    conflicts.add(i)
            else:
                by_key[i] = row
    problems = []
    if conflicts:
        problems.append(
            f"conflicting duplicate rows for prompt indices {_ranges(conflicts)} "
            "(two shards computed different results for the same prompt)"
        )
    if stray:
        problems.append(f"rows for prompt indices {_ranges(stray)} that this stage does not cover")
    missing = wanted - by_key.keys()
    if missing:
        problems.append(
            f"no rows for {len(missing)} of {len(wanted)} prompts: prompt indices {_ranges(missing)} "
            "(a shard was lost; rerun the stage to recompute only the missing shards)"
        )
    if problems:
        raise MergeError(f"cannot merge {what}: " + "; ".join(problems))
    return [by_key[i] for i in sorted(by_key)]


def merge_compute(parts: Iterable[dict]) -> dict:
    """Sum of shards' compute dicts (``Compute.as_dict``): token counts add up, seconds are summed
    worker-seconds, not wall time."""
    total: dict = {}
    for part in parts:
        for k, v in part.items():
            total[k] = round(total.get(k, 0) + v, 4) if k.startswith("seconds_") else total.get(k, 0) + v
    return total


def merge_jsonl(paths: Iterable[Path], expected: int | Iterable[int], out: Path, what: str) -> Path:
    """Merge shard JSONL files by prompt index into ``out`` (atomic); the same format as one file."""
    return write_jsonl(out, merge_rows((read_jsonl(p) for p in paths), expected, what))


# --------------------------------------------------------------------------- shard stages


def rollout_shard(
    recipe, iteration: int, value_dirs: list[Path], indices: Sequence[int], out: Path, key: str
) -> Path:
    """The rows of ``spi.pipeline.generate_rollouts`` for the prompts ``indices`` of the iteration's slice
    (same seeds, same record format), written to ``out`` with ``out.compute.json`` beside it."""
    from spi import pipeline

    return pipeline.generate_rollouts(recipe, iteration, value_dirs, out, progress=False, key=key, indices=indices)


def label_shard(recipe, rollouts: Path, out: Path, key: str) -> Path:
    """``spi.pipeline.label_rollouts`` on one shard's rollouts (rows keep their global prompt_index)."""
    from spi import pipeline

    return pipeline.label_rollouts(recipe, Path(rollouts), Path(out), key=key)


def decode_shard(
    recipe,
    system: str,
    value_dirs: list[Path],
    instructions: Sequence[str],
    indices: Sequence[int],
    out: Path,
    key: str,
    datasets: Sequence | None = None,
) -> Path:
    """The outputs of ``spi.pipeline.decode_system`` for the instructions ``indices`` (same seeds), one
    JSONL row per prompt with its prompt_index, boundaries and beam changes; compute beside it."""
    from spi import pipeline

    out = Path(out)
    if is_done(out, key):
        return out
    rows, compute = pipeline.decode_rows(recipe, system, value_dirs, instructions, indices, datasets, progress=False)
    write_jsonl(out, rows)
    write_atomic(out.with_suffix(".compute.json"), json.dumps(compute, indent=2))
    mark_done(out, key)
    return out
