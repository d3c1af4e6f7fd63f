"""The batch shared by the ContrastiveLoss and TripletMarginLoss tests."""

from __future__ import annotations

import torch

from tests.parity import pk_labels


def _batch(n_classes: int = 8, per_class: int = 4, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_classes * per_class, dim, generator=g, dtype=torch.float64), pk_labels(
        n_classes, per_class
    )
