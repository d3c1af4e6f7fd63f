"""A batch (:mod:`deepmetric.pairwise.batch`) whose ``masks`` are overridden, on both paths."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import pytest
import torch
from torch import Tensor

from deepmetric.pairwise import Batch, prepare_batch
from tests.pairwise.engine_cases import (
    LOSSES,
    _batch,
    _loss_pair,
)


@dataclass
class _UpperPositivesBatch(Batch):
    """A batch whose positive pairs are only those ``(i, j)`` with ``i < j``: asymmetric pairs
    with no separate reference set (what an overridden ``masks`` may give)."""

    def masks(self) -> tuple[Tensor, Tensor]:
        pos_mask, neg_mask = super().masks()
        return torch.triu(pos_mask, diagonal=1), neg_mask


@pytest.mark.parametrize("name", list(LOSSES))
def test_fast_path_respects_overridden_masks(name: str, small_blocks: None) -> None:
    emb, labels = _batch(seed=16)
    fast, slow = _loss_pair(name, "lp")

    def values(loss: Any) -> tuple[float, Tensor]:
        e = emb.clone().requires_grad_(True)
        plain = prepare_batch(e, labels, None, None, None)
        batch = _UpperPositivesBatch(**{f.name: getattr(plain, f.name) for f in fields(Batch)})
        value = loss.loss_from_batch(batch)
        value.backward()
        assert e.grad is not None
        return float(value.detach()), e.grad

    (v1, g1), (v2, g2) = values(fast), values(slow)
    assert v1 == pytest.approx(v2, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)
    if name != "contrastive":  # (its mean over pairs is the same over half of them, d_ij = d_ji)
        # the pairs did change: not the value of the full label masks
        assert v1 != pytest.approx(float(slow(emb, labels)), rel=1e-6)
