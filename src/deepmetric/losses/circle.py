"""Circle loss (Sun, Cheng, Zhang, Zhang, Zheng, Wang & Wei, 2020), for pairwise labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance, CosineSimilarity
from ..reducers import AvgNonZeroReducer, BaseReducer, LossDict
from ._logsumexp import masked_logsumexp
from .base import BaseMetricLossFunction, Batch, LossOptions
from .multi_similarity import pair_masks_to_learn_from


def circle_row_losses(
    sim: Tensor, pos_mask: Tensor, neg_mask: Tensor, m: float, gamma: float
) -> Tensor:
    """Per-query circle losses.

    With ``O_p = 1 + m``, ``O_n = -m``, ``Δ_p = 1 - m``, ``Δ_n = m`` and the self-paced weights
    ``α_p = relu(O_p - s_p)``, ``α_n = relu(s_n - O_n)`` (held constant: no gradient flows
    through them), query ``i`` has::

        loss_i = softplus(log Σ_p exp(-γ α_p (s_p - Δ_p)) + log Σ_n exp(γ α_n (s_n - Δ_n)))

    and 0 when it has no positive or no negative.

    Args:
        sim: ``(B, R)`` similarity matrix.
        pos_mask, neg_mask: boolean ``(B, R)`` masks of the positive and negative pairs.
        m: the relaxation margin.
        gamma: the scale.

    Returns:
        ``(B,)`` losses.
    """
    weight_p = F.relu((1 + m) - sim.detach())
    weight_n = F.relu(sim.detach() + m)
    pos_lse, has_pos = masked_logsumexp(-gamma * weight_p * (sim - (1 - m)), pos_mask)
    neg_lse, has_neg = masked_logsumexp(gamma * weight_n * (sim - m), neg_mask)
    losses = F.softplus(pos_lse + neg_lse)
    return torch.where(has_pos & has_neg, losses, torch.zeros_like(losses))


class CircleLoss(BaseMetricLossFunction):
    """Re-weight each similarity by how far it is from its optimum, giving a circular decision
    boundary.

    Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization", 2020.
    Arguments and defaults as in PML: ``m=0.4`` (relaxation margin), ``gamma=80`` (scale),
    ``CosineSimilarity``, ``AvgNonZeroReducer`` over the queries (see :func:`circle_row_losses`).
    The paper suggests ``m=0.25, gamma=256`` for face recognition, ``m=0.25, gamma=128`` for
    person re-identification, ``m=0.4, gamma=80`` for fine-grained retrieval.

    The distance must be a similarity (``is_inverted``); PML accepts only ``CosineSimilarity``,
    this also accepts e.g. ``DotProductSimilarity``.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(
        self,
        m: float = 0.4,
        gamma: float = 80,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        if not self.distance.is_inverted:
            raise ValueError(
                f"CircleLoss needs a similarity (e.g. CosineSimilarity), got "
                f"{type(self.distance).__name__}"
            )
        self.m = m
        self.gamma = gamma

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def get_default_reducer(self) -> BaseReducer:
        return AvgNonZeroReducer()

    def compute_loss(self, batch: Batch) -> LossDict:
        masks = pair_masks_to_learn_from(batch)
        if masks is None:
            return self.zero_losses()
        sim = self.distance(batch.embeddings, batch.ref_emb)
        losses = circle_row_losses(sim, *masks, self.m, self.gamma)
        rows = torch.arange(len(losses), device=losses.device)
        return {"loss": {"losses": losses, "indices": rows, "reduction_type": "element"}}
