"""Triplet margin loss (Schroff, Kalenichenko & Philbin, FaceNet, 2015)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance
from ..pairwise import (
    all_triplets,
    few_pairs,
    pair_distances,
    pairs_to_triplets,
    positive_pair_chunks,
    random_triplets,
)
from ..reducers import AvgNonZeroReducer, BaseReducer, LossDict, ReductionStream
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
        # a reducer that reduces blocks of losses: the triplets are streamed, never listed
        stream = self.reducer.stream("loss", batch.embeddings)
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
            if stream is not None:
                # a miner's many triplets: nothing per triplet kept for the backward
                mat = self.distance(batch.embeddings, batch.ref_emb)
                self._stream_listed_triplets(mat, a, p, n, stream)
                return {"loss": stream}

        mat = self.distance(batch.embeddings, batch.ref_emb)
        # distances between positives and negatives, for swap: both index the reference set
        pn_mat = mat if batch.same_source else None
        if self.swap and pn_mat is None:
            pn_mat = self.distance(batch.ref_emb)

        if batch.indices_tuple is None and self.triplets_per_anchor == "all" and stream is not None:
            pos_mask, neg_mask = batch.masks()
            self._stream_all_triplets(mat, pn_mat, pos_mask, neg_mask, stream)
            return {"loss": stream}

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

    def _stream_all_triplets(
        self,
        mat: Tensor,
        pn_mat: Tensor | None,
        pos_mask: Tensor,
        neg_mask: Tensor,
        stream: ReductionStream,
    ) -> None:
        """Add every triplet's loss to ``stream``, one block of positive pairs at a time.

        For each block the per-triplet losses are computed without autograd; the stream keeps
        the ones that count, and ``d loss / d violation`` (1 or 0 for relu, a sigmoid for
        softplus) is scattered onto the ``(B, R)`` matrices: ``+`` at ``[a, p]``, ``-`` at
        ``[a, n]`` (or at ``[p, n]`` where swap chose the positive-negative distance). The
        stream carries that gradient: the explicit computation's.
        """
        dist = mat.detach()
        pn_dist = pn_mat.detach() if (self.swap and pn_mat is not None) else None
        grad = torch.zeros_like(dist)
        grad_pn = torch.zeros_like(pn_dist) if pn_dist is not None else None
        sign = -1.0 if self.distance.is_inverted else 1.0
        for anchors, positives in positive_pair_chunks(pos_mask, dist.shape[1]):
            ap = dist[anchors, positives].unsqueeze(1)  # (c, 1)
            an = dist[anchors]  # (c, R)
            use_pn = None
            if pn_dist is not None:
                pn = pn_dist[positives]  # (c, R)
                use_pn = self.distance.smallest_dist(an, pn) != an
                an = torch.where(use_pn, pn, an)
            slope = self._kept_slope(
                self.distance.margin(ap, an) + self.margin, stream, neg_mask[anchors]
            )
            grad.index_put_((anchors, positives), sign * slope.sum(dim=1), accumulate=True)
            if use_pn is not None and grad_pn is not None:
                grad.index_add_(0, anchors, -sign * slope * ~use_pn)
                grad_pn.index_add_(0, positives, -sign * slope * use_pn)
            else:
                grad.index_add_(0, anchors, -sign * slope)

        stream.carry((grad * mat).sum())
        if grad_pn is not None and pn_mat is not None:
            stream.carry((grad_pn * pn_mat).sum())

    def _stream_listed_triplets(
        self, mat: Tensor, a: Tensor, p: Tensor, n: Tensor, stream: ReductionStream
    ) -> None:
        """Add the listed triplets' losses to ``stream``, a chunk of them at a time, as
        :meth:`_stream_all_triplets` adds all triplets: per-triplet losses without autograd,
        ``d loss / d violation`` scattered onto the ``(B, R)`` matrix (``+`` at ``[a, p]``,
        ``-`` at ``[a, n]``). Memory: the matrix twice and one chunk, where autograd would keep
        several tensors of all ``T`` triplets for the backward pass."""
        dist = mat.detach()
        grad = torch.zeros_like(dist)
        sign = -1.0 if self.distance.is_inverted else 1.0
        for start in range(0, len(a), _TRIPLET_CHUNK):
            part = slice(start, start + _TRIPLET_CHUNK)
            anchors, positives, negatives = a[part], p[part], n[part]
            violation = self.distance.margin(dist[anchors, positives], dist[anchors, negatives])
            slope = self._kept_slope(violation + self.margin, stream, None)
            slope.mul_(sign)
            grad.index_put_((anchors, positives), slope, accumulate=True)
            grad.index_put_((anchors, negatives), slope.neg_(), accumulate=True)
        stream.carry((grad * mat).sum())

    def _kept_slope(
        self, violation: Tensor, stream: ReductionStream, valid: Tensor | None
    ) -> Tensor:
        """Add the triplet losses of ``violation`` (relu, or softplus when smooth; the
        ``valid`` ones, if given) to ``stream``; return ``d loss / d violation`` of each, zero
        where the stream does not keep it."""
        losses = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        keep = stream.add_losses(losses, valid)
        slope = torch.sigmoid(violation) if self.smooth_loss else (violation > 0).to(losses.dtype)
        return slope if keep is None else slope.mul_(keep)


# Triplets of a miner's list handled at once by TripletMarginLoss's streamed path.
_TRIPLET_CHUNK = 1 << 20
