"""Ensemble math, in one place: normalise each view, average a tower's views, weight the towers, normalise (the
weights are fit upstream by `kaggle_i2p.tuning.tune`, on exactly these functions).

The metric is cosine similarity, so every stage works on unit vectors: a view or tower with a larger raw norm must not
dominate the average (normalising each model before weighting is worth about +0.004 on the leaderboard).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

EPS = 1e-12


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit-length rows as float32; all-zero rows stay zero (callers treat them as failures)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, EPS)


def unusable_rows(x: np.ndarray) -> np.ndarray:
    """Rows that cannot be a prediction: any NaN or inf, or (almost) zero length."""
    return ~np.isfinite(x).all(axis=1) | (np.linalg.norm(np.nan_to_num(x), axis=1) < 1e-6)


def combine_views(views: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """A tower's TTA result: the normalised (weighted) mean of its normalised views, each (N, D)."""
    if not views:
        raise ValueError("combine_views needs at least one view")
    weights = [1.0] * len(views) if weights is None else [float(w) for w in weights]
    total = sum(weights)
    if len(weights) != len(views) or total <= 0:
        raise ValueError("view weights must match the views and not all be zero")
    return l2_normalize(sum((w / total) * l2_normalize(v) for w, v in zip(weights, views, strict=True)))


def combine_towers(towers: Mapping[str, np.ndarray], weights: Mapping[str, float],
                   dim_weights: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """The ensemble: normalised sum over towers of weight x (optional per-dimension weights) x normalised output."""
    names = list(towers)
    missing = [n for n in names if n not in weights]
    if missing:
        raise KeyError(f"no weight for tower(s) {missing}")
    total = sum(float(weights[n]) for n in names)
    if total <= 0:
        raise ValueError("tower weights sum to zero")
    dim_weights = dim_weights or {}
    mixed = sum((float(weights[n]) / total) * np.asarray(dim_weights.get(n, 1.0), dtype=np.float32)
                * l2_normalize(towers[n]) for n in names)
    return l2_normalize(mixed)


def mean_cosine(pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """The competition metric: mean over rows of cosine(pred, target); also the per-row cosines."""
    per_row = np.sum(l2_normalize(pred).astype(np.float64) * l2_normalize(target).astype(np.float64), axis=-1)
    return float(per_row.mean()), per_row


VIEWS_DISAGREE = 0.8  # a tower whose views agree less than this (mean cosine between them) is likely served wrong


def view_agreement(views: Sequence[np.ndarray]) -> float | None:
    """The mean cosine between a tower's views, over images and view pairs (rows any view left non-finite are left
    out); None for a tower of one view. TTA views of a tower served as trained agree at ~0.95 and above."""
    if len(views) < 2:
        return None
    units = [l2_normalize(np.nan_to_num(v, nan=0.0)) for v in views]
    keep = ~np.any([unusable_rows(v) for v in views], axis=0)
    pairs = [(units[i] * units[j]).sum(axis=1)[keep] for i in range(len(units)) for j in range(i + 1, len(units))]
    values = np.concatenate(pairs) if pairs else np.zeros(0)
    return float(values.mean()) if len(values) else None
