"""Multi-similarity loss (Wang, Han, Huang, Dong & Scott, 2019)."""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._pairs import to_pairs
from ..distances import BaseDistance, CosineSimilarity
from ..reducers import LossDict
from ._logsumexp import at_most_one_pair_each, masked_logsumexp
from .base import BaseMetricLossFunction, Batch, LossOptions


def pair_masks_to_learn_from(batch: Batch) -> tuple[Tensor, Tensor] | None:
    """The ``(B, R)`` positive and negative masks of a matrix-based pair loss, or None when PML's
    rule says there is nothing to learn from (at most one positive and one negative pair).

    As in PML, a miner's tuple is counted as given (a repeated pair counts twice in the rule) but
    merged in the masks; a pair named both positive and negative raises ``ValueError``.
    """
    pos_mask, neg_mask = batch.masks()
    if batch.indices_tuple is None:
        n_pos, n_neg = int(pos_mask.sum()), int(neg_mask.sum())
    else:
        a1, _, a2, _ = to_pairs(batch.indices_tuple)
        n_pos, n_neg = len(a1), len(a2)
    if at_most_one_pair_each(n_pos, n_neg):
        return None
    if bool((pos_mask & neg_mask).any()):
        raise ValueError("indices_tuple names the same pair as both a positive and a negative")
    return pos_mask, neg_mask


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

    def compute_loss(self, batch: Batch) -> LossDict:
        masks = pair_masks_to_learn_from(batch)
        if masks is None:
            return self.zero_losses()
        mat = self.distance(batch.embeddings, batch.ref_emb)
        losses = multi_similarity_row_losses(
            mat, *masks, self.alpha, self.beta, self.base, self.distance
        )
        rows = torch.arange(len(losses), device=losses.device)
        return {"loss": {"losses": losses, "indices": rows, "reduction_type": "element"}}
