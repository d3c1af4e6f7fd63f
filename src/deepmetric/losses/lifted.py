"""Lifted structure loss (Oh Song, Xiang, Jegelka & Savarese, 2016) and its generalised form
(Hermans, Beyer & Leibe, 2017).

Both are computed from the ``(B, R)`` distance matrix with ``O(B·R)`` memory. PML's
``LiftedStructureLoss`` compares every positive pair with every negative pair (a
``P × N`` matrix, ``B³``-sized for a full batch); here the log-sum-exp over each query row's
negatives is computed once, and each positive pair combines the two rows it needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance
from ..functional import generalized_lifted_structure_rows
from ..pairwise import RowBlock, pair_blocks_to_learn_from, row_losses
from ..reducers import LossDict
from ._logsumexp import (
    at_most_one_pair_each,
    masked_logsumexp,
    positive_pairs_and_negative_weights,
)
from .base import BaseMetricLossFunction, Batch, LossOptions, row_entry


def lifted_structure_losses(
    mat: Tensor,
    anchors: Tensor,
    positives: Tensor,
    neg_weight: Tensor,
    pos_margin: float,
    neg_margin: float,
    distance: BaseDistance,
) -> Tensor:
    """Per-positive-pair lifted structure losses.

    For a positive pair ``(i, j)``::

        loss = relu(log Σ_{(k, l) negative, k ∈ {i, j}} exp(m- - d(k, l)) + d(i, j) - m+)² / 2

    (margins measured the other way round for a similarity; the sum is 0 when the pair has no
    negative pair). As in PML, the negatives of ``j`` are the negative pairs whose *query* index
    is ``j``, even when ``j`` indexes a separate reference set.

    Args:
        mat: ``(B, R)`` distance matrix.
        anchors, positives: ``(P,)`` indices of the positive pairs into its rows and columns.
        neg_weight: ``(B, R)`` boolean mask or count of the negative pairs.
        pos_margin, neg_margin: the margins ``m+`` and ``m-``.
        distance: the distance that produced ``mat`` (for the direction of the margins).

    Returns:
        ``(P,)`` losses.
    """
    n_query = mat.shape[0]
    # log Σ exp(remaining negative margin) over each query row's negative pairs: (B,)
    row_lse, row_has_neg = masked_logsumexp(distance.margin(neg_margin, mat), neg_weight)
    # each positive pair uses the rows of its two indices; a row counts once if both are equal
    second_is_row = (positives < n_query) & (positives != anchors)
    second_row = positives.clamp_max(n_query - 1)
    both_rows = torch.stack([row_lse[anchors], row_lse[second_row]], dim=1)
    keep = torch.stack([row_has_neg[anchors], row_has_neg[second_row] & second_is_row], dim=1)
    neg_term, _ = masked_logsumexp(both_rows, keep, dim=1, empty_value=0.0)
    remaining_pos_margin = distance.margin(mat[anchors, positives], pos_margin)
    # each positive pair appears twice, (i, j) and (j, i): hence the 1/2
    return F.relu(neg_term + remaining_pos_margin) ** 2 / 2


class LiftedStructureLoss(BaseMetricLossFunction):
    """Each positive pair should be closer than every negative pair of either of its samples.

    Oh Song, Xiang, Jegelka & Savarese, "Deep Metric Learning via Lifted Structured Feature
    Embedding", CVPR 2016. Arguments and defaults as in PML: ``neg_margin=1, pos_margin=0``,
    ``LpDistance()``, ``MeanReducer`` over the positive pairs. Works from labels or from a
    miner's pairs or triplets (each pair counted as often as the tuple names it).

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(
        self, neg_margin: float = 1, pos_margin: float = 0, **options: Unpack[LossOptions]
    ) -> None:
        super().__init__(**options)
        self.neg_margin = neg_margin
        self.pos_margin = pos_margin

    def compute_loss(self, batch: Batch) -> LossDict:
        mat = self.distance(batch.embeddings, batch.ref_emb)
        anchors, positives, n_neg_pairs, neg_weight = positive_pairs_and_negative_weights(
            batch, mat.dtype
        )
        n_pos_pairs = len(anchors)
        if n_pos_pairs == 0 or n_neg_pairs == 0 or at_most_one_pair_each(n_pos_pairs, n_neg_pairs):
            return self.zero_losses()
        losses = lifted_structure_losses(
            mat, anchors, positives, neg_weight, self.pos_margin, self.neg_margin, self.distance
        )
        return {
            "loss": {
                "losses": losses,
                "indices": (anchors, positives),
                "reduction_type": "pos_pair",
            }
        }


class GeneralizedLiftedStructureLoss(BaseMetricLossFunction):
    """Per sample: a soft maximum over its positive distances plus a soft maximum over its
    negative margins.

    The generalised lifted structure loss of Hermans, Beyer & Leibe, "In Defense of the Triplet
    Loss for Person Re-Identification", 2017 (after Oh Song et al., 2016). Arguments and
    defaults as in PML: ``neg_margin=1, pos_margin=0``, ``LpDistance()``, ``MeanReducer`` over
    the ``B`` samples. A miner's pairs are merged into masks (duplicates count once, as in PML).

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(
        self, neg_margin: float = 1, pos_margin: float = 0, **options: Unpack[LossOptions]
    ) -> None:
        super().__init__(**options)
        self.neg_margin = neg_margin
        self.pos_margin = pos_margin

    def compute_loss(self, batch: Batch) -> LossDict:
        pairs = pair_blocks_to_learn_from(batch)
        if pairs is None:
            return self.zero_losses()
        return {"loss": row_entry(row_losses(batch, self.distance, self._rule, pairs))}

    def _rule(self, block: RowBlock) -> tuple[Tensor, Tensor]:
        return generalized_lifted_structure_rows(
            block, self.pos_margin, self.neg_margin, self.distance
        )
