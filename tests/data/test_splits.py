"""Class-disjoint splits and trainable classes (:mod:`deepmetric.data.splits`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmetric import data


def test_split_by_class_is_class_disjoint_and_reproducible() -> None:
    labels = np.repeat(np.arange(20), 5)
    split = data.split_by_class(labels, test_classes=0.25, val_classes=3, seed=1)
    assert len(split.test_classes) == 5 and len(split.val_classes) == 3
    parts = [set(labels[split.train]), set(labels[split.val]), set(labels[split.test])]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert len(split.train) + len(split.val) + len(split.test) == 100
    again = data.split_by_class(labels, test_classes=0.25, val_classes=3, seed=1)
    assert np.array_equal(again.test, split.test)
    explicit = data.split_by_class(labels, test_classes=[6, 7, 8, 9], seed=0)
    assert set(explicit.test_classes.tolist()) == {6, 7, 8, 9}
    with pytest.raises(ValueError, match="no classes to train"):
        data.split_by_class(labels, test_classes=20)
    with pytest.raises(ValueError, match="not available"):
        data.split_by_class(labels, test_classes=[99])


def test_trainable_classes_and_single_image_classes() -> None:
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 5])
    assert data.trainable_classes(labels).tolist() == [0, 2]
    assert data.trainable_classes(labels, k=3).tolist() == [2]
    assert data.trainable_classes(labels, k=1).tolist() == [0, 1, 2, 5]
    split = data.split_by_class(labels, test_classes=[1, 5])  # ImageDataset labels split too
    assert sorted(split.train.tolist()) == [0, 1, 3, 4, 5]
