"""MultiSimilarityLoss (:mod:`deepmetric.losses.multi_similarity`) against a closed form."""

from __future__ import annotations

import math

import pytest
import torch

from deepmetric.losses.multi_similarity import MultiSimilarityLoss


# -- closed-form tiny cases ----------------------------------------------------------------------
def test_multi_similarity_closed_form() -> None:
    # unit vectors at known angles: s(0,1) = cos 60° = 0.5 (positive), s(0,2) = cos 90° = 0
    emb = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    loss = MultiSimilarityLoss(alpha=2, beta=10, base=0.5)(emb, labels)
    s12 = math.sqrt(3) / 2
    row0 = math.log(1 + 1) / 2 + math.log(1 + math.exp(10 * (0 - 0.5))) / 10
    row1 = math.log(1 + 1) / 2 + math.log(1 + math.exp(10 * (s12 - 0.5))) / 10
    row2 = math.log(1 + math.exp(10 * (0 - 0.5)) + math.exp(10 * (s12 - 0.5))) / 10  # no positive
    assert float(loss) == pytest.approx((row0 + row1 + row2) / 3, rel=1e-12)
