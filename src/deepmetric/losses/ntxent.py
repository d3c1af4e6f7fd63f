"""NT-Xent, the normalised temperature-scaled cross-entropy loss of SimCLR (Chen, Kornblith,
Norouzi & Hinton, 2020), also known as InfoNCE (van den Oord, Li & Vinyals, 2018)."""

from __future__ import annotations

from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance, CosineSimilarity
from ..functional import ntxent_pairs
from ..pairwise import positive_pair_losses
from ..reducers import LossDict
from .base import BaseMetricLossFunction, Batch, LossOptions


class NTXentLoss(BaseMetricLossFunction):
    """Each positive pair is a softmax classification of the positive against the anchor's
    negatives, at ``temperature``.

    Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
    Representations", 2020; van den Oord, Li & Vinyals, "Representation Learning with
    Contrastive Predictive Coding", 2018. Arguments and defaults as in PML:
    ``temperature=0.07``, ``CosineSimilarity()``, ``MeanReducer`` over the positive pairs. Works
    from labels or from a miner's pairs or triplets (each pair counted as often as the tuple
    names it). The formula is :func:`~deepmetric.functional.ntxent_pairs`.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(self, temperature: float = 0.07, **options: Unpack[LossOptions]) -> None:
        super().__init__(**options)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> LossDict:
        entry = positive_pair_losses(batch, self.distance, self._rule)
        return self.zero_losses() if entry is None else {"loss": entry}

    def _rule(self, mat: Tensor, anchors: Tensor, positives: Tensor, neg: Tensor) -> Tensor:
        return ntxent_pairs(mat, anchors, positives, neg, self.temperature, self.distance)
