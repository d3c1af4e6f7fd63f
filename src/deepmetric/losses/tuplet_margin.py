"""Tuplet margin loss (Yu & Tao, 2019)."""

from __future__ import annotations

import math

from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance, CosineSimilarity
from ..functional import tuplet_margin_pairs
from ..pairwise import positive_pair_losses
from ..reducers import LossDict
from .base import BaseMetricLossFunction, Batch, LossOptions


class TupletMarginLoss(BaseMetricLossFunction):
    """Each positive pair, its angle widened by a margin, should beat every negative of its
    anchor in a softmax at ``scale``.

    Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019 (the formula:
    :func:`~deepmetric.functional.tuplet_margin_pairs`). Arguments and defaults as in PML:
    ``margin=5.73`` (degrees), ``scale=64``, ``CosineSimilarity`` (the only distance it takes),
    ``MeanReducer`` over the positive pairs. Works from labels or from a miner's pairs or
    triplets (each negative pair counted as often as the tuple names it).

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(
        self, margin: float = 5.73, scale: float = 64, **options: Unpack[LossOptions]
    ) -> None:
        super().__init__(**options)
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(
                f"TupletMarginLoss needs a CosineSimilarity, got {type(self.distance).__name__}"
            )
        self.margin = math.radians(margin)
        self.scale = scale

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> LossDict:
        entry = positive_pair_losses(batch, self.distance, self._rule)
        return self.zero_losses() if entry is None else {"loss": entry}

    def _rule(self, mat: Tensor, anchors: Tensor, positives: Tensor, neg: Tensor) -> Tensor:
        return tuplet_margin_pairs(mat, anchors, positives, neg, self.margin, self.scale)
