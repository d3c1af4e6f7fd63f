"""Pair losses over a batch: a loss for each positive pair and for each negative pair, each
half reduced on its own, and how they are computed.

A pair loss is two term rules ``d -> (losses, ∂loss/∂d)``, one for the positive pairs and one
for the negatives (e.g. :func:`deepmetric.functional.contrastive_pairs`), whose negative half is
a hinge: zero loss and zero gradient for a negative pair not closer than ``neg_margin``.
:func:`pair_losses` picks the computation:

* every pair of the labels, with a reducer that reduces a stream of blocks: for a distance the
  engine fuses, one block of rows (or square tile) of the matrix at a time, the negatives
  inside the margin found before any square root and, when they are few, handled as a list;
  the gradient of each half is built while the block is at hand (nothing of size ``(B, R)``
  outlives a block). For any other distance, the whole matrix with its masks;
* a miner's pairs: their distances one by one when they are few (:func:`pair_distances`),
  else read off the matrix; and the pairs of the labels for a reducer that needs the losses
  whole: both listed, handed to the reducer whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..distances import BaseDistance
from ..reducers import LossInfo, ReductionStream
from .batch import Batch
from .blocks import PairBlocks, RowBlock
from .gradients import (
    add_block_embedding_grads_,
    add_pair_embedding_grads_,
    elementwise_terms,
    embedding_weight_,
    first_order_only,
)
from .listed import few_pairs, pair_distances
from .masks import at_most_one_pair_each, pairs_from_masks, to_pairs
from .matrix import (
    MatrixBlocks,
    MatrixKind,
    closer_than,
    distances_,
    full_precision,
    fused_matrix_kind,
    normalized_inputs,
)

PairRule = Callable[[Tensor], tuple[Tensor, Tensor]]
"""Distances of pairs (any shape) -> ``(losses, ∂loss/∂d)``, both of that shape."""

Entry = LossInfo | ReductionStream


class PairLoss(NamedTuple):
    """The two halves of a pair loss: term rules, and the hinge of the negative one."""

    pos_rule: PairRule
    neg_rule: PairRule
    neg_margin: float


def pair_losses(
    batch: Batch,
    distance: BaseDistance,
    loss: PairLoss,
    streams: tuple[ReductionStream | None, ReductionStream | None],
) -> tuple[Entry, Entry] | None:
    """The losses of ``loss``'s rules over the positive and the negative pairs of ``batch`` (a
    miner's pairs, or triplets read as pairs, when ``batch.indices_tuple`` is given; else those
    of the labels).

    ``streams`` are the reducer's streams for the two halves (``None`` when the reducer needs
    the losses whole). Returns the positive and the negative entry of the loss dict (``"pos_pair"``
    and ``"neg_pair"`` losses, or the streams, fed); ``None`` when there is nothing to learn
    from (PML's rule: at most one positive and at most one negative pair).
    """
    pos_stream, neg_stream = streams
    if batch.indices_tuple is None and pos_stream is not None and neg_stream is not None:
        return _streamed_pairs(batch, distance, loss, pos_stream, neg_stream)
    if batch.indices_tuple is None:
        mat = distance(batch.embeddings, batch.ref_emb)
        a1, p, a2, n = pairs_from_masks(*batch.masks())
        pos_dists, neg_dists = mat[a1, p], mat[a2, n]
    else:
        a1, p, a2, n = to_pairs(batch.indices_tuple)
        pos_dists, neg_dists = _listed_pair_distances(batch, distance, a1, p, a2, n)
    if at_most_one_pair_each(len(a1), len(a2)):
        return None
    pos: LossInfo = {
        "losses": _listed(loss.pos_rule, pos_dists),
        "indices": (a1, p),
        "reduction_type": "pos_pair",
    }
    neg: LossInfo = {
        "losses": _listed(loss.neg_rule, neg_dists),
        "indices": (a2, n),
        "reduction_type": "neg_pair",
    }
    return pos, neg


def _listed(rule: PairRule, dists: Tensor) -> Tensor:
    """The losses of listed pairs, with the gradient ``rule`` states reaching their
    distances' graph."""
    return elementwise_terms(rule, (dists,), (1.0,))


def _listed_pair_distances(
    batch: Batch, distance: BaseDistance, a1: Tensor, p: Tensor, a2: Tensor, n: Tensor
) -> tuple[Tensor, Tensor]:
    """The distances of a miner's positive and negative pairs: one by one when there are few of
    them (:func:`few_pairs`), else read off the whole matrix."""
    if few_pairs(batch, len(a1) + len(a2)):
        dists = pair_distances(distance, batch, torch.cat([a1, a2]), torch.cat([p, n]))
        return dists[: len(a1)], dists[len(a1) :]
    mat = distance(batch.embeddings, batch.ref_emb)
    return mat[a1, p], mat[a2, n]


def _streamed_pairs(
    batch: Batch,
    distance: BaseDistance,
    loss: PairLoss,
    pos_stream: ReductionStream,
    neg_stream: ReductionStream,
) -> tuple[Entry, Entry] | None:
    """All pairs of the labels, added to the streams: one block of rows of the matrix at a time
    for the distances of :func:`fused_matrix_kind`, the whole ``(B, R)`` matrix (no index
    lists) for the others."""
    kind = fused_matrix_kind(distance)
    if kind is None:
        pos_mask, neg_mask = batch.masks()
        if at_most_one_pair_each(int(pos_mask.sum()), int(neg_mask.sum())):
            return None
        mat = distance(batch.embeddings, batch.ref_emb)
        pos_stream.add_losses(_listed(loss.pos_rule, mat), pos_mask)
        neg_stream.add_losses(_listed(loss.neg_rule, mat), neg_mask)
        return pos_stream, neg_stream
    pairs = PairBlocks(batch)
    if at_most_one_pair_each(pairs.n_pos, pairs.n_neg):
        return None
    query, ref = normalized_inputs(distance, batch)
    need_grad = torch.is_grad_enabled() and (query.requires_grad or ref.requires_grad)
    with full_precision(query.device):
        pos_gradient, neg_gradient = _BlockwisePairSums.apply(
            query, ref, pairs, kind, distance, loss, (pos_stream, neg_stream), need_grad
        )
    pos_stream.carry(pos_gradient)
    neg_stream.carry(neg_gradient)
    return pos_stream, neg_stream


class _BlockGrads(NamedTuple):
    """The gradient of what one block of the matrix added to the positive and negative streams
    (see :func:`_block_terms`), with respect to the pairs' distances.

    ``pos_grad`` at the ``(P,)`` positive entries of the block (distances ``pos_dists``); for
    the negatives inside the margin (the only ones with a loss) either ``neg_grad`` at the
    listed entries ``neg_rows``/``neg_cols`` (distances ``neg_dists``), when they are few, or
    the dense ``(c, R)`` ``neg_grad`` with ``neg_dists`` the block's distances (``neg_rows`` is
    then ``None``). ``n_neg`` counts the negatives added (the others have a zero loss).
    """

    pos_grad: Tensor
    pos_dists: Tensor
    neg_grad: Tensor
    neg_dists: Tensor
    neg_rows: Tensor | None
    neg_cols: Tensor | None
    n_neg: int


# A block whose negatives inside the margin are at most 1/_FEW_NEGATIVES of its entries gets
# their gradient from a list of them rather than from a dense matrix product (negatives beyond
# the margin have none: after some training, most of them).
_FEW_NEGATIVES = 64


def _block_terms(
    block: RowBlock,
    kind: MatrixKind,
    distance: BaseDistance,
    loss: PairLoss,
    streams: tuple[ReductionStream, ReductionStream],
    copies: int,
) -> _BlockGrads:
    """Add the losses of ``block``'s pairs to the positive and negative ``streams`` (each
    counted ``copies`` times), and return their gradient (:class:`_BlockGrads`), zero where a
    stream does not keep a loss.

    ``block.mat`` holds the entries of :meth:`MatrixBlocks.tile` with ``root=False`` (squared
    Euclidean distances are turned into distances here, in place). Only the negatives inside
    the margin are added: found by one comparison of the block before any square root
    (:func:`~deepmetric.pairwise.root_bound`: the same entries), and when they are few only they
    become distances and losses. The caller adds the others, whose loss is zero.
    """
    pos_stream, neg_stream = streams
    pos_dists = distances_(kind, block.mat[block.pos_rows, block.pos_cols])
    pos_losses, pos_grad = loss.pos_rule(pos_dists)
    pos_keep = pos_stream.add_losses(pos_losses, counts=copies)
    if pos_keep is not None:
        pos_grad.mul_(pos_keep)

    mat = block.mat
    inside = closer_than(kind, mat, loss.neg_margin, distance.is_inverted)
    inside = block.fill_non_negatives_(inside, False)
    n_inside = int(torch.count_nonzero(inside))
    rows = cols = None
    if n_inside * _FEW_NEGATIVES <= inside.numel():
        rows, cols = torch.where(inside)
        neg_dists = distances_(kind, mat[rows, cols])
        losses, neg_grad = loss.neg_rule(neg_dists)
        keep = neg_stream.add_losses(losses, counts=copies)
    else:
        neg_dists = distances_(kind, mat)
        inside_bytes = inside.view(torch.uint8)  # (0/1 bytes: fast arithmetic, unlike bool)
        losses, neg_grad = loss.neg_rule(neg_dists)
        keep = neg_stream.add_losses(losses.mul_(inside_bytes), inside, counts=copies)
        if keep is None:
            keep = inside_bytes
    if keep is not None:
        neg_grad.mul_(keep)
    return _BlockGrads(
        pos_grad=pos_grad,
        pos_dists=pos_dists,
        neg_grad=neg_grad,
        neg_dists=neg_dists,
        neg_rows=rows,
        neg_cols=cols,
        n_neg=n_inside,
    )


def _add_entries(
    entries: tuple[list[Tensor], ...], rows: Tensor, cols: Tensor, weights: Tensor, mirrored: bool
) -> None:
    """Append matrix entries (and, for a mirrored tile, their transposes) to a list of rows,
    columns and weights."""
    for part, values in zip(entries, (rows, cols, weights), strict=True):
        part.append(values)
    if mirrored:
        for part, values in zip(entries, (cols, rows, weights), strict=True):
            part.append(values)


class _BlockwisePairSums(torch.autograd.Function):
    """``(B, D)`` queries and ``(R, D)`` references -> scalars carrying the gradients of the
    positive and negative sums that :func:`_block_terms` adds to the ``streams``, one block of
    rows at a time (their values are not used).

    Each sum is a fixed sum over pairs, so the forward pass also computes the gradient of each
    sum with respect to the embeddings while the block is at hand (when a gradient is wanted at
    all): the backward pass only scales them. Nothing of size ``(B, R)`` outlives a block. Only
    the kept negatives have a gradient; when a block has few, they are handled as a list. When
    the pairs are symmetric (:attr:`PairBlocks.symmetric`), so are the weights: each block adds
    both roles of its rows with one matrix product, and a large batch is read as the square
    tiles on and above the diagonal (:meth:`PairBlocks.tiles`), a tile off the diagonal
    counting twice (its losses, and its gradients for its rows and its columns).
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        ref: Tensor,
        pairs: PairBlocks,
        kind: MatrixKind,
        distance: BaseDistance,
        loss: PairLoss,
        streams: tuple[ReductionStream, ReductionStream],
        need_grad: bool,
    ) -> tuple[Tensor, Tensor]:
        same = pairs.same_source
        # gradients of the negative and the positive sum, for the queries and the references
        # (with no separate reference set, one for both roles)
        grads = [
            torch.zeros_like(x) if need_grad and not (same and i % 2) else None
            for i, x in enumerate((query, ref, query, ref))
        ]
        neg_query, neg_ref, pos_query, pos_ref = grads
        if same:
            neg_ref, pos_ref = neg_query, pos_query
        # entries whose gradient is added from a list at the end: rows, columns, weights
        positives: tuple[list[Tensor], ...] = ([], [], [])
        few_negatives: tuple[list[Tensor], ...] = ([], [], [])
        n_neg_added = 0
        matrix = MatrixBlocks(kind, query, ref, same)
        for r0, r1, c0, c1, mirrored in pairs.tiles(query.device):
            block = pairs.tile(matrix.tile(r0, r1, c0, c1, root=False), r0, r1, c0, c1)
            copies = 2 if mirrored else 1  # a mirrored tile's pairs count for its transpose too
            terms = _block_terms(block, kind, distance, loss, streams, copies)
            n_neg_added += copies * terms.n_neg
            if not need_grad:
                continue
            assert neg_query is not None
            weight = embedding_weight_(kind, terms.neg_grad, terms.neg_dists)
            if terms.neg_rows is not None and terms.neg_cols is not None:
                if len(weight) > 0:
                    rows, cols = terms.neg_rows + r0, terms.neg_cols + c0
                    _add_entries(few_negatives, rows, cols, weight, mirrored)
            elif mirrored:  # both roles of both sides: rows [r0:r1] and columns [c0:c1]
                add_block_embedding_grads_(
                    kind, query, ref[c0:c1], r0, weight.mul_(2), neg_query, neg_query[c0:c1]
                )
            else:
                neg_ref_part = None if neg_ref is None else neg_ref[c0:c1]
                add_block_embedding_grads_(
                    kind, query, ref[c0:c1], r0, weight, neg_query, neg_ref_part, pairs.symmetric
                )
            weights = embedding_weight_(kind, terms.pos_grad, terms.pos_dists)
            _add_entries(positives, block.pos_rows + r0, block.pos_cols + c0, weights, mirrored)
        # the negatives outside the margin: a zero loss each, which a reducer may count
        if pairs.n_neg > n_neg_added:
            streams[1].add_losses(query.new_zeros(1), counts=pairs.n_neg - n_neg_added)
        for entries, grad_query, grad_ref in (
            (positives, pos_query, pos_ref),
            (few_negatives, neg_query, neg_ref),
        ):
            if entries[0]:
                rows, cols, weights = (torch.cat(part) for part in entries)
                add_pair_embedding_grads_(
                    kind, query, ref, rows, cols, weights, grad_query, grad_ref, pairs.symmetric
                )
        ctx.save_for_backward(*(torch.zeros(0) if g is None else g for g in grads))
        zero = query.new_zeros(())
        return zero, zero.clone()

    @staticmethod
    def backward(ctx: Any, grad_pos: Tensor, grad_neg: Tensor) -> tuple[Tensor | None, ...]:
        first_order_only()
        neg_query, neg_ref, pos_query, pos_ref = ctx.saved_tensors
        need_query, need_ref = ctx.needs_input_grad[:2]
        grad_query = neg_query * grad_neg + pos_query * grad_pos if need_query else None
        grad_ref = None
        if need_ref and neg_ref.numel() > 0:  # a separate reference set
            grad_ref = neg_ref * grad_neg + pos_ref * grad_pos
        return grad_query, grad_ref, None, None, None, None, None, None
