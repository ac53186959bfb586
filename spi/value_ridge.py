"""The exact value head on frozen features: least squares with an L2 penalty chosen by grouped
cross-validation (``value.solver: ridge``)."""

from __future__ import annotations

import random

import torch

RIDGE_PENALTIES = [10.0 ** (k / 2) for k in range(-4, 13)]  # relative to the positions per feature


@torch.no_grad()
def fit_ridge_head(model, batches, groups: list[str], seed: int, folds: int = 5):
    """Least squares on standardised features with the L2 penalty that predicts held-out prompt
    groups best (grouped k-fold); returns (penalty, training loss). Positions weigh as in the SGD loss."""
    rows, targets, owner = [], [], []
    example = 0
    for hidden, positions, batch_targets in batches:
        for b in range(hidden.shape[0]):
            mask = positions[b].bool()
            rows.append(hidden[b][mask])
            targets.append(batch_targets[b].expand(int(mask.sum())))
            owner += [groups[example]] * int(mask.sum())
            example += 1
    x = ((torch.cat(rows).double() - model.feature_mean.double()) / model.feature_scale.double())
    y = torch.cat(targets).double()
    names = sorted(set(owner))
    random.Random(seed).shuffle(names)
    fold_of = {g: i % folds for i, g in enumerate(names)}
    fold = torch.tensor([fold_of[g] for g in owner]).to(x.device)

    def solve(xs, ys, penalty):
        mean_x, mean_y = xs.mean(0), ys.mean()
        xc = xs - mean_x
        gram = xc.T @ xc + penalty * len(ys) * torch.eye(xs.shape[1], dtype=xs.dtype, device=xs.device) / xs.shape[1]
        weight = torch.linalg.solve(gram, xc.T @ (ys - mean_y))
        return weight, mean_y - mean_x @ weight

    def cv_error(penalty):
        errors = 0.0
        for f in range(min(folds, len(names))):
            held = fold == f
            weight, bias = solve(x[~held], y[~held], penalty)
            errors += float(((x[held] @ weight + bias - y[held]) ** 2).sum())
        return errors

    penalty = min(RIDGE_PENALTIES, key=cv_error) if len(names) > 1 else RIDGE_PENALTIES[-1]
    weight, bias = solve(x, y, penalty)
    model.head.weight.copy_(weight.to(model.head.weight.dtype)[None])
    model.head.bias.fill_(float(bias))
    return penalty, 0.5 * float(((x @ weight + bias - y) ** 2).mean())
