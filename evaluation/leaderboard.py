"""Score a folder of model outputs and preferences into an AlpacaEval-style leaderboard, and plot.

Inputs are AlpacaEval's published layout: ``outputs/<model>.jsonl.gz`` with {index, output} and
``preferences/<model>.jsonl.gz`` with {index, preference} (1 = reference better, 2 = model better).
Every model with both files is scored identically, whatever its name: raw metrics from its
preferences, and the LC v1 GLM fitted on its own rows, with instruction difficulty estimated from all
the preference files given. The only names looked up in a table are the two gamed baselines whose
published GLM weights rebuild their soft labels for the regularisation (when those are available).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .data import model_files, read_indexed
from .length_control import (
    GAMED_BASELINES,
    GamedRows,
    gamed_baseline_rows,
    instruction_difficulty,
    length_controlled_win_rate,
    read_glm_weights,
    read_instruction_difficulty,
)
from .metrics import NotEstimable, win_rate_metrics

LEADERBOARD_KEYS = ("win_rate", "length_controlled_winrate", "lc_standard_error", "n_total")


def load_folder(folder, field: str, eval_set: list[dict], *, allow_empty: bool = False,
                keep: set[int] | None = None) -> dict[str, dict[int, object]]:
    """{model: {index: value}} for every ``<model>.jsonl.gz`` in a folder (errors name file and row)."""
    return {m: read_indexed(p, field, eval_set, allow_empty=allow_empty, keep=keep)
            for m, p in model_files(folder).items()}


def compute_leaderboard(
    eval_set: list[dict],
    outputs_dir,
    preferences_dir,
    *,
    gamed_weights_path=None,
    use_difficulty: bool = True,
    regularize_lambda: float = 0.2,
    indices=None,
    difficulty_path=None,
    log=None,
) -> dict[str, dict]:
    """{model: metrics} for every model with both an outputs and a preferences file.

    ``gamed_weights_path``: alpaca_eval's glm_weights_length_controlled_v1.csv; with it and the gamed
    baselines' outputs in ``outputs_dir`` the GLM is regularised toward them, otherwise it is not
    (``regularized`` in each row says which). ``indices``: score only these instructions (a subset).
    ``difficulty_path``: alpaca_eval's instruction_difficulty.csv, used instead of the joint fit (it must
    cover every scored instruction).
    """
    keep = set(indices) if indices is not None else None
    references = {e["index"]: e["reference_output"] for e in eval_set if keep is None or e["index"] in keep}
    outputs = load_folder(outputs_dir, "output", eval_set, allow_empty=True, keep=keep)
    preferences = load_folder(preferences_dir, "preference", eval_set, keep=keep)
    scored = sorted(set(outputs) & set(preferences))
    for model in scored:
        missing = set(preferences[model]) - set(outputs[model])
        if missing:
            raise ValueError(f"{outputs_dir}/{model}: no output for judged indices {sorted(missing)[:5]}")
    difficulty = None
    if use_difficulty and difficulty_path:
        difficulty = read_instruction_difficulty(difficulty_path)
        missing = sorted(set(references) - set(difficulty))
        if missing:
            raise ValueError(f"{difficulty_path}: no difficulty for instructions {missing[:5]} ({len(missing)} missing)")
    elif use_difficulty:
        difficulty = instruction_difficulty(preferences, outputs, references)
    gamed: GamedRows | None = None
    if gamed_weights_path and difficulty is not None:
        weights = read_glm_weights(gamed_weights_path)
        available = {g: outputs[g] for g in GAMED_BASELINES if g in outputs and g in weights.index}
        if available:
            gamed = gamed_baseline_rows(available, weights, references, difficulty)
    board = {}
    for model in scored:
        row = win_rate_metrics([preferences[model][i] for i in sorted(preferences[model])])
        try:
            row.update(length_controlled_win_rate(
                preferences[model], outputs[model], references,
                difficulty=difficulty, gamed=gamed, regularize_lambda=regularize_lambda,
            ))
        except NotEstimable as err:  # this model's LC only: the rest of the board stands
            row.update(length_controlled_winrate=None, lc_standard_error=None,
                       not_available={"length_controlled_winrate": str(err)})
        row["avg_length"] = sum(len(o) for o in outputs[model].values()) / max(len(outputs[model]), 1)
        row["regularized"] = gamed is not None
        board[model] = row
        if log:
            log(f"scored {model}")
    return board


def format_table(board: dict[str, dict], sort_by: str = "length_controlled_winrate") -> str:
    """A plain-text table, best first; a metric that could not be estimated prints as n/a, last."""

    def number(value, width: int) -> str:
        return f"{value:{width}.2f}" if value is not None else f"{'n/a':>{width}}"

    def best_first(item):
        value = item[1].get(sort_by)
        return (value is None, -(value or 0.0))

    lines = [f"{'model':<44} {'LC win':>7} {'LC se':>6} {'win':>7} {'se':>5} {'n':>5} {'avg len':>8}"]
    for model, r in sorted(board.items(), key=best_first):
        lines.append(
            f"{model[:44]:<44} {number(r['length_controlled_winrate'], 7)} {number(r['lc_standard_error'], 6)} "
            f"{r['win_rate']:7.2f} {r['standard_error']:5.2f} {r['n_total']:5d} {r.get('avg_length', 0):8.0f}"
        )
    return "\n".join(lines)


def write_leaderboard(board: dict[str, dict], path) -> Path:
    """JSON {model: {win_rate, length_controlled_winrate, lc_standard_error, n_total, ...}}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(board, indent=1, sort_keys=True))
    return path


def compare_with_published(board: dict[str, dict], leaderboard_csv) -> dict[str, float]:
    """MAE and Spearman of our LC (and raw) win rates against a published leaderboard CSV."""
    import numpy as np
    import pandas as pd
    from scipy.stats import spearmanr

    published = pd.read_csv(leaderboard_csv, index_col=0)
    common = [m for m in board if m in published.index and board[m]["length_controlled_winrate"] is not None]
    ours = np.array([board[m]["length_controlled_winrate"] for m in common])
    theirs = published.loc[common, "length_controlled_winrate"].to_numpy(float)
    raw_err = max(abs(board[m]["win_rate"] - published.loc[m, "win_rate"]) for m in common)
    return {
        "n_models": len(common),
        "lc_mae": float(np.abs(ours - theirs).mean()),
        "lc_max_error": float(np.abs(ours - theirs).max()),
        "lc_spearman": float(spearmanr(ours, theirs).statistic),
        "raw_max_error": float(raw_err),
    }


def plot_win_rates(points: dict[str, list[tuple[float, float]]], path, *, xlabel: str = "compute",
                   ylabel: str = "win rate (%)", errors: dict[str, list[float]] | None = None) -> Path:
    """Line plot of win rate against compute or iteration; ``points`` maps a series name to (x, y) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in points.items():
        xs, ys = zip(*sorted(series), strict=False) if series else ((), ())
        err = (errors or {}).get(name)
        if err:
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        else:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def alpaca_data_dir() -> Path | None:
    """The AlpacaEval data folder the user names in SPI_ALPACA_DATA (None when unset): nothing is
    looked for beside the repository."""
    value = os.environ.get("SPI_ALPACA_DATA")
    return Path(value) if value else None


def _print(msg):  # pragma: no cover
    print(msg, file=sys.stderr)
