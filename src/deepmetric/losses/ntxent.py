"""NT-Xent, the normalised temperature-scaled cross-entropy loss of SimCLR (Chen, Kornblith,
Norouzi & Hinton, 2020), also known as InfoNCE (van den Oord, Li & Vinyals, 2018)."""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance, CosineSimilarity
from ..reducers import LossDict
from ._logsumexp import (
    at_most_one_pair_each,
    masked_logsumexp,
    positive_pairs_and_negative_weights,
)
from .base import BaseMetricLossFunction, Batch, LossOptions


def ntxent_losses(
    mat: Tensor,
    anchors: Tensor,
    positives: Tensor,
    neg_weight: Tensor,
    temperature: float,
    distance: BaseDistance,
) -> Tensor:
    """Per-positive-pair NT-Xent losses.

    With logits ``s = sim / temperature`` (``sim = -distance`` for a distance), the loss of the
    positive pair ``(i, j)`` is the cross-entropy of picking ``j`` among ``j`` and the negatives
    of ``i``::

        loss = -log(exp(s_ij) / (exp(s_ij) + Σ_{k neg of i} exp(s_ik)) + tiny)

    where ``tiny`` is the dtype's smallest normal number, as in PML (it caps the loss).

    Args:
        mat: ``(B, R)`` distance or similarity matrix.
        anchors, positives: ``(P,)`` indices of the positive pairs.
        neg_weight: ``(B, R)`` boolean mask or count of the negative pairs.
        temperature: the softmax temperature.
        distance: the distance that produced ``mat``.

    Returns:
        ``(P,)`` losses.
    """
    logits = (mat if distance.is_inverted else -mat) / temperature
    # log Σ exp over each anchor row's negatives, computed once per row: (B,)
    neg_lse, _ = masked_logsumexp(logits, neg_weight, empty_value=float("-inf"))
    pos_logits = logits[anchors, positives]
    log_denominator = torch.logaddexp(pos_logits, neg_lse[anchors])
    tiny = torch.finfo(mat.dtype).tiny
    return -torch.log(torch.exp(pos_logits - log_denominator) + tiny)


class NTXentLoss(BaseMetricLossFunction):
    """Each positive pair is a softmax classification of the positive against the anchor's
    negatives, at ``temperature``.

    Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
    Representations", 2020; van den Oord, Li & Vinyals, "Representation Learning with
    Contrastive Predictive Coding", 2018. Arguments and defaults as in PML:
    ``temperature=0.07``, ``CosineSimilarity()``, ``MeanReducer`` over the positive pairs. Works
    from labels or from a miner's pairs or triplets (each pair counted as often as the tuple
    names it).

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
        mat = self.distance(batch.embeddings, batch.ref_emb)
        anchors, positives, n_neg_pairs, neg_weight = positive_pairs_and_negative_weights(
            batch, mat.dtype
        )
        n_pos_pairs = len(anchors)
        if n_pos_pairs == 0 or n_neg_pairs == 0 or at_most_one_pair_each(n_pos_pairs, n_neg_pairs):
            return self.zero_losses()
        losses = ntxent_losses(mat, anchors, positives, neg_weight, self.temperature, self.distance)
        return {
            "loss": {
                "losses": losses,
                "indices": (anchors, positives),
                "reduction_type": "pos_pair",
            }
        }
