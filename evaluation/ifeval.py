"""IFEval's metrics over responses to prompts with verifiable constraints.

The four numbers, in percent, as IFEval's and IFBench's reference ``evaluation_lib`` reports them:
``prompt_level_strict_acc`` (prompts whose every constraint is followed), ``inst_level_strict_acc``
(constraints followed, pooled over prompts), and the same two for the loose verdicts. Per constraint
kind: the accuracy per instruction id and per id prefix (``punctuation``), as the reference's tiers.
Intervals are a percentile bootstrap over prompts (seeded); a paired difference between two systems
resamples the same prompts for both. Below MIN_BOOTSTRAP_INSTRUCTIONS prompts neither exists:
:class:`evaluation.metrics.NotEstimable` says why, and ``report`` holds None and the reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.metrics import MIN_BOOTSTRAP_INSTRUCTIONS, NotEstimable, require_instructions
from spi.verifiers import ConstraintError, check_record, json_lines, read_prompt_records

METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


@dataclass(frozen=True)
class PromptResult:
    key: str
    instruction_ids: tuple[str, ...]
    strict: tuple[bool, ...]
    loose: tuple[bool, ...]


def score_records(records: Sequence[Mapping], responses: Mapping[str, str]) -> list[PromptResult]:
    """Verdicts for every prompt record; ``responses`` maps prompt text to the response."""
    results = []
    for record in records:
        if record["prompt"] not in responses:
            raise KeyError(f"no response for prompt {record['key']!r}: {record['prompt'][:80]!r}")
        verdicts = check_record(record, responses[record["prompt"]])
        results.append(PromptResult(str(record["key"]), tuple(v.instruction_id for v in verdicts),
                                    tuple(v.strict for v in verdicts), tuple(v.loose for v in verdicts)))
    return results


def _table(results: Sequence[PromptResult]) -> np.ndarray:
    """Per prompt: all strict, all loose, strict count, loose count, number of constraints."""
    if not results:
        raise ValueError("no prompts to score")
    return np.array([[all(r.strict), all(r.loose), sum(r.strict), sum(r.loose), len(r.strict)]
                     for r in results], dtype=float)


def _metrics(table: np.ndarray) -> np.ndarray:
    """The four metrics (percent) for a table, or for a batch of resampled tables (..., n, 5)."""
    sums = table.sum(axis=-2)
    n = table.shape[-2]
    return 100.0 * np.stack([sums[..., 0] / n, sums[..., 2] / sums[..., 4],
                             sums[..., 1] / n, sums[..., 3] / sums[..., 4]], axis=-1)


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def ifeval_metrics(results: Sequence[PromptResult]) -> dict[str, float]:
    """The four IFEval numbers, in percent."""
    return dict(zip(METRICS, _metrics(_table(results)).tolist(), strict=True))


def bootstrap_intervals(results: Sequence[PromptResult], *, n_boot: int = 2000, alpha: float = 0.05,
                        seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap interval [low, high] of each metric, resampling prompts; NotEstimable below
    MIN_BOOTSTRAP_INSTRUCTIONS prompts."""
    table = _table(results)
    require_instructions(len(table), MIN_BOOTSTRAP_INSTRUCTIONS, "a bootstrap interval over prompts")
    stats = _metrics(table[_resamples(len(table), n_boot, seed)])
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2], axis=0)
    return {m: [float(lo), float(hi)] for m, lo, hi in zip(METRICS, low, high, strict=True)}


def per_kind(results: Sequence[PromptResult]) -> dict[str, dict[str, float]]:
    """Strict and loose accuracy (percent) and count per instruction id and per id prefix."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in results:
        for instruction_id, strict, loose in zip(r.instruction_ids, r.strict, r.loose, strict=True):
            for kind in dict.fromkeys((instruction_id.split(":")[0], instruction_id)):
                counts[kind][0] += 1
                counts[kind][1] += strict
                counts[kind][2] += loose
    return {kind: {"n": n, "strict_acc": 100.0 * s / n, "loose_acc": 100.0 * lo / n}
            for kind, (n, s, lo) in sorted(counts.items())}


def paired_differences(a: str, results_a: Sequence[PromptResult], b: str, results_b: Sequence[PromptResult],
                       *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> list[dict]:
    """{a, b, metric, diff, ci_low, ci_high} per metric: a - b on the same prompts (matched by key),
    bootstrap over prompts with one resample shared by both systems."""
    by_key = {r.key: r for r in results_b}
    if len(by_key) != len(results_b) or len({r.key for r in results_a}) != len(results_a):
        raise ValueError(f"paired differences need unique prompt keys in {a} and {b}")
    if by_key.keys() != {r.key for r in results_a}:
        only_a = sorted({r.key for r in results_a} - by_key.keys())
        only_b = sorted(by_key.keys() - {r.key for r in results_a})
        raise ValueError(f"paired differences need the same prompts: only in {a}: {only_a[:5]}, "
                         f"only in {b}: {only_b[:5]}")
    table_a, table_b = _table(results_a), _table([by_key[r.key] for r in results_a])
    require_instructions(len(table_a), MIN_BOOTSTRAP_INSTRUCTIONS, "a paired interval over prompts")
    index = _resamples(len(table_a), n_boot, seed)
    diffs = _metrics(table_a[index]) - _metrics(table_b[index])
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2], axis=0)
    point = _metrics(table_a) - _metrics(table_b)
    return [{"a": a, "b": b, "metric": m, "diff": float(d), "ci_low": float(lo), "ci_high": float(hi)}
            for m, d, lo, hi in zip(METRICS, point, low, high, strict=True)]


def report(results: Sequence[PromptResult], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """The four numbers at the top level, their intervals, per-kind figures and the prompt count. Too
    few prompts for intervals: each is [None, None] and ``not_available["intervals"]`` says why."""
    try:
        intervals, missing = bootstrap_intervals(results, n_boot=n_boot, seed=seed), {}
    except NotEstimable as err:
        intervals, missing = {m: [None, None] for m in METRICS}, {"intervals": str(err)}
    return {**ifeval_metrics(results), "n_prompts": len(results),
            "n_instructions": sum(len(r.strict) for r in results),
            "intervals": intervals, "not_available": missing, "per_kind": per_kind(results)}


def read_responses(path: str | Path) -> dict[str, str]:
    """A JSONL file of {prompt, response} lines: prompt text -> response (errors name file:line)."""
    responses = {}
    for number, row in json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("response"), str):
            raise ConstraintError(f"{path}:{number}: expected an object with string fields prompt and response")
        responses[row["prompt"]] = row["response"]
    return responses


def score_files(prompts: str | Path, responses: str | Path, *, n_boot: int = 2000, seed: int = 0,
                offline_only: bool = False) -> dict:
    """``report`` for a responses file scored against a prompts file in IFEval's schema
    (``offline_only``: skip the prompts with a kind that cannot be checked offline)."""
    records = read_prompt_records(prompts, offline_only=offline_only)
    answers = read_responses(responses)
    missing = [r for r in records if r["prompt"] not in answers]
    if missing:
        raise ConstraintError(f"{responses}: no response for {len(missing)} of {len(records)} prompts of {prompts}, "
                              f"first key {missing[0]['key']!r}: {missing[0]['prompt'][:80]!r}")
    return report(score_records(records, answers), n_boot=n_boot, seed=seed)
