"""Batches, PML parity checks and loop references shared by the MultiSimilarity, Circle, Margin
and RankedList tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from torch import Tensor

from deepmetric.losses.circle import CircleLoss
from deepmetric.losses.margin import MarginLoss
from deepmetric.losses.multi_similarity import MultiSimilarityLoss
from deepmetric.losses.ranked_list import RankedListLoss
from deepmetric.pairwise import all_triplets, label_masks
from tests.parity import assert_same_loss, pk_labels, value_and_grad

OURS: dict[str, type] = {
    "MultiSimilarityLoss": MultiSimilarityLoss,
    "CircleLoss": CircleLoss,
    "MarginLoss": MarginLoss,
    "RankedListLoss": RankedListLoss,
}


def _batch(
    n_classes: int = 8, per_class: int = 4, dim: int = 16, seed: int = 0
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_classes * per_class, dim, generator=g, dtype=torch.float64)
    return emb, pk_labels(n_classes, per_class)


def _pair(name: str, kwargs: dict[str, Any], **options: Any) -> tuple[Any, Any]:
    """Our loss and PML's, with the same arguments; ``options`` maps an option name to an
    ``(ours, theirs)`` pair (distance, reducer, ...)."""
    ours = OURS[name](**kwargs, **{k: v[0] for k, v in options.items()})
    theirs = getattr(pml_losses, name)(**kwargs, **{k: v[1] for k, v in options.items()})
    return ours, theirs


def _assert_parity(ours: Any, theirs: Any, emb: Tensor, *args: Any, **kwargs: Any) -> None:
    """Same value and embedding gradient as PML; for a learnable beta, the same beta gradient."""
    assert_same_loss(ours, theirs, emb, *args, **kwargs)
    if isinstance(ours, MarginLoss) and ours.learn_beta:
        # no triplet: PML's beta is not in the graph (no gradient); ours may have a zero one
        ours_grad = ours.beta.grad if ours.beta.grad is not None else torch.zeros_like(ours.beta)
        theirs_grad = (
            theirs.beta.grad if theirs.beta.grad is not None else torch.zeros_like(ours.beta)
        )
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-7)


def _miner_tuples(labels: Tensor, seed: int) -> list[tuple[Tensor, ...]]:
    """A random subset of the true triplets, and some positive and negative pairs."""
    g = torch.Generator().manual_seed(seed)
    a, p, n = all_triplets(*label_masks(labels, labels, same_source=True))
    pick = torch.randperm(len(a), generator=g)[:60]
    pos_mask, neg_mask = label_masks(labels, labels, same_source=True)
    a1, p1 = torch.where(pos_mask)
    a2, n2 = torch.where(neg_mask)
    keep_pos = torch.randperm(len(a1), generator=g)[:25]
    keep_neg = torch.randperm(len(a2), generator=g)[:70]
    return [(a[pick], p[pick], n[pick]), (a1[keep_pos], p1[keep_pos], a2[keep_neg], n2[keep_neg])]


def _euclid(x: Tensor, y: Tensor) -> Tensor:
    return torch.sqrt(((F.normalize(x, dim=0) - F.normalize(y, dim=0)) ** 2).sum())


def _loop_ranked_list(q: Tensor, r: Tensor, is_pos: Any, is_neg: Any) -> Tensor:
    margin, alpha, tp, tn, imbalance = 0.4, 1.2, 1.0, 2.0, 0.5
    total = q.new_zeros(())
    for i in range(len(q)):
        wp_sum, wn_sum = q.new_zeros(()) + 1e-5 * len(r), q.new_zeros(()) + 1e-5 * len(r)
        lp, ln = q.new_zeros(()), q.new_zeros(())
        for j in range(len(r)):
            d = _euclid(q[i], r[j])
            if is_pos(i, j) and d.item() > alpha - margin:
                w = torch.exp(tp * (d - (alpha - margin)))
                wp_sum, lp = wp_sum + w, lp + w * (d - (alpha - margin))
            if is_neg(i, j) and 0 < d.item() < alpha:
                w = torch.exp(tn * (alpha - d))
                wn_sum, ln = wn_sum + w, ln + w * (alpha - d)
        total = total + (1 - imbalance) * lp / wp_sum + imbalance * ln / wn_sum
    return total / len(q)


def _assert_matches_loop(
    loss: Any,
    loop: Callable[..., Tensor],
    q: Tensor,
    r: Tensor | None,
    rules: tuple[Any, Any],
    *args: Any,
    **kwargs: Any,
) -> None:
    value, grad = value_and_grad(loss, q, *args, **kwargs)
    q_ref = q.detach().clone().requires_grad_(True)
    expected = loop(q_ref, q_ref if r is None else r, *rules)
    expected.backward()
    assert value == pytest.approx(float(expected.detach()), rel=1e-9)
    torch.testing.assert_close(grad, q_ref.grad, rtol=1e-7, atol=1e-9)
