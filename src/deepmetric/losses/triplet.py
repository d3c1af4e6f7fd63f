"""Triplet margin loss (Schroff, Kalenichenko & Philbin, FaceNet, 2015)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from .._pairs import all_triplets, pairs_to_triplets, positive_pair_chunks, random_triplets
from ..distances import BaseDistance
from ..reducers import (
    AvgNonZeroReducer,
    BaseReducer,
    LossDict,
    LossInfo,
    SelectingReducer,
    reduces_by_selection,
)
from ._blockwise import few_pairs, pair_distances
from .base import BaseMetricLossFunction, Batch, LossOptions


def triplet_margin_losses(
    ap_dists: Tensor, an_dists: Tensor, margin: float, smooth_loss: bool, distance: BaseDistance
) -> Tensor:
    """Per-triplet losses ``relu(d(a,p) - d(a,n) + margin)`` (``softplus`` when smooth; the
    margin is measured the other way round for a similarity)."""
    violation = distance.margin(ap_dists, an_dists) + margin
    return F.softplus(violation) if smooth_loss else F.relu(violation)


class TripletMarginLoss(BaseMetricLossFunction):
    """Every anchor should be closer to its positive than to its negative by ``margin``.

    Schroff, Kalenichenko & Philbin, "FaceNet: A Unified Embedding for Face Recognition and
    Clustering", 2015. Arguments and defaults as in PML: ``margin=0.05``, ``swap=False`` (use the
    positive-negative distance when it violates the margin more; Balntas 2016),
    ``smooth_loss=False`` (softplus instead of relu), ``triplets_per_anchor="all"`` (or an
    integer: that many random triplets per anchor), ``AvgNonZeroReducer``.

    Without a miner the loss covers all ``B·(K-1)·(B-K)`` triplets, but never holds them in
    memory: they are visited one block of positive pairs at a time and the gradient with respect
    to the ``(B, R)`` distance matrix is accumulated in closed form, so memory stays ``O(B·R)``.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar.
    """

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        triplets_per_anchor: int | Literal["all"] = "all",
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        if triplets_per_anchor != "all" and not isinstance(triplets_per_anchor, int):
            raise ValueError(
                f"triplets_per_anchor must be 'all' or an int, got {triplets_per_anchor!r}"
            )
        self.margin = margin
        self.swap = swap
        self.smooth_loss = smooth_loss
        self.triplets_per_anchor = triplets_per_anchor

    def get_default_reducer(self) -> BaseReducer:
        return AvgNonZeroReducer()

    def compute_loss(self, batch: Batch) -> LossDict:
        if batch.indices_tuple is not None and not self.swap:
            a, p, n = pairs_to_triplets(batch.indices_tuple)
            if len(a) == 0:
                return self.zero_losses()
            if few_pairs(batch, 2 * len(a)):
                # a miner's few triplets (BatchHardMiner: one per anchor): their 2·T distances
                # alone, rather than the whole (B, R) matrix
                dists = pair_distances(self.distance, batch, torch.cat([a, a]), torch.cat([p, n]))
                losses = triplet_margin_losses(
                    dists[: len(a)], dists[len(a) :], self.margin, self.smooth_loss, self.distance
                )
                return {
                    "loss": {"losses": losses, "indices": (a, p, n), "reduction_type": "triplet"}
                }
            if isinstance(self.reducer, SelectingReducer) and reduces_by_selection(self.reducer):
                # a miner's many triplets: streamed, nothing per triplet kept for the backward
                mat = self.distance(batch.embeddings, batch.ref_emb)
                value = self._streamed_listed_loss(mat, a, p, n, self.reducer)
                return {
                    "loss": {"losses": value, "indices": None, "reduction_type": "already_reduced"}
                }

        mat = self.distance(batch.embeddings, batch.ref_emb)
        # distances between positives and negatives, for swap: both index the reference set
        pn_mat = mat if batch.same_source else None
        if self.swap and pn_mat is None:
            pn_mat = self.distance(batch.ref_emb)

        if batch.indices_tuple is None and self.triplets_per_anchor == "all":
            reducer = self.reducer
            if isinstance(reducer, SelectingReducer) and reduces_by_selection(reducer):
                pos_mask, neg_mask = batch.masks()
                value = self._streamed_loss(mat, pn_mat, pos_mask, neg_mask, reducer)
                info: LossInfo = {
                    "losses": value,
                    "indices": None,
                    "reduction_type": "already_reduced",
                }
                return {"loss": info}

        a, p, n = self._triplets(batch)
        if len(a) == 0:
            return self.zero_losses()
        an_dists = mat[a, n]
        if self.swap:
            assert pn_mat is not None
            an_dists = self.distance.smallest_dist(an_dists, pn_mat[p, n])
        losses = triplet_margin_losses(
            mat[a, p], an_dists, self.margin, self.smooth_loss, self.distance
        )
        return {"loss": {"losses": losses, "indices": (a, p, n), "reduction_type": "triplet"}}

    def _triplets(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        if batch.indices_tuple is not None:
            return pairs_to_triplets(batch.indices_tuple)
        pos_mask, neg_mask = batch.masks()
        if self.triplets_per_anchor == "all":
            return all_triplets(pos_mask, neg_mask)
        return random_triplets(pos_mask, neg_mask, self.triplets_per_anchor)

    def _streamed_loss(
        self,
        mat: Tensor,
        pn_mat: Tensor | None,
        pos_mask: Tensor,
        neg_mask: Tensor,
        reducer: SelectingReducer,
    ) -> Tensor:
        """The reduced loss over all triplets, one block of positive pairs at a time.

        For each block the per-triplet losses are computed without autograd; the reducer picks the
        ones that count, and ``d loss / d violation`` (1 or 0 for relu, a sigmoid for softplus) is
        scattered onto the ``(B, R)`` matrices: ``+`` at ``[a, p]``, ``-`` at ``[a, n]`` (or at
        ``[p, n]`` where swap chose the positive-negative distance). The returned tensor has the
        exact value, and a gradient equal to that of the explicit computation.
        """
        dist = mat.detach()
        pn_dist = pn_mat.detach() if (self.swap and pn_mat is not None) else None
        grad = torch.zeros_like(dist)
        grad_pn = torch.zeros_like(pn_dist) if pn_dist is not None else None
        sign = -1.0 if self.distance.is_inverted else 1.0
        total = dist.new_zeros(())
        n_selected = torch.zeros((), dtype=torch.long, device=dist.device)
        n_total = torch.zeros((), dtype=torch.long, device=dist.device)

        for anchors, positives in positive_pair_chunks(pos_mask, dist.shape[1]):
            ap = dist[anchors, positives].unsqueeze(1)  # (c, 1)
            an = dist[anchors]  # (c, R)
            use_pn = None
            if pn_dist is not None:
                pn = pn_dist[positives]  # (c, R)
                use_pn = self.distance.smallest_dist(an, pn) != an
                an = torch.where(use_pn, pn, an)
            valid = neg_mask[anchors]
            kept_sum, n_kept, slope = self._kept_losses(
                self.distance.margin(ap, an) + self.margin, reducer, valid
            )
            total += kept_sum
            n_selected += n_kept
            n_total += valid.sum()
            grad.index_put_((anchors, positives), sign * slope.sum(dim=1), accumulate=True)
            if use_pn is not None and grad_pn is not None:
                grad.index_add_(0, anchors, -sign * slope * ~use_pn)
                grad_pn.index_add_(0, positives, -sign * slope * use_pn)
            else:
                grad.index_add_(0, anchors, -sign * slope)

        surrogates = [(grad, mat)]
        if grad_pn is not None and pn_mat is not None:
            surrogates.append((grad_pn, pn_mat))
        return _reduced_with_gradient(total, n_selected, n_total, reducer, surrogates)

    def _streamed_listed_loss(
        self, mat: Tensor, a: Tensor, p: Tensor, n: Tensor, reducer: SelectingReducer
    ) -> Tensor:
        """The reduced loss over listed triplets, a chunk of them at a time, as
        :meth:`_streamed_loss` computes it over all triplets: per-triplet losses without
        autograd, ``d loss / d violation`` scattered onto the ``(B, R)`` matrix (``+`` at
        ``[a, p]``, ``-`` at ``[a, n]``). Memory: the matrix twice and one chunk, where autograd
        would keep several tensors of all ``T`` triplets for the backward pass."""
        dist = mat.detach()
        grad = torch.zeros_like(dist)
        sign = -1.0 if self.distance.is_inverted else 1.0
        total = dist.new_zeros(())
        n_selected = torch.zeros((), dtype=torch.long, device=dist.device)
        for start in range(0, len(a), _TRIPLET_CHUNK):
            part = slice(start, start + _TRIPLET_CHUNK)
            anchors, positives, negatives = a[part], p[part], n[part]
            violation = self.distance.margin(dist[anchors, positives], dist[anchors, negatives])
            kept_sum, n_kept, slope = self._kept_losses(violation + self.margin, reducer, None)
            total += kept_sum
            n_selected += n_kept
            slope.mul_(sign)
            grad.index_put_((anchors, positives), slope, accumulate=True)
            grad.index_put_((anchors, negatives), slope.neg_(), accumulate=True)
        n_total = torch.tensor(len(a), device=dist.device)
        return _reduced_with_gradient(total, n_selected, n_total, reducer, [(grad, mat)])

    def _kept_losses(
        self, violation: Tensor, reducer: SelectingReducer, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Of the triplet losses of ``violation`` (relu, or softplus when smooth): the sum and
        the number of those the reducer keeps (among the ``valid`` ones, if given), and
        ``d loss / d violation`` of each, zero where not kept."""
        losses = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        keep = reducer.select(losses)
        if valid is not None:
            keep = keep & valid
        slope = torch.sigmoid(violation) if self.smooth_loss else (violation > 0).to(losses.dtype)
        # a masked sum rather than losses[keep]: no index list (5% of a semi-hard step)
        return torch.where(keep, losses, 0).sum(), keep.sum(), slope.mul_(keep)


# Triplets of a miner's list handled at once by TripletMarginLoss's streamed path.
_TRIPLET_CHUNK = 1 << 20


def _reduced_with_gradient(
    total: Tensor,
    n_selected: Tensor,
    n_total: Tensor,
    reducer: SelectingReducer,
    surrogates: list[tuple[Tensor, Tensor]],
) -> Tensor:
    """``total / divisor`` (the reducer's rule) carrying the gradient ``Σ grad · mat / divisor``
    for each ``(grad, mat)`` of ``surrogates`` (``grad`` computed without autograd, ``mat``
    through it): the exact value with the gradient of the explicit computation. Zero with a
    zero gradient when nothing is selected."""
    mat = surrogates[0][1]
    if int(n_selected) == 0:
        return (mat * 0).sum()
    divisor = reducer.divisor(n_selected, n_total).to(mat.dtype)
    surrogate = sum((grad * m).sum() for grad, m in surrogates) / divisor
    return total / divisor + (surrogate - surrogate.detach())
