"""Length-controlled win rate (AlpacaEval LC v1), computed offline.

Per model, a logistic GLM on soft labels y = p - 1 (p in [1, 2], 2 = model better):

    logit P(model wins on i) = theta + phi * tanh(std_delta_len_i) + psi * difficulty_i

with std_delta_len_i = (len(reference_i) - len(output_i)) / std over the model's instructions (characters,
as alpaca_eval does), no intercept, L1 penalty chosen by 5-fold cross-validation on the soft log-loss.
Rows of the two "gamed" GPT-4 baselines (prompted to be verbose / concise) join the fit with weight
lambda / 2 each and no theta, which pulls phi and psi toward values that a pure length change cannot
exploit (regularisation toward the gamed baselines). LC = 100 * mean_i sigmoid(theta + psi * difficulty_i).

Instruction difficulty comes from :func:`instruction_difficulty`, a joint fit over whatever models'
preferences are given (per-model bias and length slope, one effect per instruction), or from alpaca_eval's
own instruction_difficulty.csv when the user has it (:func:`read_instruction_difficulty`). The gamed
baselines' annotations are not public: :func:`gamed_baseline_rows` rebuilds their soft labels from their
outputs and their published GLM weights. No scored model is ever looked up by name.

Below MIN_LC_INSTRUCTIONS, or when a fit does not converge, there is no LC win rate: the functions raise
:class:`evaluation.metrics.NotEstimable` with the reason, and callers report "n/a (reason)". 30 is the
events-per-variable rule (about 10 rows per fitted weight; the GLM fits theta, phi and psi) and leaves
the 5-fold CV at least 6 instructions per fold; AlpacaEval itself fits it on 805.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from evaluation.metrics import NotEstimable, require_instructions

GAMED_BASELINES = ("gpt4_1106_preview_verbose", "gpt4_1106_preview_concise")
WEIGHT_COLUMNS = ("np.tanh(std_delta_len)", "instruction_difficulty", "not_gamed_baseline.astype(float)")
DEFAULT_CS = tuple(np.logspace(-4, 4, 10))  # sklearn LogisticRegressionCV's default grid
MIN_LC_INSTRUCTIONS = 30


def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))


def tanh_std_delta_len(reference_lengths: Sequence[int], output_lengths: Sequence[int]) -> np.ndarray:
    """tanh((len(ref) - len(out)) / std): the GLM's length feature for one model's rows."""
    delta = np.asarray(reference_lengths, dtype=float) - np.asarray(output_lengths, dtype=float)
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    return np.tanh(delta / std) if std > 0 else np.zeros_like(delta)


# ----------------------------------------------------------------------------- soft-label logistic fits
def _soft_logloss(y, p, w):
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum())


def fit_soft_logistic_cv(
    X: np.ndarray,
    y: np.ndarray,
    sample_weight: np.ndarray | None = None,
    *,
    n_splits: int = 5,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 123,
    max_iter: int = 100,
) -> np.ndarray:
    """L1 logistic regression (no intercept) on soft labels y in [0, 1]; C picked by k-fold CV.

    Soft labels are fitted exactly by duplicating each row as a positive with weight w*y and a
    negative with weight w*(1-y); folds split rows, never a row's two copies.
    Returns the coefficient vector refitted on all rows with the best C; :class:`NotEstimable` when a
    fit does not converge within ``max_iter`` iterations.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=float)

    def fit(rows, C):
        Xd = np.concatenate([X[rows], X[rows]])
        yd = np.concatenate([np.ones(len(rows)), np.zeros(len(rows))])
        wd = np.concatenate([w[rows] * y[rows], w[rows] * (1 - y[rows])])
        keep = wd > 0
        if len(np.unique(yd[keep])) < 2:  # all labels on one side: nudge with a negligible opposite copy
            keep[:] = True
            wd = np.maximum(wd, 1e-9)
        model = LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", fit_intercept=False, random_state=seed,
                                   max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            try:
                model.fit(Xd[keep], yd[keep], sample_weight=wd[keep])
            except ConvergenceWarning as err:
                raise NotEstimable(f"the length-control GLM did not converge (C={C:g}, {max_iter} iterations)") from err
        if not np.all(np.isfinite(model.coef_)):
            raise NotEstimable(f"the length-control GLM gave non-finite weights (C={C:g})")
        return model.coef_[0]

    rows = np.arange(len(y))
    best_C = Cs[-1]
    if n_splits > 1 and len(y) >= 2 * n_splits:
        folds = np.random.default_rng(seed).permutation(len(y)) % n_splits
        losses = []
        for C in Cs:
            loss = 0.0
            for k in range(n_splits):
                train, test = rows[folds != k], rows[folds == k]
                coef = fit(train, C)
                loss += _soft_logloss(y[test], _sigmoid(X[test] @ coef), w[test])
            losses.append(loss)
        best_C = Cs[int(np.argmin(losses))]
    return fit(rows, best_C)


# ----------------------------------------------------------------------------- instruction difficulty
def instruction_difficulty(
    preferences: Mapping[str, Mapping[int, float]],
    outputs: Mapping[str, Mapping[int, str]],
    references: Mapping[int, str],
    *,
    l2: float = 1e-6,
    length_slopes: bool = True,
    centre: bool = False,
) -> dict[int, float]:
    """Per-instruction effect from a joint fit over many models' preferences against the same references.

    Model:  logit P(model m wins on i) = b_m + phi_m * tanh(std_delta_len_mi) + d_i, soft labels, rows
    with empty outputs dropped, an L2 penalty ``l2`` (per row) on all weights; d of the first
    instruction (lowest index) is fixed at 0 (treatment coding). ``length_slopes`` False drops the
    phi_m terms (b_m + d_i); ``centre`` shifts d to mean 0. Returns {index: d_i}. Larger d means
    models win more often on i. Every model given is used the same way, whatever its name.
    """
    from scipy import sparse
    from scipy.optimize import minimize

    models = sorted(m for m in preferences if m in outputs)
    if len(models) < 2:
        raise ValueError("instruction difficulty needs the preferences and outputs of at least two models")
    indices = sorted(references)
    col_of = {idx: j for j, idx in enumerate(indices[1:])}
    n_inst, n_models = len(indices) - 1, len(models)
    rows, cols, vals, ys = [], [], [], []
    r = 0
    for mi, model in enumerate(models):
        pairs = [
            (i, preferences[model][i], outputs[model][i])
            for i in indices
            if i in preferences[model] and outputs[model].get(i)
        ]
        if len(pairs) < 2:
            continue
        feat = tanh_std_delta_len([len(references[i]) for i, _, _ in pairs], [len(o) for _, _, o in pairs])
        for (i, p, _), f in zip(pairs, feat, strict=False):
            rows += [r, r]
            cols += [mi, n_models + mi]
            vals += [1.0, f if length_slopes else 0.0]
            if i in col_of:
                rows.append(r)
                cols.append(2 * n_models + col_of[i])
                vals.append(1.0)
            ys.append(p - 1.0)
            r += 1
    X = sparse.csr_matrix((vals, (rows, cols)), shape=(r, 2 * n_models + n_inst))
    y = np.asarray(ys)

    def objective(beta):
        z = X @ beta
        loss = np.logaddexp(0.0, z) - y * z
        grad = X.T @ (_sigmoid(z) - y)
        return loss.sum() / r + 0.5 * l2 * beta @ beta, grad / r + l2 * beta

    result = minimize(objective, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B", options={"maxiter": 5000})
    d = {indices[0]: 0.0, **{idx: float(result.x[2 * n_models + j]) for idx, j in col_of.items()}}
    shift = float(np.mean(list(d.values()))) if centre else 0.0
    return {idx: v - shift for idx, v in d.items()}


def read_instruction_difficulty(path) -> dict[int, float]:
    """alpaca_eval's instruction_difficulty.csv (the hub file behind the official LC v1: a header, then
    ``index,instruction_difficulty`` rows) as {index: d}; errors name the file and the row."""
    import csv

    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise ValueError(f"{path}: expected a header and rows 'index,instruction_difficulty'")
    difficulty = {}
    for number, row in enumerate(rows[1:], start=2):
        try:
            difficulty[int(row[0])] = float(row[1])
        except (ValueError, IndexError) as err:
            raise ValueError(f"{path}: row {number}: expected 'index,instruction_difficulty', got {row}") from err
    return difficulty


# ----------------------------------------------------------------------------- gamed baselines
@dataclass(frozen=True)
class GamedRows:
    """Design rows (tanh length, difficulty, 0) and soft labels of the gamed baselines."""

    X: np.ndarray
    y: np.ndarray
    names: tuple[str, ...]


def read_glm_weights(path) -> pd.DataFrame:
    """alpaca_eval's published LC v1 weights table (one row per model, columns WEIGHT_COLUMNS)."""
    table = pd.read_csv(path, index_col=0)
    missing = [c for c in WEIGHT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    return table


def gamed_baseline_rows(
    gamed_outputs: Mapping[str, Mapping[int, str]],
    gamed_weights: pd.DataFrame,
    references: Mapping[int, str],
    difficulty: Mapping[int, float],
) -> GamedRows:
    """Rebuild the gamed baselines' soft labels: sigmoid(theta_g + phi_g tanh(len) + psi_g difficulty)."""
    X_parts, y_parts = [], []
    for name, outs in gamed_outputs.items():
        idx = [i for i in sorted(references) if i in outs and i in difficulty]
        tl = tanh_std_delta_len([len(references[i]) for i in idx], [len(outs[i]) for i in idx])
        diff = np.array([difficulty[i] for i in idx])
        phi, psi, theta = (float(gamed_weights.loc[name, c]) for c in WEIGHT_COLUMNS)
        X_parts.append(np.column_stack([tl, diff, np.zeros(len(idx))]))
        y_parts.append(_sigmoid(theta + phi * tl + psi * diff))
    if not X_parts:
        return GamedRows(np.zeros((0, 3)), np.zeros(0), ())
    return GamedRows(np.concatenate(X_parts), np.concatenate(y_parts), tuple(gamed_outputs))


# ----------------------------------------------------------------------------- the LC win rate
def length_controlled_win_rate(
    preferences: Mapping[int, float],
    outputs: Mapping[int, str],
    references: Mapping[int, str],
    *,
    difficulty: Mapping[int, float] | None = None,
    gamed: GamedRows | None = None,
    regularize_lambda: float = 0.2,
    n_splits: int = 5,
    min_instructions: int = MIN_LC_INSTRUCTIONS,
) -> dict[str, float]:
    """LC v1 win rate of one model from its preferences and outputs against the references.

    ``difficulty`` None drops the difficulty term (psi = 0); ``gamed`` None (or empty) fits without the
    regularisation toward the gamed baselines. Returns length_controlled_winrate, lc_standard_error
    and the fitted weights phi, psi, theta; :class:`NotEstimable` below ``min_instructions`` judged
    instructions or when the GLM does not converge.
    """
    idx = [i for i in sorted(preferences) if i in outputs and i in references]
    require_instructions(len(idx), min_instructions, "a length-controlled win rate")
    y = np.array([preferences[i] for i in idx], dtype=float) - 1.0
    tl = tanh_std_delta_len([len(references[i]) for i in idx], [len(outputs[i]) for i in idx])
    diff = np.array([difficulty.get(i, 0.0) for i in idx]) if difficulty is not None else np.zeros(len(idx))
    X = np.column_stack([tl, diff, np.ones(len(idx))])
    w = np.ones(len(idx))
    if gamed is not None and len(gamed.y) and regularize_lambda:
        n_gamed = max(len(gamed.names), 1)
        X = np.concatenate([gamed.X, X])
        w = np.concatenate([np.full(len(gamed.y), regularize_lambda / n_gamed), w])
        y = np.concatenate([gamed.y, y])
    coef = fit_soft_logistic_cv(X, y, w, n_splits=n_splits)
    phi, psi, theta = (float(c) for c in coef)
    predicted = _sigmoid(theta + psi * diff)
    return {
        "length_controlled_winrate": 100.0 * float(predicted.mean()),
        "lc_standard_error": 100.0 * float(predicted.std(ddof=1) / np.sqrt(len(predicted))),
        "phi": phi,
        "psi": psi,
        "theta": theta,
    }
