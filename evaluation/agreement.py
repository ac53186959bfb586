"""How well an already-trained judge agrees with GPT-4-turbo, on every given model, without training it.

``spi eval judge-agreement --judge NAME`` lands here: the judge NAME (a registered spec, the recipes'
default when omitted) judges every (model, instruction) pair of the given folders against the
reference; its predicted P(model better) is compared with GPT-4-turbo's preference (JUDGES.md):
AUC on decisive pairs, balanced accuracy, pair Spearman, model-rank Spearman and per-model win-rate
error (points), each with a percentile bootstrap interval over instructions, and the paired interval
of its difference from each other judge (the same resamples). Beside it: the length-only
Bradley-Terry model (one weight, fitted on the evaluated pairs themselves: an optimistic baseline) and
the recipes' current default judge. The held-out group of judge-agreement's split (``--held-out``)
measures a judge trained with ``train-judge --train-split`` on models and instructions it never saw
(``--held-out models``: the unseen models on every instruction; ``instructions``: every model on the
unseen instructions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("auc", "balanced_accuracy", "spearman", "model_rank_spearman", "win_rate_mae")


def default_judge_spec() -> str:
    """The judge a recipe uses when it names none (spi.config.EvaluationConfig.judge)."""
    from spi.config import EvaluationConfig

    return EvaluationConfig.model_fields["judge"].default


def _metrics(models: np.ndarray, predicted: np.ndarray, preferences: np.ndarray) -> dict[str, float]:
    from .trained_judge import agreement_metrics

    m = agreement_metrics(models, predicted, preferences)
    return {"auc": m["auc_decisive"], "balanced_accuracy": m["balanced_accuracy"], "spearman": m["spearman"],
            "model_rank_spearman": m["model_rank_spearman"], "win_rate_mae": m["winrate_error"]}


def measure(models: Sequence[str], instructions: Sequence[int], predicted: Sequence[float],
            preferences: Sequence[float], *, n_boot: int = 200, seed: int = 0) -> dict:
    """The metrics of ``predicted`` P(model better) against ``preferences`` in [1, 2], with 95% percentile
    intervals from ``n_boot`` resamples of the instructions (every model's pair of a drawn instruction)."""
    models, predicted = np.asarray(models), np.asarray(predicted, dtype=float)
    preferences, instructions = np.asarray(preferences, dtype=float), np.asarray(instructions)
    result = _metrics(models, predicted, preferences)
    names = sorted(set(models.tolist()))
    result["per_model"] = {m: {"gpt4_win_rate": float((preferences[models == m] - 1).mean() * 100),
                               "judge_win_rate": float(predicted[models == m].mean() * 100)} for m in names}
    rows_of = {}
    for row, i in enumerate(instructions.tolist()):
        rows_of.setdefault(i, []).append(row)
    groups = [np.array(r) for r in rows_of.values()]
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in METRICS}
    for _ in range(n_boot):
        rows = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
        for key, value in _metrics(models[rows], predicted[rows], preferences[rows]).items():
            draws[key].append(value)
    result["intervals"] = {k: _interval(v) for k, v in draws.items()}
    result.update(n_pairs=len(predicted), n_models=len(names), n_instructions=len(groups))
    result["draws"] = draws  # the same resamples for every judge measured with the same seed and rows
    return result


def _interval(values) -> list[float]:
    return [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]


def paired_differences(first: dict, other: dict) -> dict[str, list[float]]:
    """95% intervals of (first - other) for each metric, over the same bootstrap resamples of instructions:
    an interval that excludes 0 says the difference is not resampling noise."""
    return {k: _interval(np.asarray(first["draws"][k]) - np.asarray(other["draws"][k])) for k in METRICS}


def evaluate_judges(specs: Sequence[str], eval_set, outputs_dir, preferences_dir, *, models=None, indices=None,
                    cache=None, n_boot: int = 200, seed: int = 0, judge_kwargs: dict | None = None) -> dict:
    """{"judges": {spec: measure(...)}, "length_only": measure(...)} on every pair of ``models`` x
    ``indices`` (all when None); ``cache``: a JudgementCache the judges read and fill."""
    from .judges import resolve_judge
    from .judging import judge_pairs
    from .trained_judge import TrainedJudge, collect_pairs

    pairs = collect_pairs(eval_set, outputs_dir, preferences_dir, models=models, indices=indices)
    if not pairs:
        raise ValueError(f"no judged pairs in {outputs_dir} / {preferences_dir} for these models and instructions")
    refs = {e["index"]: e for e in eval_set}
    names, idx = [m for m, *_ in pairs], [i for _, i, _, _ in pairs]
    instructions = [refs[i]["instruction"] for i in idx]
    references = [refs[i]["reference_output"] for i in idx]
    outputs, prefs = [o for _, _, o, _ in pairs], [p for *_, p in pairs]
    result = {"judges": {}}
    for n, spec in enumerate(dict.fromkeys(specs)):
        judge = resolve_judge(spec, **((judge_kwargs or {}) if n == 0 else {}))
        predicted = np.asarray(judge_pairs(judge, instructions, outputs, references, cache=cache, batch_size=64)) - 1.0
        result["judges"][spec] = {"identity": judge.identity,
                                  **measure(names, idx, predicted, prefs, n_boot=n_boot, seed=seed)}
    length_only = TrainedJudge.fit(instructions, outputs, references, prefs, backbone=None, C=1.0)
    result["length_only"] = {"identity": length_only.identity, "fitted_on_evaluated_pairs": True,
                             **measure(names, idx, length_only.probability(instructions, outputs, references),
                                       prefs, n_boot=n_boot, seed=seed)}
    first = result["judges"][specs[0]]
    for name, other in [*list(result["judges"].items())[1:], ("length_only", result["length_only"])]:
        first.setdefault("difference_vs", {})[name] = paired_differences(first, other)
    for measured in [*result["judges"].values(), result["length_only"]]:
        measured.pop("draws")
    return result


def format_judges(result: dict) -> str:
    """A table: one row per judge (and length-only), each metric with its interval."""
    rows = [*result["judges"].items(), ("length-only (fitted here)", result["length_only"])]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'judge':<{width}}" + "".join(f"{k:>28}" for k in METRICS)]
    for name, m in rows:
        cells = "".join(f"{m[k]:>9.3f} [{m['intervals'][k][0]:6.3f},{m['intervals'][k][1]:7.3f}]" for k in METRICS)
        lines.append(f"{name:<{width}}{cells}")
    first = rows[0][1]
    for name, diff in first.get("difference_vs", {}).items():
        lines.append(f"{rows[0][0]} - {name}: " + ", ".join(f"{k} [{lo:+.3f}, {hi:+.3f}]" for k, (lo, hi) in diff.items()))
    lines.append(f"{first['n_models']} models x {first['n_instructions']} instructions ({first['n_pairs']} pairs); "
                 "intervals: 95% bootstrap over instructions")
    return "\n".join(lines)
