"""Lifted structure loss (Oh Song, Xiang, Jegelka & Savarese, 2016) and its generalised form
(Hermans, Beyer & Leibe, 2017).

Both are computed from the ``(B, R)`` distance matrix with ``O(B·R)`` memory; their formulas are
:func:`~deepmetric.functional.lifted_structure_pairs` and
:func:`~deepmetric.functional.generalized_lifted_structure_rows`.
"""

from __future__ import annotations

from torch import Tensor
from typing_extensions import Unpack

from ..functional import generalized_lifted_structure_rows, lifted_structure_pairs
from ..pairwise import RowBlock, pair_blocks_to_learn_from, positive_pair_losses, row_losses
from ..reducers import LossDict, row_entry
from .base import BaseMetricLossFunction, Batch, LossOptions


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
        entry = positive_pair_losses(batch, self.distance, self._rule)
        return self.zero_losses() if entry is None else {"loss": entry}

    def _rule(self, mat: Tensor, anchors: Tensor, positives: Tensor, neg: Tensor) -> Tensor:
        return lifted_structure_pairs(
            mat, anchors, positives, neg, self.pos_margin, self.neg_margin, self.distance
        )


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
