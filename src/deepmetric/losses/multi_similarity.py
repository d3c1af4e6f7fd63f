"""Multi-similarity loss (Wang, Han, Huang, Dong & Scott, 2019)."""

from __future__ import annotations

import math

import torch
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
from ..reducers import LossDict
from ._logsumexp import masked_logsumexp
from .base import BaseMetricLossFunction, Batch, LossOptions


def multi_similarity_row_losses(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    alpha: float,
    beta: float,
    base: float,
    distance: BaseDistance,
) -> Tensor:
    """Per-query multi-similarity losses.

    For query ``i`` with similarities ``s`` to its positives ``P_i`` and negatives ``N_i``::

        loss_i = 1/α · log(1 + Σ_{p ∈ P_i} exp(-α (s_ip - base)))
               + 1/β · log(1 + Σ_{n ∈ N_i} exp( β (s_in - base)))

    (for a distance the signs flip: positives are penalised above ``base``, negatives below). An
    empty set contributes ``log 1 = 0``.

    Args:
        mat: ``(B, R)`` similarity (or distance) matrix.
        pos_mask, neg_mask: boolean ``(B, R)`` masks of the positive and negative pairs.
        alpha, beta: the positive and negative temperatures.
        base: the similarity both sets are measured from.
        distance: the distance that produced ``mat`` (for the direction of the comparison).

    Returns:
        ``(B,)`` losses.
    """
    pos_exponent = alpha * distance.margin(mat, base)
    neg_exponent = beta * distance.margin(base, mat)
    ninf = float("-inf")
    pos_lse, _ = masked_logsumexp(pos_exponent, pos_mask, empty_value=ninf)
    neg_lse, _ = masked_logsumexp(neg_exponent, neg_mask, empty_value=ninf)
    zero = torch.zeros((), dtype=mat.dtype, device=mat.device)
    # log(1 + Σ exp(x)) = logaddexp(log Σ exp(x), 0); an empty sum (-inf) gives 0
    return torch.logaddexp(pos_lse, zero) / alpha + torch.logaddexp(neg_lse, zero) / beta


def multi_similarity_row_losses_and_grad(
    block: RowBlock, alpha: float, beta: float, base: float, distance: BaseDistance
) -> tuple[Tensor, Tensor]:
    """The losses of :func:`multi_similarity_row_losses` for the rows of ``block`` and, in closed
    form, their gradient with respect to ``block.mat``: with ``w`` the softmax weights of each
    log-sum-exp (the implicit ``1`` included), ``∂loss_i/∂s_ij = -w_ij`` for a positive and
    ``+w_ij`` for a negative (the signs flip for a distance).

    Shapes: ``block.mat`` ``(c, R)`` -> ``(c,)`` losses, ``(c, R)`` gradient.
    """
    mat, rows, cols = block.mat, block.pos_rows, block.pos_cols
    sign = 1.0 if distance.is_inverted else -1.0
    neg_exponent = block.fill_non_negatives_(distance.margin(base, mat).mul_(beta), -math.inf)
    neg_lse, grad = row_softmax_(neg_exponent, with_one=True)
    grad.mul_(sign)
    pos_exponent = distance.margin(mat[rows, cols], base) * alpha
    pos_lse, pos_weight = sparse_softmax(pos_exponent, rows, len(mat), with_one=True)
    grad[rows, cols] = -sign * pos_weight  # positives are not negatives: these entries were 0
    return pos_lse / alpha + neg_lse / beta, grad


class MultiSimilarityLoss(BaseMetricLossFunction):
    """Weight every pair by its similarity to the others of its query (soft hard mining).

    Wang, Han, Huang, Dong & Scott, "Multi-Similarity Loss with General Pair Weighting for Deep
    Metric Learning", 2019. Arguments and defaults as in PML: ``alpha=2`` (positive
    temperature), ``beta=50`` (negative temperature), ``base=0.5``, ``CosineSimilarity``,
    ``MeanReducer`` over the queries (see :func:`multi_similarity_row_losses`).

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(
        self,
        alpha: float = 2,
        beta: float = 50,
        base: float = 0.5,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        if alpha == 0 or beta == 0:
            raise ValueError(f"alpha and beta must be non-zero, got alpha={alpha}, beta={beta}")
        self.alpha = alpha
        self.beta = beta
        self.base = base

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def _row_rule(self, block: RowBlock) -> tuple[Tensor, Tensor]:
        return multi_similarity_row_losses_and_grad(
            block, self.alpha, self.beta, self.base, self.distance
        )

    def compute_loss(self, batch: Batch) -> LossDict:
        pairs = pair_blocks_to_learn_from(batch)
        if pairs is None:
            return self.zero_losses()
        if pairs.contradicting:
            raise ValueError("indices_tuple names the same pair as both a positive and a negative")
        losses = blockwise_row_losses(batch, self.distance, self._row_rule, pairs)
        if losses is None:  # a distance the blockwise path does not compute
            mat = self.distance(batch.embeddings, batch.ref_emb)
            losses = multi_similarity_row_losses(
                mat, *batch.masks(), self.alpha, self.beta, self.base, self.distance
            )
        rows = torch.arange(len(losses), device=losses.device)
        return {"loss": {"losses": losses, "indices": rows, "reduction_type": "element"}}
