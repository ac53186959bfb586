"""The IFEval side of the experiment report: system rows, paired differences and markdown sections.

A system verified by ``flows.tasks.verify_task`` has a file of annotations (one per prompt: its
constraints' strict and loose verdicts) and the metrics of :func:`evaluation.ifeval.report`. Here:

    system_metrics    the four accuracies and their 95% bootstrap intervals as flat row fields
    paired_rows       spi-k minus the best baseline, minus its budget-matched Best-of-N and minus spi-(k-1),
                      on the same prompts ({a, b, metric, diff, ci_low, ci_high}, every metric)
    systems_section, paired_section, per_kind_section, verdict    the markdown
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.ifeval import METRICS, PromptResult, paired_differences
from evaluation.metrics import NotEstimable
from evaluation.report import (
    MATCH_UNITS,
    compute_section,
    interval,
    matched_systems,
    paired_row,
    system_label,
    unit_line,
)

HEADLINE = "prompt_level_strict_acc"


def system_metrics(metrics: dict) -> dict:
    """{metric, metric_ci_low, metric_ci_high} for the four accuracies (percent), and ``not_available``
    ({metric_ci: why}) for intervals there are too few prompts for."""
    out, why = {}, (metrics.get("not_available") or {}).get("intervals")
    for m in METRICS:
        low, high = metrics["intervals"][m]
        out.update({m: metrics[m], f"{m}_ci_low": low, f"{m}_ci_high": high})
    out["not_available"] = {f"{m}_ci": why for m in METRICS} if why else {}
    return out


def results_of(verified: dict) -> list[PromptResult]:
    annotations = json.loads(Path(verified["path"]).read_text())["annotations"]
    return [PromptResult(a["key"], tuple(a["instruction_id_list"]), tuple(a["strict"]), tuple(a["loose"]))
            for a in annotations]


def paired_rows(rows: list[dict], judged: dict[str, tuple[dict, dict]], seed: int = 0) -> list[dict]:
    """Each spi-k against the best baseline (by prompt-level strict accuracy), the Best-of-N matched to
    its tokens and spi-(k-1): one row per metric, with the reason for the pairing."""
    baselines = [r for r in rows if r["iteration"] is None and not r.get("matches")]
    best = max(baselines, key=lambda r: r[HEADLINE], default=None)
    by_iteration = {r["iteration"]: r for r in rows if r["iteration"] is not None}
    out = []
    for k, row in sorted(by_iteration.items()):
        rivals = [(best, "best baseline")] if best else []
        rivals += [(r, f"same {MATCH_UNITS[r.get('matched_unit', 'generated_tokens')]}") for r in rows
                   if row["system"] in matched_systems(r)]
        if k - 1 in by_iteration:
            rivals.append((by_iteration[k - 1], "previous iteration"))
        for rival, why in rivals:
            try:
                diffs = paired_differences(row["system"], results_of(judged[row["system"]][1]), rival["system"],
                                           results_of(judged[rival["system"]][1]), seed=seed)
            except NotEstimable as err:  # too few prompts: no reading either way
                out += [{"a": row["system"], "b": rival["system"], "metric": m, "diff": None, "ci_low": None,
                         "ci_high": None, "why": why, "within_noise": True, "not_available": str(err)} for m in METRICS]
                continue
            out += [{**d, "why": why, "within_noise": d["ci_low"] <= 0 <= d["ci_high"]} for d in diffs]
    return out


def verdict(paired: list[dict]) -> str:
    headline = [p for p in paired if p["metric"] == HEADLINE]
    if headline and all(p.get("not_available") for p in headline):
        return f"No paired difference is available: {headline[0]['not_available']}."
    beyond = [f"{p['a']} vs {p['b']} ({p['diff']:+.2f})" for p in headline if not p["within_noise"]]
    if beyond:
        return "Prompt-level strict accuracy differs beyond noise (95% paired interval excludes 0): " \
               + "; ".join(beyond) + "."
    return ("No SPI iteration differs from the systems it is paired with beyond noise in prompt-level strict "
            "accuracy (every 95% paired interval holds 0).") if headline else ""


def _num(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "n/a"


def systems_section(rows: list[dict]) -> list[str]:
    out = ["", "## Systems (IFEval accuracies, percent, 95% bootstrap intervals over prompts)", "",
           "Compute per evaluation prompt; SPI's rollouts, reward labels and value fits are amortised over the "
           "evaluation prompts (spi-k: iterations 1..k, blockwise-cd: iteration 1).", "",
           "| system | iter | mean reward | prompt strict | inst strict | prompt loose | inst loose | generated tokens "
           "| generated tokens incl. training | forward tokens incl. training | reward calls incl. training |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[m]:.1f} {interval(r, m)}" for m in METRICS]
        out.append(f"| {system_label(r)} | {r['iteration'] if r['iteration'] is not None else '-'} "
                   f"| {_num(r['mean_reward'], '.4f')} | " + " | ".join(cells)
                   + f" | {r['generated_tokens']} | {_num(r.get('generated_tokens_per_instruction'), '.0f')} "
                   f"| {_num(r.get('forward_tokens_per_instruction'), '.0f')} "
                   f"| {_num(r.get('reward_calls_per_instruction'), '.1f')} |")
    return out + ["", unit_line(rows)] + compute_section(rows)


def paired_section(paired: list[dict]) -> list[str]:
    out = ["", "## Paired differences (percentage points, same prompts)", "",
           "| system | against | why | metric | difference | 95% CI | reading |", "|---|---|---|---|---|---|---|"]
    out += [paired_row([p["a"], p["b"], p["why"], p["metric"]], p, "diff") for p in paired]
    return out


def per_kind_section(rows: list[dict], judged: dict[str, tuple[dict, dict]]) -> list[str]:
    """Strict accuracy per constraint kind (instruction id), one column per system."""
    kinds = {name: judged[name][1]["metrics"]["per_kind"] for name in (r["system"] for r in rows)}
    ids = sorted({k for table in kinds.values() for k in table if ":" in k})
    if not ids:
        return []
    names = [r["system"] for r in rows]
    out = ["", "## Strict accuracy per constraint kind (percent; n = constraints)", "",
           "| kind | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for kind in ids:
        n = next(t[kind]["n"] for t in kinds.values() if kind in t)
        cells = [_num(kinds[s].get(kind, {}).get("strict_acc"), ".1f") for s in names]
        out.append(f"| {kind} | {n} | " + " | ".join(cells) + " |")
    return out
