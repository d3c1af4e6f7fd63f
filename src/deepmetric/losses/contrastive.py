"""Contrastive loss (Hadsell, Chopra & LeCun, 2006)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from .._pairs import pairs_from_masks, to_pairs
from ..distances import BaseDistance
from ..reducers import (
    AvgNonZeroReducer,
    BaseReducer,
    LossDict,
    SelectingReducer,
    reduce_masked,
    reduces_by_selection,
)
from .base import BaseMetricLossFunction, Batch, LossOptions


def contrastive_pair_losses(
    pos_dists: Tensor,
    neg_dists: Tensor,
    pos_margin: float,
    neg_margin: float,
    distance: BaseDistance,
) -> tuple[Tensor, Tensor]:
    """Per-pair losses: ``relu(d+ - m+)`` for positive pairs, ``relu(m- - d-)`` for negatives
    (the other way round for a similarity)."""
    pos = F.relu(distance.margin(pos_dists, pos_margin))
    neg = F.relu(distance.margin(neg_margin, neg_dists))
    return pos, neg


class ContrastiveLoss(BaseMetricLossFunction):
    """Pull positive pairs within ``pos_margin``; push negative pairs beyond ``neg_margin``.

    Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an Invariant Mapping", 2006.
    Defaults as in PML: ``pos_margin=0, neg_margin=1``, ``AvgNonZeroReducer`` applied to the
    positive and the negative losses separately, then summed.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar.
    """

    def __init__(
        self,
        pos_margin: float = 0,
        neg_margin: float = 1,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def get_default_reducer(self) -> BaseReducer:
        return AvgNonZeroReducer()

    def compute_loss(self, batch: Batch) -> LossDict:
        mat = self.distance(batch.embeddings, batch.ref_emb)
        if batch.indices_tuple is None and reduces_by_selection(self.reducer):
            return self._masked_loss(mat, *batch.masks())
        if batch.indices_tuple is None:
            a1, p, a2, n = pairs_from_masks(*batch.masks())
        else:
            a1, p, a2, n = to_pairs(batch.indices_tuple)
        if len(a1) <= 1 and len(a2) <= 1:  # PML's rule: nothing to learn from
            return self.zero_losses("pos_loss", "neg_loss")
        pos, neg = contrastive_pair_losses(
            mat[a1, p], mat[a2, n], self.pos_margin, self.neg_margin, self.distance
        )
        return {
            "pos_loss": {"losses": pos, "indices": (a1, p), "reduction_type": "pos_pair"},
            "neg_loss": {"losses": neg, "indices": (a2, n), "reduction_type": "neg_pair"},
        }

    def _masked_loss(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor) -> LossDict:
        """All pairs of the labels, reduced straight from the ``(B, R)`` matrix (no index
        lists): the fast path for the selecting reducers."""
        reducer = self.reducer
        assert isinstance(reducer, SelectingReducer)
        if int(pos_mask.sum()) <= 1 and int(neg_mask.sum()) <= 1:  # PML's rule, as above
            return self.zero_losses("pos_loss", "neg_loss")
        pos, neg = contrastive_pair_losses(
            mat, mat, self.pos_margin, self.neg_margin, self.distance
        )
        return {
            name: {
                "losses": reduce_masked(reducer, losses, mask),
                "indices": None,
                "reduction_type": "already_reduced",
            }
            for name, losses, mask in (("pos_loss", pos, pos_mask), ("neg_loss", neg, neg_mask))
        }
