"""Compare the systems: decode each on the eval set, judge it against the references, and report.

    evaluate_systems   the eval set and its references, then every system of ``spi.loop.systems``
                       decoded and judged (then Best-of-N at spi-k's budgets, read from one decode)
    write_report       the comparison table, plots, paired differences and the markdown report
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from evaluation import ifeval_report, report
from flows.context import RunContext
from flows.stages import FlowStages
from spi.loop import systems
from spi.systems import value_count


def finite(x):
    return x if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else None


def prepare_eval(ctx: RunContext, stages: FlowStages) -> tuple[dict, dict]:
    """(eval set, eval set with references) stage results: the instructions every system answers
    (decode keys depend on them only) and the references the judge compares with (the user's, or
    written by ``evaluation.reference_generator``, whose decode is shared with that baseline)."""
    eval_set = stages.eval_set()
    if eval_set["has_references"]:
        return eval_set, eval_set
    generator = ctx.recipe.evaluation.reference_generator
    if value_count(generator):
        raise ValueError(f"evaluation.reference_generator '{generator}' needs value models; name a baseline system")
    return eval_set, stages.references(eval_set, generator, stages.decode(generator, [], eval_set))


def system_row(system: str, iteration: int | None, decoded: dict, judged: dict) -> dict:
    m = judged["metrics"]
    return {
        "system": system,
        "iteration": iteration,
        "mean_reward": decoded["mean_reward"],
        "win_rate": m["win_rate"],
        "win_rate_ci_low": m.get("win_rate_ci_low"),
        "win_rate_ci_high": m.get("win_rate_ci_high"),
        "standard_error": finite(m.get("standard_error")),
        "length_controlled_winrate": m.get("length_controlled_winrate"),
        "policy_tokens": int(decoded["compute"].get("policy_tokens", 0)),
        "generated_tokens": int(decoded["compute"].get("generated_tokens", 0)),
        "avg_length": m.get("avg_length"),
        "seconds_decode": decoded["seconds"],
        "seconds_judge": judged["seconds"],
        "not_available": dict(m.get("not_available") or {}),  # metric -> why it is None
    }


def verified_row(system: str, iteration: int | None, decoded: dict, verified: dict) -> dict:
    """The row of an ifeval system: the four IFEval accuracies with their intervals instead of win rates."""
    return {"system": system, "iteration": iteration, "mean_reward": decoded["mean_reward"],
            **ifeval_report.system_metrics(verified["metrics"]),
            "policy_tokens": int(decoded["compute"].get("policy_tokens", 0)),
            "generated_tokens": int(decoded["compute"].get("generated_tokens", 0)),
            "seconds_decode": decoded["seconds"], "seconds_judge": verified["seconds"]}


def format_table(rows: list[dict]) -> str:
    """The comparison table printed at the end of ``spi run``."""

    def num(x, fmt):
        return format(x, fmt) if x is not None else "n/a"

    if rows and "win_rate" not in rows[0]:  # ifeval
        lines = [f"{'system':<16}{'iter':>5}{'mean reward':>13}{'prompt strict [95% CI]':>26}{'inst strict':>12}"
                 f"{'prompt loose':>13}{'inst loose':>11}{'policy tokens':>15}"]
        for row in rows:
            m = "prompt_level_strict_acc"
            ci = f"{row[m]:6.2f} [{num(row[m + '_ci_low'], '5.1f')}, {num(row[m + '_ci_high'], '5.1f')}]"
            why = report.why_not(row, m + "_ci_low")
            lines.append(f"{row['system']:<16}{('-' if row['iteration'] is None else row['iteration']):>5}"
                         f"{row['mean_reward']:>13.4f}{ci:>26}{row['inst_level_strict_acc']:>12.2f}"
                         f"{row['prompt_level_loose_acc']:>13.2f}{row['inst_level_loose_acc']:>11.2f}"
                         f"{row['policy_tokens']:>15d}" + (f"  95% CI n/a ({why})" if why else ""))
        return "\n".join(lines)

    # LC last: a win rate it cannot report is "n/a (why)", and so is an interval (after the LC cell)
    lines = [f"{'system':<16}{'iter':>5}{'mean reward':>13}{'win rate [95% CI]':>26}{'policy tokens':>15}  LC win rate"]
    for row in rows:
        low, high = row["win_rate_ci_low"], row["win_rate_ci_high"]
        ci = f"[{low:5.1f}, {high:5.1f}]" if low is not None and high is not None else "[n/a]"
        lc = report.shown(row["length_controlled_winrate"], ".2f", report.why_not(row, "length_controlled_winrate"))
        if ci == "[n/a]" and report.why_not(row, "win_rate_ci_low"):
            lc += f"; 95% CI {report.interval(row, 'win_rate')}"
        lines.append(
            f"{row['system']:<16}{('-' if row['iteration'] is None else row['iteration']):>5}"
            f"{row['mean_reward']:>13.4f}{row['win_rate']:>13.2f} {ci:>12}{row['policy_tokens']:>15d}  {lc}"
        )
    return "\n".join(lines)


def report_head(ctx: RunContext, judge: str, run_id: str, paired: list[dict]) -> list[str]:
    r = ctx.recipe
    if r.evaluation.task == "ifeval":
        verdict = ifeval_report.verdict(paired)
        scoring = f"Task: IFEval-style verifiable instructions ({r.evaluation.eval_set}), scored by `{judge}`"
    else:
        beyond = [f"{p['system']} vs {p['against']} ({p['mean_difference']:+.2f})" for p in paired
                  if not p["within_noise"]]
        verdict = (
            f"No paired difference is available: {paired[0]['not_available']}."
            if paired and all(p.get("not_available") for p in paired)
            else "Differences beyond noise (95% paired interval excludes 0): " + "; ".join(beyond) + "."
            if beyond
            else "No SPI iteration differs from the baselines it is paired with beyond noise (every 95% paired "
            "interval holds 0)." if paired else ""
        )
        scoring = f"Judge: `{judge}`"
    v = r.value
    draws = v.samples_per_prompt or "W*K"
    first = (f"all {draws} samples of pi_0 (V_1 is the value of pi_0)" if v.first_iteration == "policy-samples"
             else "the highest-reward leaf of each prompt (the source code's choice)")
    later = (f"{draws} independent draws per prompt of the guided policy pi_(k-1) (V_k is its value)"
             if v.later_iterations == "policy-samples" else
             f"{'all leaves' if v.fit_on == 'all' else 'the highest-reward leaf'} of pi_(k-1)'s beam search per "
             f"prompt (value.fit_on: {v.fit_on})")
    return [
        f"# SPI experiment `{r.name}` ({r.digest})",
        "",
        f"{scoring}; reward model (used for training, not for judging): `{ctx.reward_name}`.",
        f"MLflow: `{ctx.tracking_uri}`, experiment `{ctx.experiment}`, run `{run_id}`.",
        f"V_1 fitted on {first} (value.first_iteration: {v.first_iteration}); V_k for k >= 2 on {later} "
        f"(value.later_iterations: {v.later_iterations}).",
        "",
        verdict,
    ]


def matched_best_of_n(ctx: RunContext, stages: FlowStages, rows: list[dict], eval_set: dict, n_eval: int):
    """(system, decode, "spi-k, ...") for Best-of-N at each spi-k's generated or forward tokens
    (baselines.budget_matched_unit; training included): the widest is decoded, the others are its first
    N rows (the rows they would sample themselves)."""
    s = ctx.recipe.search
    sizes = report.matched_sizes(rows, s.width * s.successors, n_eval, ctx.recipe.baselines.budget_matched_unit)
    if not sizes:
        return []
    widest = max(sizes.values())
    decoded = stages.decode(f"best-of-n:{widest}", [], eval_set)
    out = []
    for n in sorted(set(sizes.values())):
        matches = ", ".join(f"spi-{k}" for k in sorted(sizes) if sizes[k] == n)
        out.append((f"best-of-n:{n}", decoded if n == widest else stages.best_of_first(decoded, n), matches))
    return out


@dataclass
class Evaluation:
    """Every system decoded and judged: one row each, the (decode, judgement) stage results by system."""

    rows: list[dict]
    judged: dict[str, tuple[dict, dict]]
    judge: str | None
    references: dict


def evaluate_systems(ctx: RunContext, iterations: list[dict], value_dirs: list[str], allow_reward_judge: bool,
                     on_judged=None) -> Evaluation:
    """Baselines and spi-1..spi-K (then Best-of-N at their budgets) decoded on the eval set and judged
    against the references; ``on_judged(row, decoded, judgement)`` after each system."""
    stages = FlowStages(ctx)
    verified = ctx.recipe.evaluation.task == "ifeval"  # checked by the verifiers: no references, no judge
    eval_set, references = (stages.eval_set(),) * 2 if verified else prepare_eval(ctx, stages)
    ev = Evaluation([], {}, None, references)
    n_eval = len(json.loads(Path(references["path"]).read_text()))

    def judge(name, k, decoded, **extra):
        if verified:
            judgement = stages.verify(name, eval_set, decoded)
            row = verified_row(name, k, decoded, judgement)
        else:
            judgement = stages.judge(name, references, decoded, allow_reward_judge)
            row = system_row(name, k, decoded, judgement)
        ev.judge = judgement["judge"]
        ev.judged[name] = (decoded, judgement)
        row.update(report.cost_fields(row, decoded, iterations, n_eval), **extra)
        ev.rows.append(row)
        if on_judged:
            on_judged(row, decoded, judgement)

    for name, k, n_values in systems(ctx.recipe):
        judge(name, k, stages.decode(name, value_dirs[:n_values], eval_set))
    if ctx.recipe.baselines.budget_matched_best_of_n:
        for name, decoded, matches in matched_best_of_n(ctx, stages, ev.rows, eval_set, n_eval):
            judge(name, None, decoded, matches=matches, matched_unit=ctx.recipe.baselines.budget_matched_unit)
    return ev


def write_report(ctx: RunContext, ev: Evaluation, iterations: list[dict], run_id: str, promotions: list[dict]) -> dict:
    """The comparison: table, plots, paired differences and the markdown report file."""
    r = ctx.recipe
    plot_dir = ctx.dir / f"report-{r.digest[:12]}-plots"
    if r.evaluation.task == "ifeval":
        plots = report.write_plots(ev.rows, plot_dir, f"{r.name} (IFEval)", ifeval_report.HEADLINE,
                                   "prompt-level strict accuracy (%)") if ev.rows else []
        paired = ifeval_report.paired_rows(ev.rows, ev.judged, seed=r.seed)
        sections = (ifeval_report.systems_section(ev.rows) + (ifeval_report.paired_section(paired) if paired else [])
                    + ifeval_report.per_kind_section(ev.rows, ev.judged))
        examples = []
    else:
        plots = report.write_plots(ev.rows, plot_dir, f"{r.name} ({ev.judge})") if ev.rows else []
        paired, sections = report.paired_rows(ev.rows, ev.judged), None
        examples = report.examples(ev.rows, ev.judged)
    markdown = report.render(
        report_head(ctx, ev.judge, run_id, paired), ev.rows, iterations, paired,
        [f"{plot_dir.name}/{p.name}" for p in plots], examples, promotions, sections,
    )
    report_file = ctx.dir / f"report-{r.digest[:12]}.md"
    report_file.write_text(markdown)
    return {"table": format_table(ev.rows), "markdown": markdown, "file": report_file, "plots": plots,
            "plot_dir": plot_dir, "paired": paired}


