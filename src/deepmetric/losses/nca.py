"""Neighbourhood components analysis loss (Goldberger, Roweis, Hinton & Salakhutdinov, 2005)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance, LpDistance
from ..functional import nca_rows
from ..pairwise import PairBlocks, RowBlock, row_losses
from ..reducers import LossDict, LossInfo
from .base import BaseMetricLossFunction, Batch, LossOptions
from .proxy import miner_weights


class NCALoss(BaseMetricLossFunction):
    """Each query should pick a sample of its own label from a softmax over its row.

    Goldberger, Roweis, Hinton & Salakhutdinov, "Neighbourhood Components Analysis", NIPS 2005
    (the formula: :func:`~deepmetric.functional.nca_rows`). Arguments and defaults as in PML:
    ``softmax_scale=1``, ``LpDistance(power=2)``, ``MeanReducer`` over the queries whose
    probability is not 0 (a query with no other sample of its label is left out). A query is
    never compared with itself, nor with its own copy in a cross-batch memory. Labels are
    required; a miner's tuple does not choose pairs but weights each query by how often it
    appears in it (its anchors only, with a reference set), as in PML.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    requires_labels = True

    def __init__(self, softmax_scale: float = 1, **options: Unpack[LossOptions]) -> None:
        super().__init__(**options)
        self.softmax_scale = softmax_scale

    def get_default_distance(self) -> BaseDistance:
        return LpDistance(power=2)

    def compute_loss(self, batch: Batch) -> LossDict:
        if len(batch.embeddings) <= 1:
            return self.zero_losses()
        by_labels = replace(batch, indices_tuple=None)  # every pair the labels define
        pairs = PairBlocks(by_labels)
        losses = row_losses(by_labels, self.distance, self._rule, pairs)
        # as PML: a query whose probability is 0 (no positive, or an underflow) is left out
        has_pos = torch.bincount(pairs.pos_rows, minlength=len(losses)) > 0
        rows = torch.where(has_pos & (torch.exp(-losses.detach()) != 0))[0]
        weights = miner_weights(
            batch.indices_tuple,
            len(losses),
            losses.dtype,
            losses.device,
            anchors_only=not batch.same_source,
        )
        entry: LossInfo = {
            "losses": losses[rows] * weights[rows],
            "indices": rows,
            "reduction_type": "element",
        }
        return {"loss": entry}

    def _rule(self, block: RowBlock) -> tuple[Tensor, Tensor]:
        return nca_rows(block, self.softmax_scale, self.distance)
