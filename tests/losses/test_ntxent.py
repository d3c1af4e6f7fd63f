"""NTXentLoss (:mod:`deepmetric.losses.ntxent`): a loop reference, a closed form, a bad
temperature."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from deepmetric.losses.ntxent import NTXentLoss
from tests.losses.lifted_npairs_ntxent_cases import cosine, shuffled_batch
from tests.parity import value_and_grad


def loop_ntxent(emb: Tensor, labels: Tensor, temperature: float) -> Tensor:
    b = len(emb)
    losses = []
    for i in range(b):
        negs = [
            torch.exp(cosine(emb[i], emb[k]) / temperature)
            for k in range(b)
            if labels[k] != labels[i]
        ]
        for j in range(b):
            if j != i and labels[j] == labels[i]:
                pos = torch.exp(cosine(emb[i], emb[j]) / temperature)
                losses.append(-torch.log(pos / (pos + torch.stack(negs).sum())))
    return torch.stack(losses).mean()


def test_ntxent_matches_loop() -> None:
    emb, labels = shuffled_batch(n_classes=4, per_class=3, dim=5, seed=22)
    v1, g1 = value_and_grad(NTXentLoss(temperature=0.3), emb, labels)
    v2, g2 = value_and_grad(loop_ntxent, emb, labels, 0.3)
    assert v1 == pytest.approx(v2, rel=1e-10)
    torch.testing.assert_close(g1, g2)


def test_ntxent_closed_form() -> None:
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    # pairs (0,1) and (1,0): cosine 1 vs one negative at cosine 0
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 1.0))
    assert float(NTXentLoss(temperature=0.5)(emb, labels)) == pytest.approx(expected, rel=1e-12)


def test_ntxent_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0.0)
