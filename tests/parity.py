"""Helpers for comparing deepmetric with pytorch-metric-learning (PML 2.9.0) on the same input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def pk_labels(n_classes: int, per_class: int) -> Tensor:
    """Labels of a P×K batch: ``per_class`` samples of each of ``n_classes`` classes."""
    return torch.arange(n_classes).repeat_interleave(per_class)


def value_and_grad(
    loss_fn: Callable[..., Tensor], embeddings: Tensor, *args: Any, **kwargs: Any
) -> tuple[float, Tensor]:
    """Call ``loss_fn(embeddings_copy, *args, **kwargs)``; return the loss and d loss / d emb."""
    emb = embeddings.detach().clone().requires_grad_(True)
    loss = loss_fn(emb, *args, **kwargs)
    loss.backward()
    assert emb.grad is not None
    return float(loss.detach()), emb.grad


def assert_same_loss(
    ours: Callable[..., Tensor],
    theirs: Callable[..., Tensor],
    embeddings: Tensor,
    *args: Any,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    **kwargs: Any,
) -> None:
    """Same value (``rtol`` relative) and same gradient on the same input."""
    v1, g1 = value_and_grad(ours, embeddings, *args, **kwargs)
    v2, g2 = value_and_grad(theirs, embeddings, *args, **kwargs)
    assert abs(v1 - v2) <= atol + rtol * abs(v2), f"loss {v1} != PML {v2}"
    torch.testing.assert_close(g1, g2, rtol=rtol * 10, atol=atol * 10)


def as_set(indices_tuple: tuple[Tensor, ...]) -> set[tuple[int, ...]]:
    """A miner's tuple of index tensors as a set of index tuples (order-free comparison)."""
    return set(zip(*(t.tolist() for t in indices_tuple), strict=True))
