"""Margin loss (Wu, Manmatha, Smola & Krähenbühl, 2017)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from ..distances import BaseDistance
from ..pairwise import all_triplets, pairs_to_triplets, positive_pair_chunks, random_triplets
from ..reducers import (
    BaseReducer,
    DivisorReducer,
    LossDict,
    LossInfo,
    ReductionStream,
    scalar_entry,
)
from .base import BaseMetricLossFunction, Batch, LossOptions


def margin_losses(
    pos_dists: Tensor, neg_dists: Tensor, beta: Tensor, margin: float, distance: BaseDistance
) -> tuple[Tensor, Tensor]:
    """The two halves of the margin loss: ``relu(d_ap - β + margin)`` for positive pairs and
    ``relu(β - d_an + margin)`` for negative pairs (the other way round for a similarity).

    ``pos_dists``, ``neg_dists`` and ``beta`` broadcast against each other: per-triplet vectors,
    or the whole ``(B, R)`` matrix with a ``(B, 1)`` column of per-anchor betas.
    """
    pos = F.relu(distance.margin(pos_dists, beta) + margin)
    neg = F.relu(distance.margin(beta, neg_dists) + margin)
    return pos, neg


class MarginLoss(BaseMetricLossFunction):
    """Separate positive pairs from negative pairs by a learnable boundary ``beta``, with slack
    ``margin`` on both sides.

    Wu, Manmatha, Smola & Krähenbühl, "Sampling Matters in Deep Embedding Learning", 2017.
    Arguments and defaults as in PML: ``margin=0.2``, ``nu=0`` (weight of the ``nu · beta``
    regularizer, applied only with ``learn_beta``), ``beta=1.2``, ``triplets_per_anchor="all"``
    (or an integer: that many random triplets per anchor), ``learn_beta=False`` (make ``beta`` an
    ``nn.Parameter``), ``num_classes=None`` (one beta per class, picked by each anchor's label),
    :class:`DivisorReducer`.

    As in PML the loss is a sum over triplets ``(a, p, n)`` of ``pos_loss(a, p) + neg_loss(a,
    n)`` (see :func:`margin_losses`); the default reducer divides by the number of non-zero
    halves. The sub-losses are ``margin_loss`` and ``beta_reg_loss``.

    Without a miner and with ``triplets_per_anchor="all"`` the ``B·(K-1)·(B-K)`` triplets are
    never enumerated: each positive pair of anchor ``a`` occurs in ``#negatives(a)`` triplets and
    each negative pair in ``#positives(a)``, so every sum and count the reducer needs is a
    weighted sum over the ``(B, R)`` matrix (memory ``O(B·R)``, same value and gradient). This
    holds for every reducer that reduces a stream of blocks (:class:`DivisorReducer` and the
    selecting reducers: mean, sum, threshold, average-non-zero); any other reducer gets the
    explicit triplets.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar; ``beta`` is ``(1,)`` or
    ``(num_classes,)``.
    """

    beta: Tensor

    def __init__(
        self,
        margin: float = 0.2,
        nu: float = 0,
        beta: float = 1.2,
        triplets_per_anchor: int | Literal["all"] = "all",
        learn_beta: bool = False,
        num_classes: int | None = None,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        if triplets_per_anchor != "all" and not isinstance(triplets_per_anchor, int):
            raise ValueError(
                f"triplets_per_anchor must be 'all' or an int, got {triplets_per_anchor!r}"
            )
        if num_classes is not None and num_classes < 0:
            raise ValueError(f"num_classes must be positive or None, got {num_classes}")
        self.margin = margin
        self.nu = nu
        self.learn_beta = learn_beta
        self.triplets_per_anchor = triplets_per_anchor
        # as in PML, num_classes=0 means a single beta
        initial = torch.full((num_classes or 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(initial)
        else:
            self.register_buffer("beta", initial, persistent=False)

    def get_default_reducer(self) -> BaseReducer:
        return DivisorReducer()

    def compute_loss(self, batch: Batch) -> LossDict:
        mat = self.distance(batch.embeddings, batch.ref_emb)
        betas = self._anchor_betas(batch, mat.dtype)
        if batch.indices_tuple is None and self.triplets_per_anchor == "all":
            # a reducer that reduces blocks of losses: the triplets are counted, never listed
            margin_stream = self.reducer.stream("margin_loss", batch.embeddings)
            reg_stream = self.reducer.stream("beta_reg_loss", batch.embeddings)
            if margin_stream is not None and reg_stream is not None:
                pos_mask, neg_mask = batch.masks()
                return self._all_triplets_loss(
                    mat, betas, pos_mask, neg_mask, margin_stream, reg_stream
                )
        return self._explicit_triplets_loss(mat, betas, batch)

    # -- the per-anchor beta ----------------------------------------------------------------------
    def _anchor_betas(self, batch: Batch, dtype: torch.dtype) -> Tensor:
        """``(B,)``: the beta of each query (its class's, with ``num_classes``)."""
        beta = self.beta.to(dtype)
        if len(beta) == 1:
            return beta.expand(len(batch.embeddings))
        labels = batch.labels
        if labels is None:
            raise ValueError("MarginLoss with num_classes needs labels to pick each anchor's beta")
        if len(labels) > 0 and (int(labels.min()) < 0 or int(labels.max()) >= len(beta)):
            raise ValueError(
                f"labels must be in [0, num_classes={len(beta)}) to index the per-class betas"
            )
        return beta[labels]

    # -- explicit triplets (a miner's tuple, random triplets, other reducers) ---------------------
    def _explicit_triplets_loss(self, mat: Tensor, betas: Tensor, batch: Batch) -> LossDict:
        a, p, n = self._triplets(batch)
        if len(a) == 0:
            return self.zero_losses("margin_loss", "beta_reg_loss")
        beta = betas[a]
        pos, neg = margin_losses(mat[a, p], mat[a, n], beta, self.margin, self.distance)
        divisor = (pos > 0).sum() + (neg > 0).sum()
        margin_info: LossInfo = {
            "losses": pos + neg,
            "indices": (a, p, n),
            "reduction_type": "triplet",
            "divisor": divisor,
        }
        return {"margin_loss": margin_info, "beta_reg_loss": self._reg_info(beta, a, divisor)}

    def _triplets(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        if batch.indices_tuple is not None:
            return pairs_to_triplets(batch.indices_tuple)
        pos_mask, neg_mask = batch.masks()
        if self.triplets_per_anchor == "all":
            return all_triplets(pos_mask, neg_mask)
        return random_triplets(pos_mask, neg_mask, self.triplets_per_anchor)

    def _reg_info(self, beta: Tensor, anchors: Tensor, divisor: Tensor) -> LossInfo:
        """PML's ``beta_reg_loss`` entry: ``nu · beta`` once for a single beta, else per triplet."""
        if not self.learn_beta:
            return scalar_entry(0.0)
        if len(self.beta) == 1:
            single = self.beta.to(beta.dtype) * self.nu  # (1,)
            return scalar_entry(single)
        info: LossInfo = {
            "losses": beta * self.nu,
            "indices": anchors,
            "reduction_type": "element",
            "divisor": divisor,
        }
        return info

    # -- all triplets, reduced from the (B, R) matrix -------------------------------------------
    def _all_triplets_loss(
        self,
        mat: Tensor,
        betas: Tensor,
        pos_mask: Tensor,
        neg_mask: Tensor,
        margin_stream: ReductionStream,
        reg_stream: ReductionStream,
    ) -> LossDict:
        """Every triplet of the masks, added to the streams from per-pair weights.

        Triplet ``(a, p, n)`` has loss ``pos[a, p] + neg[a, n]``. Its sum over the triplets a
        stream keeps is ``Σ c_pos · pos + Σ c_neg · neg`` over the matrix, where ``c_pos[a, p]``
        counts the kept triplets that contain the positive pair ``(a, p)`` and ``c_neg[a, n]``
        those that contain the negative pair. The counts are constants, so autograd gives the
        same gradient as the explicit sum. A stream that keeps every loss needs no counting:
        each positive pair of anchor ``a`` is in ``#negatives(a)`` triplets and each negative
        pair in ``#positives(a)``; otherwise the triplets are visited one block of positive
        pairs at a time (:func:`kept_triplet_counts`). The divisor stated to the streams is
        PML's: the number of non-zero halves of all triplets.
        """
        n_pos = pos_mask.sum(dim=1)
        n_neg = neg_mask.sum(dim=1)
        triplets_per_anchor = n_pos * n_neg  # (B,)
        n_triplets = triplets_per_anchor.sum()
        if int(n_triplets) == 0:
            return self.zero_losses("margin_loss", "beta_reg_loss")
        pos, neg = margin_losses(mat, mat, betas.unsqueeze(1), self.margin, self.distance)
        pos_count = pos_mask * n_neg.unsqueeze(1)
        neg_count = neg_mask * n_pos.unsqueeze(1)
        divisor = (pos_count * (pos > 0)).sum() + (neg_count * (neg > 0)).sum()
        n_kept = n_triplets
        if margin_stream.keep(pos.detach()) is not None:  # it keeps triplets by their loss
            pos_count, neg_count, n_kept = kept_triplet_counts(
                pos.detach(), neg.detach(), pos_mask, neg_mask, margin_stream
            )
        kept_sum = (pos_count.to(mat.dtype) * pos).sum() + (neg_count.to(mat.dtype) * neg).sum()
        margin_stream.add(kept_sum, n_kept, n_triplets)
        margin_stream.divide_by(divisor)
        return {
            "margin_loss": margin_stream,
            "beta_reg_loss": self._all_triplets_reg(
                betas, triplets_per_anchor, divisor, reg_stream
            ),
        }

    def _all_triplets_reg(
        self,
        betas: Tensor,
        triplets_per_anchor: Tensor,
        margin_divisor: Tensor,
        stream: ReductionStream,
    ) -> LossInfo | ReductionStream:
        """``beta_reg_loss`` over all triplets: each anchor's ``nu · beta`` counted once per
        triplet it anchors, reduced as the explicit per-triplet entry would be."""
        if not self.learn_beta or len(self.beta) == 1:
            return self._reg_info(betas, betas, margin_divisor)
        stream.add_losses(betas * self.nu, counts=triplets_per_anchor)
        stream.divide_by(margin_divisor)
        return stream


def kept_triplet_counts(
    pos: Tensor, neg: Tensor, pos_mask: Tensor, neg_mask: Tensor, stream: ReductionStream
) -> tuple[Tensor, Tensor, Tensor]:
    """For the triplet losses ``pos[a, p] + neg[a, n]`` (``pos_mask[a, p]``, ``neg_mask[a, n]``)
    that ``stream`` keeps (:meth:`~deepmetric.reducers.ReductionStream.keep`): how many contain
    each positive pair, how many each negative pair, and how many there are. The triplets are
    visited one block of positive pairs at a time (memory ``O(B·R)``).

    Shapes: ``(B, R)`` each -> ``(B, R)``, ``(B, R)`` int64 counts and a scalar.
    """
    pos_count = torch.zeros(pos.shape, dtype=torch.long, device=pos.device)
    neg_count = torch.zeros_like(pos_count)
    for anchors, positives in positive_pair_chunks(pos_mask, pos.shape[1]):
        losses = pos[anchors, positives].unsqueeze(1) + neg[anchors]  # (c, R)
        keep = stream.keep(losses)
        valid = neg_mask[anchors]
        keep = valid if keep is None else keep & valid
        pos_count[anchors, positives] = keep.sum(dim=1)
        neg_count.index_add_(0, anchors, keep.long())
    return pos_count, neg_count, pos_count.sum()
