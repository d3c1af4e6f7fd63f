"""The (N+1)-tuplet loss (Sohn, NeurIPS 2016) with an explicit negative set per anchor-positive
pair: the loss HDML trains its synthetic negatives with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance, DotProductSimilarity
from ..pairwise import pairs_to_triplets
from ..reducers import LossDict
from .base import BaseMetricLossFunction, Batch, LossOptions


def grouped_log1p_sum_exp(excess: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """``log(1 + sum_{t in g} exp(excess_t))`` for every group ``g``, computed stably.

    ``(T,)`` values and ``(T,)`` group ids in ``[0, n_groups)`` -> ``(n_groups,)``.
    """
    shift = excess.new_zeros(n_groups)
    shift = shift.scatter_reduce(0, group, excess.detach(), reduce="amax", include_self=True)
    total = excess.new_zeros(n_groups).index_add(0, group, torch.exp(excess - shift[group]))
    return shift + torch.log(torch.exp(-shift) + total)


class TupletNPairsLoss(BaseMetricLossFunction):
    """The N-pair loss with an explicit negative set per anchor-positive pair.

    Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NeurIPS 2016
    (the ``(N+1)``-tuplet loss): for each pair ``(a, p)`` with negatives ``n_1..n_k``,

        loss(a, p) = log(1 + sum_j exp(s(a, n_j) - s(a, p)))

    with ``s`` the similarity (``-distance`` for a distance). With an ``indices_tuple`` the
    negatives of ``(a, p)`` are those of the triplets ``(a, p, n)`` that name it (this is what
    HDML feeds: each anchor's own synthetic negatives, which :class:`~deepmetric.losses.npairs.
    NPairsLoss` cannot express since it takes the negatives from the other pairs' positives).
    Without one, every positive pair is used with every negative of its anchor, in ``O(B·R)``
    memory. Default distance ``DotProductSimilarity()`` and ``MeanReducer`` over the pairs, as
    for ``NPairsLoss``; when each anchor's negatives are exactly the other pairs' positives the
    two losses agree.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar.
    """

    def __init__(self, **options: Unpack[LossOptions]) -> None:
        super().__init__(**options)

    def get_default_distance(self) -> BaseDistance:
        return DotProductSimilarity()

    def compute_loss(self, batch: Batch) -> LossDict:
        mat = self.distance(batch.embeddings, batch.ref_emb)
        closeness = mat if self.distance.is_inverted else -mat
        if batch.indices_tuple is not None:
            a, p, n = pairs_to_triplets(batch.indices_tuple)
            if len(a) == 0:
                return self.zero_losses()
            n_ref = mat.shape[1]
            pair_ids, group = torch.unique(a * n_ref + p, return_inverse=True)
            excess = closeness[a, n] - closeness[a, p]
            losses = grouped_log1p_sum_exp(excess, group, len(pair_ids))
            anchors = torch.div(pair_ids, n_ref, rounding_mode="floor")
        else:
            pos_mask, neg_mask = batch.masks()
            has_neg = torch.where(neg_mask.any(dim=1))[0]
            pos_mask = pos_mask[has_neg]
            if not bool(pos_mask.any()):
                return self.zero_losses()
            # log-sum-exp of the closeness to each anchor's negatives, rows with negatives only
            neg_close = closeness[has_neg].masked_fill(~neg_mask[has_neg], float("-inf"))
            neg_lse = torch.logsumexp(neg_close, dim=1)
            rows, p = torch.where(pos_mask)
            anchors = has_neg[rows]
            losses = F.softplus(neg_lse[rows] - closeness[anchors, p])
        return {"loss": {"losses": losses, "indices": anchors, "reduction_type": "element"}}
