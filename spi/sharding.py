"""Sharding by prompt: split a stage's prompts into shards, run a stage on one shard, merge by key.

A shard is a contiguous, stable range of prompt indices: shard membership depends only on the number
of prompts and the shard size, never on how many workers run them or in which order they finish.
Every row a shard writes carries its global ``prompt_index``, and each prompt's randomness comes from
its own seed (``spi.pipeline.seed_for(..., i)``) while ``spi.search.search`` is batch-composition
independent, so a prompt decoded in any shard gives the tokens the unsharded stage gives.

Merging is by key (the prompt index): a repeated shard (a retry, a worker that died after writing)
is collapsed when its rows are identical and refused when they conflict; a lost shard is refused with
the missing prompt indices named. Nothing is silently dropped or doubled.

Shard stages (``rollout_shard``, ``label_shard``, ``decode_shard``) follow ``spi.pipeline``'s
conventions: atomic writes and a ``.key`` sidecar, so a shard whose output exists with the same key is
skipped. They call ``spi.search.search`` (through a generation backend) and ``spi.pipeline``'s
helpers; the module itself imports neither torch nor transformers at import time.

Generation backends: ``transformers`` (the default, ``spi.search.search`` on ``spi.models.CausalLM``)
and ``vllm`` (for GPU workers; see :class:`VLLMBackend` for what exists).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SHARD_VERSION = "spi-shard-1"  # bump when a shard's outputs would change for the same inputs
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


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    from spi.pipeline import _write_atomic

    _write_atomic(Path(path), "".join(json.dumps(r) + "\n" for r in rows))


def merge_jsonl(paths: Iterable[Path], expected: int | Iterable[int], out: Path, what: str) -> Path:
    """Merge shard JSONL files by prompt index into ``out`` (atomic); the same format as one file."""
    from spi.pipeline import read_jsonl

    write_jsonl(out, merge_rows((read_jsonl(p) for p in paths), expected, what))
    return out


# --------------------------------------------------------------------------- generation backends


class BackendUnavailable(RuntimeError):
    """The recipe's generation backend cannot run here; the message says why and what to do."""


class TransformersBackend:
    """The default: ``spi.search.search`` (CBS with a reordered KV cache) on a transformers model."""

    name = "transformers"

    def search(self, policy, instructions, seeds, settings, guide=None, reward_model=None, progress=False):
        from spi.search import search

        return search(
            policy, instructions, seeds, settings, guide, reward_model=reward_model, progress=progress
        )


class VLLMBackend:
    """vLLM for GPU workers (prefix caching on: CBS re-submits every kept prefix at each chunk boundary,
    so the prefill of the shared prompt and of each kept beam is served from the cache).

    Status: the seam and the availability check exist; chunk-level search on vLLM is not implemented
    (it needs the guide's scores on vLLM's sampled prefixes and a token-exact sampler matching
    ``spi.sampling`` for seeds to mean the same thing). Constructing it where vLLM or a CUDA device is
    missing raises :class:`BackendUnavailable` with the reason.
    """

    name = "vllm"

    def __init__(self, require_gpu: bool = True):
        problem = vllm_unavailable_reason(require_gpu)
        if problem:
            raise BackendUnavailable(
                f"execution.backend 'vllm' cannot run here: {problem}; "
                "use execution.backend 'transformers' or run the shards on a GPU worker "
                "whose image has vLLM (pip install vllm)"
            )
        self.engine_kwargs = {"enable_prefix_caching": True}

    def search(self, policy, instructions, seeds, settings, guide=None, reward_model=None, progress=False):
        raise NotImplementedError(
            "chunk-level guided search on vLLM is not implemented yet; execution.backend 'transformers' "
            "runs the same recipe"
        )


def vllm_unavailable_reason(require_gpu: bool = True) -> str | None:
    """Why the vLLM backend cannot run in this process, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    if require_gpu:
        import torch

        if not torch.cuda.is_available():
            return "vLLM needs a CUDA GPU and none is visible"
    return None


BACKENDS = {"transformers": TransformersBackend, "vllm": VLLMBackend}


def backend_for(recipe):
    name = recipe.execution.backend
    if name not in BACKENDS:
        raise ValueError(f"unknown generation backend '{name}' (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]()


# --------------------------------------------------------------------------- shard stages


def rollout_shard(
    recipe, iteration: int, value_dirs: list[Path], indices: Sequence[int], out: Path, key: str
) -> Path:
    """The rows of ``spi.pipeline.generate_rollouts`` for the prompts ``indices`` of the iteration's slice
    (same seeds, same record format), written to ``out`` with ``out.compute.json`` beside it."""
    from spi import pipeline
    from spi.prompts import chat_prompt_ids
    from spi.systems import system_plan
    from spi.value import load_value_model

    out = Path(out)
    if pipeline.is_done(out, key):
        return out
    policy = pipeline.load_policy(recipe)
    instructions = pipeline.train_instructions(recipe, iteration)
    system = f"spi-{iteration - 1}" if iteration > 1 else "best-of-n"
    settings, guide = system_plan(system, recipe, policy, [load_value_model(d) for d in value_dirs])
    xs = [instructions[i] for i in indices]
    seeds = [pipeline.seed_for(recipe.seed, "rollout", iteration, i) for i in indices]
    result = backend_for(recipe).search(policy, xs, seeds, settings, guide, reward_model=None)
    rows = []
    for i, instruction, r in zip(indices, xs, result.results, strict=True):
        leaves = [
            {"response": text, "response_ids": ids, "ended": len(ids) < settings.max_new_tokens}
            for text, ids in zip(r.responses, r.response_ids, strict=True)
        ]
        rows.append(
            {
                "prompt_index": i,
                "instruction": instruction,
                "prompt_ids": chat_prompt_ids(policy.tokenizer, instruction),
                "leaves": leaves,
            }
        )
    write_jsonl(out, rows)
    pipeline._write_atomic(out.with_suffix(".compute.json"), json.dumps(result.compute.as_dict(), indent=2))
    pipeline._mark_done(out, key)
    return out


def label_shard(recipe, rollouts: Path, out: Path) -> Path:
    """``spi.pipeline.label_rollouts`` on one shard's rollouts (rows keep their global prompt_index)."""
    from spi import pipeline

    return pipeline.label_rollouts(recipe, Path(rollouts), Path(out))


def decode_shard(
    recipe,
    system: str,
    value_dirs: list[Path],
    instructions: Sequence[str],
    indices: Sequence[int],
    out: Path,
    key: str,
    datasets: Sequence | None = None,
    w2s_models=None,
) -> Path:
    """The outputs of ``spi.pipeline.decode_system`` for the instructions ``indices`` (same seeds), one
    JSONL row per prompt with its prompt_index, boundaries and beam changes; compute beside it."""
    from spi import pipeline
    from spi.systems import system_plan
    from spi.value import load_value_model

    out = Path(out)
    if pipeline.is_done(out, key):
        return out
    reward = pipeline.load_reward_model(recipe)
    policy = pipeline.load_policy(recipe)
    settings, guide = system_plan(
        system, recipe, policy, [load_value_model(d) for d in value_dirs], reward, w2s_models
    )
    xs = [instructions[i] for i in indices]
    seeds = [pipeline.seed_for(recipe.seed, "eval", i) for i in indices]
    result = backend_for(recipe).search(policy, xs, seeds, settings, guide, reward_model=reward)
    answers = [r.answer for r in result.results]
    known = [r.leaf_rewards[r.chosen] if r.leaf_rewards else None for r in result.results]
    missing = [j for j, k in enumerate(known) if k is None]
    if missing:  # as decode_system: score answers the search did not score (evaluation cost)
        for j, s in zip(
            missing, reward.score([xs[j] for j in missing], [answers[j] for j in missing]), strict=True
        ):
            known[j] = s
    rows = [
        {
            "prompt_index": i,
            "instruction": x,
            "output": y,
            "generator": system,
            "dataset": datasets[i] if datasets else None,
            "reward": k,
            "boundaries": r.boundaries,
            "beam_changes": r.beam_changes,
        }
        for i, x, y, k, r in zip(indices, xs, answers, known, result.results, strict=True)
    ]
    write_jsonl(out, rows)
    pipeline._write_atomic(out.with_suffix(".compute.json"), json.dumps(result.compute.as_dict(), indent=2))
    pipeline._mark_done(out, key)
    return out


def decode_payload(system: str, rows: Sequence[dict], compute: dict) -> dict:
    """Merged decode rows in ``spi.pipeline.decode_system``'s output format."""
    outputs = [{k: r[k] for k in ("instruction", "output", "generator", "dataset", "reward")} for r in rows]
    rewards = [r["reward"] for r in rows]
    return {
        "system": system,
        "outputs": outputs,
        "compute": compute,
        "mean_reward": sum(rewards) / len(rewards),
        "boundaries": sum(r["boundaries"] for r in rows),
        "beam_changes": sum(r["beam_changes"] for r in rows),
    }
