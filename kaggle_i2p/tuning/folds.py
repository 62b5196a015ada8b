"""Fold assignment, in one place: a seeded K-fold over rows (validation of a labelled image set) and scikit-learn's
GroupKFold over groups of near-duplicate prompts (the dataset, so no near-duplicate crosses folds)."""

from __future__ import annotations

import numpy as np


def kfold_numbers(n_rows: int, n_folds: int, seed: int = 0) -> np.ndarray:
    """A fold number per row from a shuffled, seeded K-fold split (the caller checks 2 <= n_folds <= n_rows)."""
    from sklearn.model_selection import KFold

    folds = np.zeros(n_rows, dtype=int)
    for fold, (_, held_out) in enumerate(KFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(n_rows))):
        folds[held_out] = fold
    return folds


def group_fold_numbers(groups: np.ndarray, n_folds: int) -> np.ndarray:
    """A fold number per row with GroupKFold: every group lies in exactly one fold (the caller checks there are at
    least `n_folds` groups)."""
    from sklearn.model_selection import GroupKFold

    folds = np.full(len(groups), -1, dtype=int)
    for fold, (_, held_out) in enumerate(GroupKFold(n_splits=n_folds).split(np.zeros(len(groups)), groups=groups)):
        folds[held_out] = fold
    return folds
