"""Class-disjoint validation carve-out, shared by every reader so that all datasets split the same way."""

from __future__ import annotations

import numpy as np


def carve_validation(labels: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split item indices so that the last `val_fraction` of the sorted distinct classes are validation.

    Deterministic (no RNG), class-disjoint, and stable when a dataset grows: why the *last* classes rather
    than a random draw. Returns (train_indices, val_indices); val is empty when `val_fraction` is 0.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    n_val = int(round(len(classes) * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= len(classes):
        raise ValueError(f"data.val_fraction={val_fraction} leaves no training class out of {len(classes)}")
    val_classes = classes[len(classes) - n_val :]
    is_val = np.isin(labels, val_classes)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def class_folds(labels: np.ndarray, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Class-disjoint k-fold over the distinct classes (contiguous blocks of sorted classes), as in the
    Reality Check."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 2 <= n_folds <= len(classes):
        raise ValueError(
            f"tune.cv_folds={n_folds} must be between 2 and the number of classes ({len(classes)})"
        )
    folds = []
    for block in np.array_split(classes, n_folds):
        is_val = np.isin(labels, block)
        folds.append((np.flatnonzero(~is_val), np.flatnonzero(is_val)))
    return folds
