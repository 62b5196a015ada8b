"""Weight tuning: maximise the mean cosine of exactly the inference formula (`ensemble.combine_views` then
`combine_towers`) with scipy's L-BFGS-B (bounds w >= 0) and gradients from torch autograd in float64; several seeded
restarts, the best kept. Deterministic. Upstream only: the Kaggle notebook never imports it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..core.ensemble import combine_towers, combine_views, l2_normalize


def _groups_of(keys: Sequence[str], groups: Mapping[str, str] | None) -> list[list[int]]:
    """Indices of `keys` per tower, in first-seen order (each key its own tower when `groups` is None)."""
    if groups is None:
        return [[i] for i in range(len(keys))]
    order: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        order.setdefault(groups[key], []).append(i)
    return list(order.values())


def _torch_score(stack, target, weights, towers: list[list[int]]):
    """Mean cosine of normalize(sum_t w_t [x d_t] normalize(sum_{v in t} W_v n(P_v))), w_t = sum_{v in t} W_v."""
    import torch

    def unit(x):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-24)

    per_dim = weights.dim() == 2
    mixed = 0
    for members in towers:
        if per_dim:  # one key per tower: weights (K, D)
            mixed = mixed + weights[members[0]] * stack[members[0]]
            continue
        tower = unit(sum(weights[i] * stack[i] for i in members)) if len(members) > 1 else stack[members[0]]
        mixed = mixed + sum(weights[i] for i in members) * tower
    return (unit(mixed) * target).sum(-1).mean()


def _tensors(preds: Mapping[str, np.ndarray], target: np.ndarray):
    import torch

    stack = torch.from_numpy(np.stack([l2_normalize(p) for p in preds.values()]).astype(np.float64))
    return stack, torch.from_numpy(l2_normalize(target).astype(np.float64))


def tune_weights(preds: Mapping[str, np.ndarray], target: np.ndarray, *, groups: Mapping[str, str] | None = None,
                 restarts: int = 8, seed: int = 0, max_iter: int = 500) -> dict[str, float]:
    """Non-negative weights summing to 1 that maximise the mean cosine of the weighted ensemble on `target`.

    `preds` maps names to (N, D) predictions (normalised here). With `groups` (name -> tower), names are a tower's
    views and the two-level TTA-then-towers formula is tuned. Deterministic for a given seed.
    """
    import torch
    from scipy.optimize import minimize

    keys = list(preds)
    stack, target_t = _tensors(preds, target)
    towers = _groups_of(keys, groups)

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        w = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        loss = -_torch_score(stack, target_t, w, towers)
        loss.backward()
        return float(loss.detach()), w.grad.numpy().copy()

    rng = np.random.default_rng(seed)
    starts = [np.full(len(keys), 1.0 / len(keys))] + [rng.dirichlet(np.ones(len(keys))) for _ in range(restarts - 1)]
    best = min((minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * len(keys),
                         options={"maxiter": max_iter}) for x0 in starts), key=lambda r: r.fun)
    weights = np.clip(best.x, 0.0, None)
    weights = weights / weights.sum()
    return {k: float(w) for k, w in zip(keys, weights, strict=True)}


def tune_dim_weights(preds: Mapping[str, np.ndarray], target: np.ndarray, *, restarts: int = 8, seed: int = 0,
                     dim_regularization: float = 1.0, max_iter: int = 500) -> dict[str, np.ndarray]:
    """D non-negative weights per tower, started at and regularised toward `tune_weights`' per-tower solution."""
    import torch
    from scipy.optimize import minimize

    keys = list(preds)
    tower_weights = tune_weights(preds, target, restarts=restarts, seed=seed, max_iter=max_iter)
    weights = np.array([tower_weights[k] for k in keys])
    stack, target_t = _tensors(preds, target)
    towers = _groups_of(keys, None)
    dim = stack.shape[-1]
    anchor = torch.from_numpy(np.repeat(weights[:, None], dim, axis=1))
    scale = float(weights.mean())

    def objective_dim(x: np.ndarray) -> tuple[float, np.ndarray]:
        w = torch.tensor(x.reshape(len(keys), dim), dtype=torch.float64, requires_grad=True)
        penalty = dim_regularization * (((w - anchor) / scale) ** 2).mean()
        loss = -_torch_score(stack, target_t, w, towers) + penalty
        loss.backward()
        return float(loss.detach()), w.grad.numpy().reshape(-1).copy()

    result = minimize(objective_dim, anchor.numpy().reshape(-1), jac=True, method="L-BFGS-B",
                      bounds=[(0.0, None)] * (len(keys) * dim), options={"maxiter": max_iter})
    per_key = np.clip(result.x.reshape(len(keys), dim), 0.0, None)
    per_key = per_key / per_key.sum(axis=0).mean()
    return {k: per_key[i].astype(np.float32) for i, k in enumerate(keys)}


def apply_weights(preds: Mapping[str, np.ndarray], weights: Mapping[str, float] | Mapping[str, np.ndarray],
                  groups: Mapping[str, str] | None = None) -> np.ndarray:
    """The ensemble prediction for tuned weights, computed with the inference functions above (the same math)."""
    keys = list(preds)
    if groups is None:
        if all(np.ndim(weights[k]) == 1 for k in keys):  # per-dimension: scalar = mean, the rest as multipliers
            scalars = {k: float(np.mean(weights[k])) for k in keys}
            dims = {k: np.asarray(weights[k]) / scalars[k] for k in keys if scalars[k] > 0}
            return combine_towers({k: preds[k] for k in keys if scalars[k] > 0}, scalars, dims)
        return combine_towers({k: preds[k] for k in keys if weights[k] > 0}, weights)
    towers: dict[str, list[str]] = {}
    for key in keys:
        towers.setdefault(groups[key], []).append(key)
    tower_weights = {t: sum(float(weights[k]) for k in members) for t, members in towers.items()}
    tower_preds = {t: combine_views([preds[k] for k in members], [weights[k] for k in members])
                   for t, members in towers.items() if tower_weights[t] > 0}
    return combine_towers(tower_preds, tower_weights)
