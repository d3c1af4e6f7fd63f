"""Class-disjoint splits, and the classes usable for P×K training.

Evaluation in deep metric learning is on classes never seen in training: :func:`split_by_class`
splits *classes*, not samples, into train / validation / test. :func:`trainable_classes` finds
the classes with enough images for a P×K batch (a class with one image has no positive pair).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor


@dataclass
class ClassSplit:
    """Sample indices of a class-disjoint split, and the classes of each part."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_classes: np.ndarray
    val_classes: np.ndarray
    test_classes: np.ndarray


def split_by_class(
    labels: Tensor | np.ndarray | Sequence[int],
    test_classes: float | int | Sequence[int] = 0.5,
    val_classes: float | int | Sequence[int] = 0.0,
    seed: int = 0,
) -> ClassSplit:
    """Split *classes* into train / validation / test, so evaluation is on unseen classes.

    Each of ``test_classes`` and ``val_classes`` is a fraction of the classes (float in [0, 1)),
    a number of classes (int), or an explicit list of class ids. Classes are drawn at random from
    ``seed``; the rest train.
    """
    y = np.asarray(labels)
    classes = np.unique(y)
    rng = np.random.default_rng(seed)
    remaining = list(rng.permutation(classes))

    def take(spec: float | int | Sequence[int], name: str) -> np.ndarray:
        nonlocal remaining
        if isinstance(spec, (float, int)):
            if isinstance(spec, float) and not 0 <= spec < 1:
                raise ValueError(f"{name} as a fraction must be in [0, 1), got {spec}")
            count = int(round(spec * len(classes))) if isinstance(spec, float) else spec
            if not 0 <= count < len(remaining):
                raise ValueError(f"{name}={spec} leaves no classes to train on")
            chosen = np.array(sorted(remaining[:count]), dtype=classes.dtype)
        else:
            chosen = np.array(sorted(spec), dtype=classes.dtype)
            unknown = set(chosen.tolist()) - set(remaining)
            if unknown:
                raise ValueError(f"{name} lists classes not available: {sorted(unknown)}")
        remaining = [c for c in remaining if c not in set(chosen.tolist())]
        return chosen

    test = take(test_classes, "test_classes")
    val = take(val_classes, "val_classes")
    train = np.array(sorted(remaining), dtype=classes.dtype)
    if len(train) == 0:
        raise ValueError("the split leaves no classes to train on")

    def where(cls: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(y, cls))

    return ClassSplit(where(train), where(val), where(test), train, val, test)


def trainable_classes(labels: Tensor | np.ndarray | Sequence[int], k: int = 2) -> np.ndarray:
    """The classes (sorted label values) with at least ``k`` samples among ``(N,)`` ``labels``.

    A P×K sampler draws ``k`` images of each class it picks, and a class with a single image has
    no positive pair, so classes with fewer than ``k`` (default 2) images can serve evaluation
    but not training. The others are
    ``np.setdiff1d(np.unique(labels), trainable_classes(labels, k))``.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    return classes[counts >= k]
