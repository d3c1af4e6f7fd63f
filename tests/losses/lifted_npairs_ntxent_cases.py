"""Batches and references shared by the lifted-structure, N-pairs and NT-Xent tests."""

from __future__ import annotations

import torch
from torch import Tensor

from tests.parity import pk_labels


def shuffled_batch(
    n_classes: int = 6, per_class: int = 4, dim: int = 8, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """A float64 P×K batch in random order."""
    g = torch.Generator().manual_seed(seed)
    labels = pk_labels(n_classes, per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    emb = torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return emb, labels


def grads_wrt_both(
    loss_fn: torch.nn.Module, emb: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor
) -> tuple[float, Tensor, Tensor]:
    e = emb.detach().clone().requires_grad_(True)
    r = ref.detach().clone().requires_grad_(True)
    loss = loss_fn(e, labels, ref_emb=r, ref_labels=ref_labels)
    loss.backward()
    assert e.grad is not None and r.grad is not None
    return float(loss.detach()), e.grad, r.grad


def cosine(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y) / (x.norm() * y.norm())
