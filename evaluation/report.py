"""The experiment report: what each system costs, whether SPI beats the baselines, and why (or why not).

Everything here reads plain dicts and the stage files the flow already wrote (decode outputs, judge
annotations); the flow logs the markdown and the plots to MLflow and as Prefect artifacts.

    cost_fields       per-system compute with the SPI training it relies on amortised over the
                      evaluation instructions (spi-k: iterations 1..k; blockwise-cd: iteration 1), in
                      every unit of CHARGES and their sum over models, "forward tokens"
    matched_sizes     N of Best-of-N whose generated (or forward) tokens match each spi-k's (training
                      included)
    paired_rows       spi-k minus the best baseline (and minus its budget-matched Best-of-N), per
                      instruction, with bootstrap intervals; "within noise" when the interval holds 0
    write_plots       win rate against iteration and against compute (PNG)
    render            the markdown
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from evaluation.metrics import NotEstimable, paired_comparison


def training_iterations(system: str, iteration: int | None) -> int:
    """How many SPI iterations' rollouts a system's value models were fitted on."""
    from spi.systems import value_count

    return iteration if iteration is not None else value_count(system)


# What the report charges a system, each a count of real tokens (``spi.compute.Compute``): its decode's and,
# amortised, its training's (the rollouts and labels of iterations 1..k, and the fits of V_1..V_k).
CHARGES = {
    "generated_tokens": "generated",
    "policy_tokens": "policy",
    "value_tokens": "value models",
    "reward_tokens": "reward model",
    "w2s_tokens": "weak-to-strong pair",
    "value_fit_tokens": "value fitting",
}
# "forward tokens": tokens through any model, the sum of these (generated tokens are policy tokens
# already); a value fit's training step counts its tokens twice, forward and backward
FORWARD = ("policy_tokens", "value_tokens", "reward_tokens", "w2s_tokens", "value_fit_tokens")
MATCH_UNITS = {"generated_tokens": "generated tokens", "forward_tokens": "forward tokens"}


def training_charges(iterations: list[dict], k: int) -> dict[str, int]:
    """Each unit of CHARGES, and the reward calls, summed over the first ``k`` iterations' stages: the
    rollouts' and the labels' compute and the value fits' cost (forward + backward tokens)."""
    total = dict.fromkeys([*CHARGES, "reward_calls"], 0)
    for it in iterations[:k]:
        for stage in ("rollouts", "labels"):
            compute = it[stage].get("compute") or {}
            for unit in total:
                total[unit] += int(compute.get(unit, 0))
        fit = it["value"].get("report") or {}
        total["value_fit_tokens"] += int(fit.get("forward_tokens", 0)) + int(fit.get("backward_tokens", 0))
    return total


def cost_fields(row: dict, decoded: dict, iterations: list[dict], n_instructions: int) -> dict:
    """Per instruction, in every unit of CHARGES and in forward tokens: the system's own compute plus its
    training's (``training_<unit>``, whole); reward calls likewise; the beam change rate."""
    k = training_iterations(row["system"], row["iteration"])
    own, train = decoded["compute"], training_charges(iterations, k)
    out = {}
    for unit in [*CHARGES, "reward_calls"]:
        out[f"training_{unit}"] = train[unit]
        out[f"{unit}_per_instruction"] = (int(own.get(unit, 0)) + train[unit]) / n_instructions
    out["training_forward_tokens"] = sum(train[unit] for unit in FORWARD)
    out["forward_tokens_per_instruction"] = sum(out[f"{unit}_per_instruction"] for unit in FORWARD)
    data = json.loads(Path(decoded["path"]).read_text())
    boundaries = data.get("boundaries") or 0
    out["beam_change_rate"] = (data.get("beam_changes", 0) / boundaries) if boundaries else None
    return out


def matched_sizes(rows: list[dict], rows_per_prompt: int, n_instructions: int,
                  unit: str = "generated_tokens") -> dict[int, int]:
    """{k: N_k}: Best-of-N_k costs as many ``unit`` (MATCH_UNITS) per instruction as spi-k, its training
    included (N_k >= the search's W*K rows). A Best-of-N leaf costs, in generated tokens, spi-k's own
    generated tokens per leaf; in forward tokens, the measured best-of-n baseline's per leaf (its policy
    and reward tokens: it has no training), which must then be among ``rows``."""
    from spi.systems import best_of_n_rows

    if unit not in MATCH_UNITS:
        raise ValueError(f"budget-matched Best-of-N unit {unit!r} is not one of {', '.join(MATCH_UNITS)}")
    measured = None
    if unit == "forward_tokens":
        bon = [r for r in rows if r["system"].startswith("best-of-n") and not r.get("matches")]
        if not bon or not bon[0]["forward_tokens_per_instruction"]:
            raise ValueError("matching Best-of-N on forward tokens needs the best-of-n baseline's decode "
                             "(baselines.names) to measure a leaf's forward tokens")
        measured = bon[0]["forward_tokens_per_instruction"] / best_of_n_rows(bon[0]["system"], rows_per_prompt)
    sizes = {}
    for row in rows:
        if row["iteration"] is None or not row["generated_tokens"]:
            continue
        per_leaf = measured or row["generated_tokens"] / (n_instructions * rows_per_prompt)
        sizes[row["iteration"]] = max(rows_per_prompt, round(row[f"{unit}_per_instruction"] / per_leaf))
    return sizes


def matched_systems(row: dict) -> list[str]:
    """The spi-k a budget-matched Best-of-N row matches (its ``matches``: "spi-1, spi-2")."""
    return [s.strip() for s in (row.get("matches") or "").split(",") if s.strip()]


def unit_line(rows: list[dict]) -> str:
    """The line under a table that says in which unit each comparison is matched."""
    units = sorted({MATCH_UNITS[r.get("matched_unit", "generated_tokens")] for r in rows if r.get("matches")})
    line = ("Units: tokens are real tokens per evaluation instruction; forward tokens incl. training = policy + "
            "value models + reward model + weak-to-strong pair + value fitting (a fit's training step counts "
            "its tokens forward and backward), SPI's training amortised. ")
    if units:
        return line + (f"Budget-matched Best-of-N (best-of-n:N (= spi-k)) matches spi-k's {' and '.join(units)} "
                       "per instruction, training included; the best baseline is compared at its own compute.")
    return line + "No budget-matched Best-of-N ran: every comparison is at each system's own compute."


def preferences(judgement: dict) -> list[float]:
    annotations = json.loads(Path(judgement["path"]).read_text())["annotations"]
    return [a["preference"] for a in sorted(annotations, key=lambda a: a["index"])]


def paired_rows(rows: list[dict], judged: dict[str, tuple[dict, dict]]) -> list[dict]:
    """Each spi-k against the baseline with the best win rate and against its matched Best-of-N."""
    baselines = [r for r in rows if r["iteration"] is None and not r.get("matches")]
    best = max(baselines, key=lambda r: r["win_rate"], default=None)
    out = []
    for row in rows:
        if row["iteration"] is None:
            continue
        rivals = [best] if best else []
        rivals += [r for r in rows if row["system"] in matched_systems(r)]
        for rival in rivals:
            why = "best baseline" if rival is best else f"same {MATCH_UNITS[rival.get('matched_unit', 'generated_tokens')]}"
            try:
                diff = paired_comparison(preferences(judged[row["system"]][1]), preferences(judged[rival["system"]][1]))
            except NotEstimable as err:  # too few instructions for an interval: no reading either way
                out.append({"system": row["system"], "against": rival["system"], "why": why, "mean_difference": None,
                            "ci_low": None, "ci_high": None, "p_value": None, "within_noise": True,
                            "not_available": str(err)})
                continue
            out.append({"system": row["system"], "against": rival["system"], "why": why,
                        **diff, "within_noise": diff["ci_low"] <= 0 <= diff["ci_high"]})
    return out


def write_plots(rows: list[dict], folder: Path, title: str, metric: str = "win_rate",
                ylabel: str = "win rate vs references (%)") -> list[Path]:
    """<metric>-vs-iteration.png and <metric>-vs-compute.png in ``folder`` (win-rate-vs-...: the default);
    ``metric`` is a row field with ``<metric>_ci_low`` and ``<metric>_ci_high`` beside it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    spi = sorted((r for r in rows if r["iteration"] is not None), key=lambda r: r["iteration"])
    others = [r for r in rows if r["iteration"] is None]

    def errors(rs):
        low, high = f"{metric}_ci_low", f"{metric}_ci_high"
        return [[r[metric] - (r[low] if r[low] is not None else r[metric]) for r in rs],
                [(r[high] if r[high] is not None else r[metric]) - r[metric] for r in rs]]

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if spi:
        ax.errorbar([r["iteration"] for r in spi], [r[metric] for r in spi], yerr=errors(spi), marker="o",
                    capsize=3, label="spi-k (95% CI)")
    for i, r in enumerate(r for r in others if not r.get("matches")):
        ax.axhline(r[metric], linestyle="--", linewidth=1, color=f"C{i + 1}", label=r["system"])
    ax.set(xlabel="SPI iteration k", ylabel=ylabel, title=title)
    ax.set_xticks([r["iteration"] for r in spi] or [1])
    ax.legend(fontsize=7)
    fig.tight_layout()
    stem = metric.replace("_", "-")
    by_iteration = folder / f"{stem}-vs-iteration.png"
    fig.savefig(by_iteration, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = "forward_tokens_per_instruction"
    families = {"spi-k": spi,
                "best-of-n": sorted((r for r in others if r["system"].startswith("best-of-n")), key=lambda r: r[x])}
    for label, rs in families.items():
        if rs:
            ax.errorbar([r[x] for r in rs], [r[metric] for r in rs], yerr=errors(rs),
                        marker="o", capsize=3, label=label)
    for r in others:
        if not r["system"].startswith("best-of-n"):
            ax.scatter([r[x]], [r[metric]], marker="s")
            ax.annotate(r["system"], (r[x], r[metric]), fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="forward tokens per instruction, all models (SPI training amortised)",
           ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    by_compute = folder / f"{stem}-vs-compute.png"
    fig.savefig(by_compute, dpi=110)
    plt.close(fig)
    return [by_iteration, by_compute]


def examples(rows: list[dict], judged: dict[str, tuple[dict, dict]], count: int = 3, width: int = 400) -> list[str]:
    """Markdown of ``count`` instructions where the last SPI iteration and the best baseline disagree
    most (by judge preference), their outputs side by side."""
    spi = [r for r in rows if r["iteration"] is not None]
    baselines = [r for r in rows if r["iteration"] is None and not r.get("matches")]
    if not spi or not baselines:
        return []
    last = max(spi, key=lambda r: r["iteration"])
    best = max(baselines, key=lambda r: r["win_rate"])
    annotated = {}
    for row in (last, best):
        annotations = json.loads(Path(judged[row["system"]][1]["path"]).read_text())["annotations"]
        annotated[row["system"]] = {a["index"]: a for a in annotations}
    a, b = annotated[last["system"]], annotated[best["system"]]
    order = sorted(a, key=lambda i: -abs(a[i]["preference"] - b[i]["preference"]))[:count]

    def cell(text: str) -> str:
        text = " ".join(text.split())
        return (text[:width] + " ...") if len(text) > width else text

    out = []
    for i in order:
        out += [f"**Instruction {i}:** {cell(a[i]['instruction'])}", "",
                f"| {last['system']} (preference {a[i]['preference']:.2f}) | {best['system']} (preference "
                f"{b[i]['preference']:.2f}) |", "|---|---|",
                f"| {cell(a[i]['output']).replace('|', '/')} | {cell(b[i]['output']).replace('|', '/')} |", ""]
    return out


def _num(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else "n/a"


def shown(x, fmt: str, reason: str | None = None) -> str:
    """A number as text; "n/a (reason)" when it is not available (None or not finite)."""
    text = _num(x, fmt)
    return f"{text} ({reason})" if text == "n/a" and reason else text


# the ``not_available`` entry (evaluation.judging.annotation_metrics) that explains a row's metric;
# an interval's bounds ``<m>_ci_low`` / ``<m>_ci_high`` are explained by ``<m>_ci``
_REASON_OF = {"lc_standard_error": "length_controlled_winrate", "discrete_standard_error": "standard_error"}


def why_not(row: dict, metric: str) -> str | None:
    """Why a system row has no ``metric`` (from its ``not_available``), or None."""
    missing = row.get("not_available") or {}
    interval_of = metric.rsplit("_ci_", 1)[0] + "_ci" if metric.endswith(("_ci_low", "_ci_high")) else ""
    return missing.get(metric) or missing.get(_REASON_OF.get(metric, interval_of))


def interval(row: dict, metric: str, fmt: str = ".1f") -> str:
    """"[low, high]" of ``metric``'s interval, or "n/a (reason)"."""
    low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    if _num(low, fmt) == "n/a" or _num(high, fmt) == "n/a":
        return shown(None, fmt, why_not(row, f"{metric}_ci_low"))
    return f"[{low:{fmt}}, {high:{fmt}}]"


def paired_row(labels: list[str], p: dict, diff_key: str, extra: tuple = ()) -> str:
    """A row of a paired-differences table: ``labels``, the difference ``p[diff_key]`` and its 95% CI,
    the ``extra`` cells ((key, format) pairs, e.g. the p-value), and the reading; "n/a (reason)" cells
    when the pair has ``not_available``."""
    if p.get("not_available"):
        cells = [shown(None, "", p["not_available"]), "n/a", *["n/a"] * len(extra), "not available"]
    else:
        diff = p[diff_key]
        reading = "within noise" if p["within_noise"] else ("better" if diff > 0 else "worse")
        cells = [f"{diff:+.2f}", f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]",
                 *[f"{p[key]:{fmt}}" for key, fmt in extra], reading]
    return "| " + " | ".join([*labels, *cells]) + " |"


def render(head: list[str], rows: list[dict], iterations: list[dict], paired: list[dict], plots: list[str],
           example_lines: list[str], promotions: list[dict], ifeval_lines: list[str] | None = None) -> str:
    """The markdown; ``ifeval_lines`` (the IFEval systems, paired and per-kind sections) replace the
    AlpacaEval systems and paired sections."""
    out = head + (ifeval_lines if ifeval_lines is not None else _alpaca_sections(rows, paired))
    if iterations:
        out += _value_fits(iterations)
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    if example_lines:
        out += ["", "## Examples (where the last iteration and the best baseline differ most)", "",
                "Preference: the judge's AlpacaEval preference against the reference (1 = reference better, "
                "2 = this output better).", ""] + example_lines
    if promotions:
        out += ["", "## Value model registry", ""]
        out += [f"- iteration {p['iteration']}: version {p['candidate_version']} "
                f"{'promoted to champion' if p['promoted'] else 'not promoted'}: {p['reason']}" for p in promotions]
    return "\n".join(out) + "\n"


def _alpaca_sections(rows: list[dict], paired: list[dict]) -> list[str]:
    out = [
        "",
        "## Systems",
        "",
        "Compute per evaluation instruction; SPI's rollouts, reward labels and value fits are amortised "
        "over the evaluation instructions (spi-k: iterations 1..k, blockwise-cd: iteration 1). Generated "
        "tokens: the system's own, all instructions together.",
        "",
        "| system | iter | mean reward | win rate | 95% CI | LC win rate | generated tokens "
        "| generated tokens incl. training | forward tokens incl. training | reward calls incl. training "
        "| beam changed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lc = shown(r["length_controlled_winrate"], ".2f", why_not(r, "length_controlled_winrate"))
        out.append(
            f"| {system_label(r)} | {r['iteration'] if r['iteration'] is not None else '-'} "
            f"| {_num(r['mean_reward'], '.4f')} | {r['win_rate']:.2f} | {interval(r, 'win_rate')} | {lc} "
            f"| {r['generated_tokens']} | {_num(r['generated_tokens_per_instruction'], '.0f')} "
            f"| {_num(r['forward_tokens_per_instruction'], '.0f')} "
            f"| {_num(r['reward_calls_per_instruction'], '.1f')} | {_num(r['beam_change_rate'], '.0%')} |"
        )
    out += ["", unit_line(rows)] + compute_section(rows)
    if paired:
        out += ["", "## Paired differences (win rate points, same instructions)", "",
                "| system | against | why | difference | 95% CI | p | reading |", "|---|---|---|---|---|---|---|"]
        out += [paired_row([p["system"], p["against"], p["why"]], p, "mean_difference", (("p_value", ".3f"),))
                for p in paired]
        out += ["", unit_line(rows)]
    return out


def system_label(row: dict) -> str:
    """A row's name in a table; a budget-matched Best-of-N names what it matches and in which unit."""
    if not row.get("matches"):
        return row["system"]
    return f"{row['system']} (= {row['matches']} {MATCH_UNITS[row.get('matched_unit', 'generated_tokens')]})"


def compute_section(rows: list[dict]) -> list[str]:
    """Every unit of CHARGES per instruction, training amortised, and their forward-token sum."""
    out = ["", "## Compute per instruction, by model (tokens, SPI training amortised)", "",
           "A head on the policy's hidden states runs no model of its own (0 value-model tokens); value "
           "fitting counts the tokens through the model a fit trains, forward and backward.", "",
           "| system | " + " | ".join(CHARGES.values()) + " | forward tokens incl. training |",
           "|---|" + "---|" * (len(CHARGES) + 1)]
    for r in rows:
        cells = [_num(r.get(f"{unit}_per_instruction"), ".0f") for unit in [*CHARGES, "forward_tokens"]]
        out.append(f"| {system_label(r)} | " + " | ".join(cells) + " |")
    return out


def _value_fits(iterations: list[dict]) -> list[str]:
    out = ["", "## Value fits (held-out prompts)", "",
            "Explained variance counts differences between prompts; pair accuracy is what selection needs: "
            "how often V ranks two leaves of one prompt as the reward does (0.5 = no signal).", "",
            "| iteration | rollout reward mean | best of leaves | held-out EV | pair accuracy | ridge penalty "
            "| fit: examples | epochs | tokens forward | tokens backward | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for it in iterations:
        stats, rep = it["labels"]["stats"], it["value"]["report"]
        out.append(f"| {it['iteration']} | {_num(stats.get('reward_mean'), '.4f')} "
                   f"| {_num(stats.get('reward_best_mean'), '.4f')} "
                   f"| {_num(rep.get('holdout_explained_variance'), '.3f')} "
                   f"| {_num(rep.get('holdout_pair_accuracy'), '.3f')} | {_num(rep.get('ridge_penalty'), '.3g')} "
                   f"| {_num(rep.get('train_sequences'), 'd')} | {_num(rep.get('epochs'), 'd')} "
                   f"| {_num(rep.get('forward_tokens'), 'd')} | {_num(rep.get('backward_tokens'), 'd')} "
                   f"| {_num(rep.get('seconds'), '.1f')} |")
    return out
