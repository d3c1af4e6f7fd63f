"""Batches and a distance loop shared by the miner tests."""

from __future__ import annotations

import torch
from torch import Tensor

from tests.parity import pk_labels


def _clustered(
    n_classes: int = 8, per_class: int = 4, dim: int = 16, seed: int = 0, spread: float = 0.8
) -> tuple[Tensor, Tensor]:
    """Float64 class centres plus noise: overlapping classes, so every miner has a real choice."""
    g = torch.Generator().manual_seed(seed)
    labels = pk_labels(n_classes, per_class)
    centers = torch.randn(n_classes, dim, generator=g, dtype=torch.float64)
    noise = torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return centers[labels] + spread * noise, labels


def _reference_set(query_seed: int, dim: int = 16) -> tuple[Tensor, Tensor]:
    """A reference set around the class centres of ``_clustered(seed=query_seed)``, plus two
    classes that no query has."""
    centers = torch.randn(
        8, dim, generator=torch.Generator().manual_seed(query_seed), dtype=torch.float64
    )
    g = torch.Generator().manual_seed(100 + query_seed)
    centers = torch.cat([centers, torch.randn(2, dim, generator=g, dtype=torch.float64)])
    ref_labels = torch.randint(0, 10, (21,), generator=g)
    ref = centers[ref_labels] + 0.8 * torch.randn(21, dim, generator=g, dtype=torch.float64)
    return ref, ref_labels


# -- slow loop references -------------------------------------------------------------------------


def _loop_distance(x: Tensor, y: Tensor) -> float:
    return float(torch.sqrt(((x / x.norm() - y / y.norm()) ** 2).sum()))
