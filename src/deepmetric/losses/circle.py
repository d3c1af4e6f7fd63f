"""Circle loss (Sun, Cheng, Zhang, Zhang, Zheng, Wang & Wei, 2020), for pairwise labels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance, CosineSimilarity
from ..pairwise import (
    RowBlock,
    blockwise_row_losses,
    pair_blocks_to_learn_from,
    row_softmax_,
    sparse_softmax,
)
from ..reducers import AvgNonZeroReducer, BaseReducer, LossDict
from ._logsumexp import masked_logsumexp
from .base import BaseMetricLossFunction, Batch, LossOptions

# F.softplus (and PML's nn.Softplus) is the identity above this, with a slope of exactly 1.
_SOFTPLUS_THRESHOLD = 20.0


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


def circle_row_losses_and_grad(block: RowBlock, m: float, gamma: float) -> tuple[Tensor, Tensor]:
    """The losses of :func:`circle_row_losses` for the rows of ``block`` and, in closed form,
    their gradient with respect to the similarities ``block.mat``: with ``z`` the argument of the
    softplus and ``w`` the softmax weights of each log-sum-exp, ``sigmoid(z) · w · (-γ α_p)`` for
    a positive and ``sigmoid(z) · w · γ α_n`` for a negative (the weights ``α`` held constant); 0
    in a row without a positive or without a negative.

    Shapes: ``block.mat`` ``(c, R)`` -> ``(c,)`` losses, ``(c, R)`` gradient.
    """
    sim, rows, cols = block.mat, block.pos_rows, block.pos_cols
    weight_n = (sim + m).clamp_min_(0)
    neg_exponent = (sim - m).mul_(weight_n).mul_(gamma)
    neg_lse, grad = row_softmax_(block.fill_non_negatives_(neg_exponent, -math.inf), with_one=False)
    pos_sim = sim[rows, cols]
    weight_p = ((1 + m) - pos_sim).clamp_min_(0)
    pos_lse, pos_weight = sparse_softmax(
        -gamma * weight_p * (pos_sim - (1 - m)), rows, len(sim), with_one=False
    )
    z = pos_lse + neg_lse  # -inf for a row without a positive or without a negative
    has_both = torch.isfinite(z)
    losses = torch.where(has_both, F.softplus(z), 0.0)
    slope = torch.where(z > _SOFTPLUS_THRESHOLD, 1.0, torch.sigmoid(z)) * has_both
    grad.mul_(weight_n.mul_(gamma * slope.unsqueeze(1)))
    grad[rows, cols] = pos_weight * (-gamma * weight_p * slope[rows])  # positives: were 0
    return losses, grad


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
        pairs = pair_blocks_to_learn_from(batch)
        if pairs is None:
            return self.zero_losses()
        if pairs.contradicting:
            raise ValueError("indices_tuple names the same pair as both a positive and a negative")
        losses = blockwise_row_losses(batch, self.distance, self._row_rule, pairs)
        if losses is None:  # a similarity the blockwise path does not compute
            sim = self.distance(batch.embeddings, batch.ref_emb)
            losses = circle_row_losses(sim, *batch.masks(), self.m, self.gamma)
        rows = torch.arange(len(losses), device=losses.device)
        return {"loss": {"losses": losses, "indices": rows, "reduction_type": "element"}}

    def _row_rule(self, block: RowBlock) -> tuple[Tensor, Tensor]:
        return circle_row_losses_and_grad(block, self.m, self.gamma)
