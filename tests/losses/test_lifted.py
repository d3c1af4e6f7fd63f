"""LiftedStructureLoss and GeneralizedLiftedStructureLoss (:mod:`deepmetric.losses.lifted`):
loop references, closed forms and contradicting pairs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from deepmetric.losses.lifted import GeneralizedLiftedStructureLoss, LiftedStructureLoss
from tests.losses.lifted_npairs_ntxent_cases import shuffled_batch
from tests.parity import value_and_grad

# ---------------------------------------------------------------------------------------------
# slow loop references, written straight from the papers
# ---------------------------------------------------------------------------------------------


def euclidean(x: Tensor, y: Tensor) -> Tensor:
    x, y = x / x.norm(), y / y.norm()
    return ((x - y) ** 2).sum().sqrt()


def loop_lifted(emb: Tensor, labels: Tensor, neg_margin: float, pos_margin: float) -> Tensor:
    b = len(emb)
    losses = []
    for i in range(b):
        for j in range(b):
            if i == j or labels[i] != labels[j]:
                continue
            terms = [
                torch.exp(neg_margin - euclidean(emb[k], emb[n]))
                for k in (i, j)
                for n in range(b)
                if labels[n] != labels[k]
            ]
            j_ij = torch.log(torch.stack(terms).sum()) + euclidean(emb[i], emb[j]) - pos_margin
            losses.append(torch.relu(j_ij) ** 2 / 2)
    return torch.stack(losses).mean()


def loop_generalized_lifted(
    emb: Tensor, labels: Tensor, neg_margin: float, pos_margin: float
) -> Tensor:
    b = len(emb)
    losses = []
    for i in range(b):
        pos = [
            euclidean(emb[i], emb[j]) - pos_margin
            for j in range(b)
            if j != i and labels[j] == labels[i]
        ]
        neg = [neg_margin - euclidean(emb[i], emb[k]) for k in range(b) if labels[k] != labels[i]]
        pos_term = torch.log(torch.stack([torch.exp(x) for x in pos]).sum()) if pos else 0.0
        neg_term = torch.log(torch.stack([torch.exp(x) for x in neg]).sum()) if neg else 0.0
        losses.append(torch.relu(torch.as_tensor(pos_term + neg_term)))
    return torch.stack(losses).mean()


def test_lifted_matches_loop() -> None:
    emb, labels = shuffled_batch(n_classes=4, per_class=3, dim=5, seed=20)
    v1, g1 = value_and_grad(LiftedStructureLoss(neg_margin=0.8, pos_margin=0.1), emb, labels)
    v2, g2 = value_and_grad(loop_lifted, emb, labels, 0.8, 0.1)
    assert v1 == pytest.approx(v2, rel=1e-10)
    torch.testing.assert_close(g1, g2)


def test_generalized_lifted_matches_loop() -> None:
    emb, labels = shuffled_batch(n_classes=4, per_class=3, dim=5, seed=21)
    loss = GeneralizedLiftedStructureLoss(neg_margin=1.5, pos_margin=0.2)
    v1, g1 = value_and_grad(loss, emb, labels)
    v2, g2 = value_and_grad(loop_generalized_lifted, emb, labels, 1.5, 0.2)
    assert v1 == pytest.approx(v2, rel=1e-10)
    torch.testing.assert_close(g1, g2)


def test_lifted_closed_form() -> None:
    """Two classes of two points on a line: every term by hand."""
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    d_neg = math.sqrt(2.0)
    # each positive pair (distance 0) sees 4 negative pairs (2 per sample), all at sqrt(2)
    expected = max(math.log(4 * math.exp(1.0 - d_neg)), 0.0) ** 2 / 2
    assert float(LiftedStructureLoss()(emb, labels)) == pytest.approx(expected, rel=1e-12)


def test_generalized_lifted_rejects_contradicting_pairs() -> None:
    emb = torch.randn(4, 3)
    tup = (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="both positive and negative"):
        GeneralizedLiftedStructureLoss()(emb, None, tup)
