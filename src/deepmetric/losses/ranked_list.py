"""Ranked list loss (Wang, Hua, Kodirov, Hu, Garnier & Robertson, 2019)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from typing_extensions import Unpack

from ..pairwise import PairBlocks, RowBlock, blockwise_row_losses
from ..reducers import LossDict
from .base import BaseMetricLossFunction, Batch, LossOptions

# PML adds this to the weight of every column of a row before summing the weights.
_WEIGHT_EPS = 1e-5


def ranked_list_row_losses(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    margin: float,
    alpha: float,
    imbalance: float,
    Tp: float,
    Tn: float,
) -> Tensor:
    """Per-query ranked list losses.

    A positive ``d_ip`` is active when ``d_ip > α - margin`` and a negative ``d_in`` when
    ``d_in < α``; as in PML, only entries with ``d > 0`` count (the matrix is read as raw
    numbers, also for a similarity). With the weights ``w_p = exp(Tp (d_ip - (α - margin)))`` and
    ``w_n = exp(Tn (α - d_in))`` (differentiated through, as in PML)::

        L_P = Σ_active w_p (d_ip - (α - margin)) / (Σ_active w_p + R·1e-5)
        L_N = Σ_active w_n (α - d_in)            / (Σ_active w_n + R·1e-5)
        loss_i = (1 - imbalance) L_P + imbalance L_N

    Args:
        mat: ``(B, R)`` distance matrix.
        pos_mask, neg_mask: boolean ``(B, R)`` masks of the positive and negative pairs.
        margin, alpha, imbalance, Tp, Tn: as in :class:`RankedListLoss`.

    Returns:
        ``(B,)`` losses.
    """
    positive_bound = alpha - margin
    pos_active = pos_mask & (mat > positive_bound) & (mat > 0)
    neg_active = neg_mask & (mat < alpha) & (mat > 0)
    # violations, zero outside the active sets (so exp below never sees an inactive entry)
    pos_violation = torch.where(pos_active, mat - positive_bound, torch.zeros_like(mat))
    neg_violation = torch.where(neg_active, alpha - mat, torch.zeros_like(mat))
    pos_weight = torch.exp(Tp * pos_violation) * pos_active
    neg_weight = torch.exp(Tn * neg_violation) * neg_active
    eps_sum = _WEIGHT_EPS * mat.shape[1]
    loss_p = (pos_weight * pos_violation).sum(dim=1) / (pos_weight.sum(dim=1) + eps_sum)
    loss_n = (neg_weight * neg_violation).sum(dim=1) / (neg_weight.sum(dim=1) + eps_sum)
    return (1 - imbalance) * loss_p + imbalance * loss_n


def ranked_list_row_losses_and_grad(
    block: RowBlock, margin: float, alpha: float, imbalance: float, Tp: float, Tn: float
) -> tuple[Tensor, Tensor]:
    """The losses of :func:`ranked_list_row_losses` for the rows of ``block`` and, in closed
    form, their gradient with respect to ``block.mat``. For one part (positives or negatives) of
    a row, with violations ``v``, weights ``w = exp(T v)`` and ``L = Σ w v / Z``,
    ``Z = Σ w + R·1e-5``: ``∂L/∂v_j = w_j (T v_j + 1 - T L) / Z`` at the active entries (and
    ``∂v/∂d`` is ``+1`` for a positive, ``-1`` for a negative).

    Shapes: ``block.mat`` ``(c, R)`` -> ``(c,)`` losses, ``(c, R)`` gradient.
    """
    mat, rows, cols = block.mat, block.pos_rows, block.pos_cols
    eps_sum = _WEIGHT_EPS * mat.shape[1]
    # negatives, dense: active (1.0) where 0 < d < alpha; v = alpha - d there, 0 elsewhere
    neg_violation = alpha - mat
    neg_active = neg_violation.sign().clamp_min_(0).mul_(mat.sign().clamp_min_(0))
    block.fill_non_negatives_(neg_active, 0.0)
    neg_violation.mul_(neg_active)
    neg_weight = torch.mul(neg_violation, Tn).exp_().mul_(neg_active)
    neg_norm = neg_weight.sum(dim=1) + eps_sum
    loss_n = (neg_weight * neg_violation).sum(dim=1) / neg_norm
    # ∂L_N/∂d = -w (Tn v + 1 - Tn L_N) / Z, built in the buffers of v and w
    factor = neg_violation.mul_(Tn).add_((1 - Tn * loss_n).unsqueeze(1))
    grad = neg_weight.mul_(factor).mul_((-imbalance / neg_norm).unsqueeze(1))
    # positives, a list: v = d - (alpha - margin) where active
    positive_bound = alpha - margin
    pos_dist = mat[rows, cols]
    pos_active = (pos_dist > positive_bound) & (pos_dist > 0)
    pos_violation = torch.where(pos_active, pos_dist - positive_bound, 0.0)
    pos_weight = torch.exp(Tp * pos_violation) * pos_active
    pos_norm = torch.zeros_like(loss_n).index_add_(0, rows, pos_weight) + eps_sum
    loss_p = torch.zeros_like(loss_n).index_add_(0, rows, pos_weight * pos_violation) / pos_norm
    pos_factor = Tp * pos_violation + (1 - Tp * loss_p)[rows]
    grad[rows, cols] = (1 - imbalance) * pos_weight * pos_factor / pos_norm[rows]
    return (1 - imbalance) * loss_p + imbalance * loss_n, grad


class RankedListLoss(BaseMetricLossFunction):
    """Push every query's negatives beyond ``alpha`` and pull its positives within
    ``alpha - margin``, weighting the violating pairs by how badly they rank.

    Wang et al., "Ranked List Loss for Deep Metric Learning", 2019. Arguments and defaults as in
    PML: ``margin`` and ``Tn`` are required, ``imbalance=0.5`` (weight of the negative part),
    ``alpha=None`` (then ``1 + margin / 2``), ``Tp=0`` (temperatures of the positive and negative
    weights; ``Tp=0`` is RLL-Simpler), ``LpDistance``, ``MeanReducer`` over the queries (see
    :func:`ranked_list_row_losses`).

    PML refuses ``indices_tuple`` and ``ref_emb``; here a miner's pairs (or triplets, as pairs)
    restrict the positive and negative sets, and ``ref_emb``/``ref_labels`` supply the ranked
    list.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(
        self,
        margin: float,
        Tn: float,
        imbalance: float = 0.5,
        alpha: float | None = None,
        Tp: float = 0,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        if not 0 <= imbalance <= 1:
            raise ValueError(f"imbalance must be between 0 and 1, got {imbalance}")
        if Tp > 5 or Tn > 5:
            warnings.warn(
                "Values of Tp or Tn are too high. Too large temperature values may lead to "
                "overflow.",
                stacklevel=2,
            )
        self.margin = margin
        self.Tn = Tn
        self.imbalance = imbalance
        self.alpha = 1 + margin / 2 if alpha is None else alpha
        self.Tp = Tp

    def compute_loss(self, batch: Batch) -> LossDict:
        losses = blockwise_row_losses(batch, self.distance, self._row_rule, PairBlocks(batch))
        if losses is None:  # a distance the blockwise path does not compute
            mat = self.distance(batch.embeddings, batch.ref_emb)
            pos_mask, neg_mask = batch.masks()
            losses = ranked_list_row_losses(
                mat, pos_mask, neg_mask, self.margin, self.alpha, self.imbalance, self.Tp, self.Tn
            )
        rows = torch.arange(len(losses), device=losses.device)
        return {"loss": {"losses": losses, "indices": rows, "reduction_type": "element"}}

    def _row_rule(self, block: RowBlock) -> tuple[Tensor, Tensor]:
        return ranked_list_row_losses_and_grad(
            block, self.margin, self.alpha, self.imbalance, self.Tp, self.Tn
        )
