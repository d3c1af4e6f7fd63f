"""TupletNPairsLoss (:mod:`deepmetric.losses.tuplet_npairs`, HDML's loss for synthetic negatives)
against a loop, and against NPairsLoss when the negatives are the other positives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric.distances import DotProductSimilarity, LpDistance
from deepmetric.hdml import (
    TupletNPairsLoss,
    grouped_log1p_sum_exp,
)
from deepmetric.losses.npairs import NPairsLoss

# -- the N-pair tuplet loss -----------------------------------------------------------------------


def loop_tuplet(emb: Tensor, triplets: list[tuple[int, int, int]], distance: object) -> float:
    """Mean over (a, p) groups of log(1 + sum_n exp(s(a,n) - s(a,p))), s = closeness."""
    normed = F.normalize(emb, dim=1)

    def close(i: int, j: int) -> float:
        if isinstance(distance, DotProductSimilarity):
            return float(normed[i] @ normed[j])
        return -float((normed[i] - normed[j]).norm())

    groups: dict[tuple[int, int], list[int]] = {}
    for a, p, n in triplets:
        groups.setdefault((a, p), []).append(n)
    losses = [
        math.log1p(sum(math.exp(close(a, n) - close(a, p)) for n in negs))
        for (a, p), negs in groups.items()
    ]
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("distance", [DotProductSimilarity(), LpDistance()])
def test_tuplet_loss_with_indices_matches_loop(distance: object) -> None:
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(12, 5, generator=g, dtype=torch.float64)
    labels = torch.arange(12) // 3
    triplets = [(0, 1, 5), (0, 1, 7), (0, 2, 9), (4, 3, 0), (4, 3, 11), (4, 3, 2), (10, 11, 1)]
    a, p, n = (torch.tensor(t) for t in zip(*triplets, strict=True))
    loss = TupletNPairsLoss(distance=distance)(emb, labels, (a, p, n))  # type: ignore[arg-type]
    assert float(loss) == pytest.approx(loop_tuplet(emb, triplets, distance), rel=1e-10)


@pytest.mark.parametrize("distance", [DotProductSimilarity(), LpDistance()])
def test_tuplet_loss_from_labels_matches_loop(distance: object) -> None:
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(10, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 4])
    triplets = [
        (a, p, n)
        for a in range(10)
        for p in range(10)
        for n in range(10)
        if a != p and labels[a] == labels[p] and labels[a] != labels[n]
    ]
    loss = TupletNPairsLoss(distance=distance)(emb, labels)  # type: ignore[arg-type]
    assert float(loss) == pytest.approx(loop_tuplet(emb, triplets, distance), rel=1e-10)


def test_tuplet_loss_equals_npairs_when_negatives_are_other_positives() -> None:
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(5).repeat_interleave(2)
    anchors, positives = torch.arange(0, 10, 2), torch.arange(1, 10, 2)
    i, j = torch.where(~torch.eye(5, dtype=torch.bool))
    tuplet = TupletNPairsLoss()(emb, labels, (anchors[i], positives[i], positives[j]))
    npairs = NPairsLoss()(emb, labels)
    assert float(tuplet.detach()) == pytest.approx(float(npairs.detach()), rel=1e-10)
    (g1,) = torch.autograd.grad(tuplet, emb)
    (g2,) = torch.autograd.grad(NPairsLoss()(emb, labels), emb)
    torch.testing.assert_close(g1, g2)


def test_tuplet_loss_empty_and_grouped_helper() -> None:
    emb = torch.randn(4, 3, requires_grad=True)
    empty = torch.empty(0, dtype=torch.long)
    loss = TupletNPairsLoss()(emb, torch.zeros(4, dtype=torch.long), (empty, empty, empty))
    loss.backward()
    assert float(loss.detach()) == 0.0 and emb.grad is not None and not emb.grad.any()
    one_class = TupletNPairsLoss()(emb.detach(), torch.zeros(4, dtype=torch.long))
    assert float(one_class) == 0.0
    x = torch.tensor([1000.0, -1000.0, 0.5, 2.0])
    out = grouped_log1p_sum_exp(x, torch.tensor([0, 0, 1, 1]), 3)
    torch.testing.assert_close(
        out, torch.tensor([1000.0, math.log(1 + math.exp(0.5) + math.exp(2.0)), 0.0])
    )
