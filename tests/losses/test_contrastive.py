"""ContrastiveLoss (:mod:`deepmetric.losses.contrastive`) against a loop written here."""

from __future__ import annotations

import pytest
import torch

from deepmetric import distances, losses
from tests.losses.contrastive_triplet_cases import _batch


def test_contrastive_against_loop() -> None:
    emb, labels = _batch(n_classes=3, per_class=3, dim=4, seed=17)
    d = torch.cdist(emb, emb)
    pos = [float(d[i, j]) for i in range(9) for j in range(9) if i != j and labels[i] == labels[j]]
    neg = [
        max(0.0, 1.5 - float(d[i, j])) for i in range(9) for j in range(9) if labels[i] != labels[j]
    ]
    neg_nonzero = [x for x in neg if x > 0]
    expected = sum(pos) / len(pos) + sum(neg_nonzero) / len(neg_nonzero)
    loss = losses.ContrastiveLoss(
        neg_margin=1.5, distance=distances.LpDistance(normalize_embeddings=False)
    )
    assert float(loss(emb, labels)) == pytest.approx(expected)
