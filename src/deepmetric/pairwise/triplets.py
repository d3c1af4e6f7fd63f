"""Triplet losses over a batch: which triplets, and how their losses and gradient are computed.

A triplet loss is a term rule ``(d(a, p), d(a, n)) -> (losses, ∂loss/∂d(a, p))`` (with
``∂loss/∂d(a, n) = -∂loss/∂d(a, p)``, e.g. :func:`deepmetric.functional.triplet_margin`)
over the triplets of a batch: all of its labels' triplets, a number per anchor, or a miner's.
:func:`triplet_losses` picks the computation:

* a miner's few triplets: their ``2 T`` distances alone, without the matrix
  (:func:`pair_distances`);
* every triplet of the labels, or a miner's many, with a reducer that reduces a stream of
  blocks: the triplets are visited a block at a time and never listed, and the gradient is
  scattered onto the ``(B, R)`` matrix (memory ``O(B·R)`` for ``B·(K-1)·(B-K)`` triplets);
* otherwise the triplets listed, and their losses handed to the reducer whole.

A *separable* triplet loss, ``pos(a, p) + neg(a, n)`` (e.g. the margin loss), is computed over
all the triplets of the labels without visiting them (:func:`separable_triplet_losses`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ..distances import BaseDistance
from ..reducers import LossInfo, ReductionStream
from .batch import Batch
from .gradients import elementwise_terms
from .listed import few_pairs, pair_distances
from .masks import (
    all_triplets,
    pairs_to_triplets,
    positive_pair_chunks,
    random_triplets,
)

HalvesRule = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(d(a, p), d(a, n), a)`` -> the two halves of a separable triplet loss (autograd); ``a``
indexes the anchors, broadcasting like the distances."""

TripletRule = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(d(a, p), d(a, n))`` -> ``(losses, ∂loss/∂d(a, p))``; ``∂loss/∂d(a, n)`` is its negative."""

# Triplets of a miner's list streamed at once (their losses and gradient, a chunk at a time).
_TRIPLET_CHUNK = 1 << 20


def triplet_losses(
    batch: Batch,
    distance: BaseDistance,
    rule: TripletRule,
    stream: ReductionStream | None,
    swap: bool = False,
    triplets_per_anchor: int | Literal["all"] = "all",
) -> LossInfo | ReductionStream | None:
    """The losses of ``rule`` over the triplets of ``batch``: a miner's tuple
    (``batch.indices_tuple``, pairs joined on their anchor), or else every triplet of the labels
    (``triplets_per_anchor="all"``) or that many random ones per anchor.

    ``stream`` is the reducer's stream for these losses (``None`` when the reducer needs them
    whole). With ``swap`` the anchor-negative distance is replaced by the positive-negative one
    where that is closer (Balntas et al., 2016).

    Returns the stream, fed; or a ``"triplet"`` loss-dict entry of the listed losses; or
    ``None`` when there is no triplet.
    """
    if batch.indices_tuple is not None and not swap:
        a, p, n = pairs_to_triplets(batch.indices_tuple)
        if len(a) == 0:
            return None
        if few_pairs(batch, 2 * len(a)):
            # a miner's few triplets (BatchHardMiner: one per anchor): their 2·T distances
            # alone, rather than the whole (B, R) matrix
            dists = pair_distances(distance, batch, torch.cat([a, a]), torch.cat([p, n]))
            losses = _listed(rule, dists[: len(a)], dists[len(a) :])
            return {"losses": losses, "indices": (a, p, n), "reduction_type": "triplet"}
        if stream is not None:
            mat = distance(batch.embeddings, batch.ref_emb)
            _stream_listed_triplets(mat, a, p, n, rule, stream)
            return stream

    mat = distance(batch.embeddings, batch.ref_emb)
    # distances between positives and negatives, for swap: both index the reference set
    pn_mat = mat if batch.same_source else None
    if swap and pn_mat is None:
        pn_mat = distance(batch.ref_emb)
    pn_mat = pn_mat if swap else None

    if batch.indices_tuple is None and triplets_per_anchor == "all" and stream is not None:
        _stream_all_triplets(mat, pn_mat, *batch.masks(), distance, rule, stream)
        return stream

    a, p, n = _listed_triplets(batch, triplets_per_anchor)
    if len(a) == 0:
        return None
    an = mat[a, n]
    if pn_mat is not None:
        an = distance.smallest_dist(an, pn_mat[p, n])
    losses = _listed(rule, mat[a, p], an)
    return {"losses": losses, "indices": (a, p, n), "reduction_type": "triplet"}


def _listed(rule: TripletRule, ap: Tensor, an: Tensor) -> Tensor:
    """``(T,)`` losses of listed triplets, with the gradient ``rule`` states reaching the
    distances' graphs (``∂loss/∂d(a, n) = -∂loss/∂d(a, p)``)."""
    return elementwise_terms(rule, (ap, an), (1.0, -1.0))


def _listed_triplets(
    batch: Batch, triplets_per_anchor: int | Literal["all"]
) -> tuple[Tensor, Tensor, Tensor]:
    if batch.indices_tuple is not None:
        return pairs_to_triplets(batch.indices_tuple)
    pos_mask, neg_mask = batch.masks()
    if triplets_per_anchor == "all":
        return all_triplets(pos_mask, neg_mask)
    return random_triplets(pos_mask, neg_mask, triplets_per_anchor)


def _stream_all_triplets(
    mat: Tensor,
    pn_mat: Tensor | None,
    pos_mask: Tensor,
    neg_mask: Tensor,
    distance: BaseDistance,
    rule: TripletRule,
    stream: ReductionStream,
) -> None:
    """Add every triplet's loss to ``stream``, one block of positive pairs at a time.

    For each block the per-triplet losses are computed without autograd; the stream keeps the
    ones that count, and their gradient is scattered onto the ``(B, R)`` matrices: ``∂loss/∂d``
    at ``[a, p]``, its negative at ``[a, n]`` (or at ``[p, n]`` where swap chose the
    positive-negative distance). The stream carries that gradient.
    """
    dist = mat.detach()
    pn_dist = None if pn_mat is None else pn_mat.detach()
    grad = torch.zeros_like(dist)
    grad_pn = None if pn_dist is None else torch.zeros_like(pn_dist)
    for anchors, positives in positive_pair_chunks(pos_mask, dist.shape[1]):
        ap = dist[anchors, positives].unsqueeze(1)  # (c, 1)
        an = dist[anchors]  # (c, R)
        use_pn = None
        if pn_dist is not None:
            pn = pn_dist[positives]  # (c, R)
            use_pn = distance.smallest_dist(an, pn) != an
            an = torch.where(use_pn, pn, an)
        losses, grad_ap = rule(ap, an)
        keep = stream.add_losses(losses, neg_mask[anchors])
        if keep is not None:
            grad_ap.mul_(keep)
        grad.index_put_((anchors, positives), grad_ap.sum(dim=1), accumulate=True)
        if use_pn is not None and grad_pn is not None:
            grad.index_add_(0, anchors, grad_ap * ~use_pn, alpha=-1)
            grad_pn.index_add_(0, positives, grad_ap.mul_(use_pn), alpha=-1)
        else:
            grad.index_add_(0, anchors, grad_ap, alpha=-1)
    stream.carry((grad * mat).sum())
    if grad_pn is not None and pn_mat is not None:
        stream.carry((grad_pn * pn_mat).sum())


def _stream_listed_triplets(
    mat: Tensor, a: Tensor, p: Tensor, n: Tensor, rule: TripletRule, stream: ReductionStream
) -> None:
    """Add the listed triplets' losses to ``stream``, a chunk of them at a time, as
    :func:`_stream_all_triplets` adds all triplets. Memory: the matrix twice and one chunk,
    where autograd would keep several tensors of all ``T`` triplets for the backward pass."""
    dist = mat.detach()
    grad = torch.zeros_like(dist)
    for start in range(0, len(a), _TRIPLET_CHUNK):
        part = slice(start, start + _TRIPLET_CHUNK)
        anchors, positives, negatives = a[part], p[part], n[part]
        losses, grad_ap = rule(dist[anchors, positives], dist[anchors, negatives])
        keep = stream.add_losses(losses)
        if keep is not None:
            grad_ap.mul_(keep)
        grad.index_put_((anchors, positives), grad_ap, accumulate=True)
        grad.index_put_((anchors, negatives), grad_ap.neg_(), accumulate=True)
    stream.carry((grad * mat).sum())


class SeparableTriplets(NamedTuple):
    """What :func:`separable_triplet_losses` computed.

    ``losses``: the stream, fed with the sum of the kept triplets; or the ``"triplet"`` entry
    of the listed triplets' losses. ``nonzero_halves``: how many halves of all the triplets
    are non-zero (PML's divisor for the margin loss). ``anchors``: the listed triplets'
    ``(T,)`` anchors (``None`` when streamed); ``triplets_per_anchor``: the ``(B,)`` number of
    triplets of each anchor (``None`` when listed).
    """

    losses: LossInfo | ReductionStream
    nonzero_halves: Tensor
    anchors: Tensor | None
    triplets_per_anchor: Tensor | None


def separable_triplet_losses(
    batch: Batch,
    distance: BaseDistance,
    halves: HalvesRule,
    stream: ReductionStream | None,
    triplets_per_anchor: int | Literal["all"] = "all",
) -> SeparableTriplets | None:
    """The losses ``pos(a, p) + neg(a, n)`` of ``halves`` over the triplets of ``batch`` (a
    miner's tuple, else all of the labels' triplets or that many random ones per anchor);
    ``None`` when there is none.

    Over all the labels' triplets, with a reducer that reduces a stream (``stream``), the
    ``B·(K-1)·(B-K)`` triplets are never enumerated: triplet ``(a, p, n)`` has loss
    ``pos[a, p] + neg[a, n]``, so the sum of the triplets the stream keeps is
    ``Σ c_pos · pos + Σ c_neg · neg`` over the ``(B, R)`` matrix, where ``c_pos[a, p]`` counts
    the kept triplets that contain the positive pair ``(a, p)`` and ``c_neg[a, n]`` those that
    contain the negative pair. The counts are constants, so autograd gives the gradient of the
    explicit sum. A stream that keeps every loss needs no counting (each positive pair of ``a``
    is in ``#negatives(a)`` triplets, each negative pair in ``#positives(a)``); otherwise the
    triplets are visited one block of positive pairs at a time (:func:`kept_triplet_counts`).
    Memory ``O(B·R)``.
    """
    mat = distance(batch.embeddings, batch.ref_emb)
    if batch.indices_tuple is None and triplets_per_anchor == "all" and stream is not None:
        pos_mask, neg_mask = batch.masks()
        n_pos, n_neg = pos_mask.sum(dim=1), neg_mask.sum(dim=1)
        per_anchor = n_pos * n_neg  # (B,)
        n_triplets = per_anchor.sum()
        if int(n_triplets) == 0:
            return None
        anchors = torch.arange(len(mat), device=mat.device).unsqueeze(1)  # (B, 1)
        pos, neg = halves(mat, mat, anchors)
        pos_count = pos_mask * n_neg.unsqueeze(1)
        neg_count = neg_mask * n_pos.unsqueeze(1)
        nonzero = (pos_count * (pos > 0)).sum() + (neg_count * (neg > 0)).sum()
        n_kept = n_triplets
        if stream.keep(pos.detach()) is not None:  # it keeps triplets by their loss
            pos_count, neg_count, n_kept = kept_triplet_counts(
                pos.detach(), neg.detach(), pos_mask, neg_mask, stream
            )
        kept_sum = (pos_count.to(mat.dtype) * pos).sum() + (neg_count.to(mat.dtype) * neg).sum()
        stream.add(kept_sum, n_kept, n_triplets)
        return SeparableTriplets(stream, nonzero, None, per_anchor)

    a, p, n = _listed_triplets(batch, triplets_per_anchor)
    if len(a) == 0:
        return None
    pos, neg = halves(mat[a, p], mat[a, n], a)
    nonzero = (pos > 0).sum() + (neg > 0).sum()
    info: LossInfo = {"losses": pos + neg, "indices": (a, p, n), "reduction_type": "triplet"}
    return SeparableTriplets(info, nonzero, a, None)


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
