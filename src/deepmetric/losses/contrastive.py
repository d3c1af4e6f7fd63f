"""Contrastive loss (Hadsell, Chopra & LeCun, 2006)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance
from ..pairwise import (
    MatrixBlocks,
    MatrixKind,
    PairBlocks,
    RowBlock,
    add_block_embedding_grads_,
    add_pair_embedding_grads_,
    closer_than,
    distances_,
    embedding_weight_,
    few_pairs,
    first_order_only,
    full_precision,
    fused_matrix_kind,
    normalized_inputs,
    pair_distances,
    pairs_from_masks,
    to_pairs,
)
from ..reducers import AvgNonZeroReducer, BaseReducer, LossDict, ReductionStream
from .base import BaseMetricLossFunction, Batch, LossOptions


def contrastive_pair_losses(
    pos_dists: Tensor,
    neg_dists: Tensor,
    pos_margin: float,
    neg_margin: float,
    distance: BaseDistance,
) -> tuple[Tensor, Tensor]:
    """Per-pair losses: ``relu(d+ - m+)`` for positive pairs, ``relu(m- - d-)`` for negatives
    (the other way round for a similarity)."""
    pos = F.relu(distance.margin(pos_dists, pos_margin))
    neg = F.relu(distance.margin(neg_margin, neg_dists))
    return pos, neg


class ContrastiveBlockGrads(NamedTuple):
    """The gradient of what one block of the matrix added to the positive and negative streams
    (see :func:`contrastive_block_terms`), with respect to the pairs' distances.

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


def contrastive_block_terms(
    block: RowBlock,
    kind: MatrixKind,
    pos_margin: float,
    neg_margin: float,
    distance: BaseDistance,
    streams: tuple[ReductionStream, ReductionStream],
    copies: int,
) -> ContrastiveBlockGrads:
    """Add the losses of :func:`contrastive_pair_losses` of ``block`` to the positive and
    negative ``streams`` (each counted ``copies`` times), and return their gradient
    (:class:`ContrastiveBlockGrads`), zero where a stream does not keep a loss.

    ``block.mat`` holds the entries of
    :meth:`~deepmetric.pairwise.MatrixBlocks.tile` with ``root=False`` (squared
    Euclidean distances are turned into distances here, in place). Only the negatives inside
    the margin are added: found by one comparison of the block before any square root
    (:func:`~deepmetric.pairwise.root_bound`: the same entries), and when they are few
    only they become distances and losses. The caller adds the others, whose loss is zero.
    """
    pos_stream, neg_stream = streams
    sign = 1.0 if distance.is_inverted else -1.0  # d(negative violation) / d distance
    pos_dists = distances_(kind, block.mat[block.pos_rows, block.pos_cols])
    pos_losses = F.relu(distance.margin(pos_dists, pos_margin))
    pos_keep = pos_stream.add_losses(pos_losses, counts=copies)
    pos_grad = pos_losses.sign().mul_(-sign)  # relu's slope: 1 where a loss is positive
    if pos_keep is not None:
        pos_grad.mul_(pos_keep)

    mat = block.mat
    inside = closer_than(kind, mat, neg_margin, distance.is_inverted)
    inside = block.fill_non_negatives_(inside, False)
    n_inside = int(torch.count_nonzero(inside))
    rows = cols = None
    if n_inside * _FEW_NEGATIVES <= inside.numel():
        rows, cols = torch.where(inside)
        neg_dists = distances_(kind, mat[rows, cols])
        losses = distance.margin(neg_margin, neg_dists)  # > 0: inside the margin
        keep = neg_stream.add_losses(losses, counts=copies)
        neg_grad = torch.ones_like(losses) if keep is None else keep.to(losses.dtype)
    else:
        neg_dists = distances_(kind, mat)
        inside_bytes = inside.view(torch.uint8)  # (0/1 bytes: fast arithmetic, unlike bool)
        losses = distance.margin(neg_margin, neg_dists).mul_(inside_bytes)
        keep = neg_stream.add_losses(losses, inside, counts=copies)
        neg_grad = (inside if keep is None else keep).to(mat.dtype)
    return ContrastiveBlockGrads(
        pos_grad=pos_grad,
        pos_dists=pos_dists,
        neg_grad=neg_grad.mul_(sign),
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


class _BlockwiseContrastive(torch.autograd.Function):
    """``(B, D)`` queries and ``(R, D)`` references -> scalars carrying the gradients of the
    positive and negative sums that :func:`contrastive_block_terms` adds to the ``streams``, one
    block of rows at a time (their values are not used).

    Each sum is a fixed sum over pairs, so the forward pass also computes the gradient of each
    sum with respect to the embeddings while the block is at hand (when a gradient is wanted at
    all): the backward pass only scales them. Nothing of size ``(B, R)`` outlives a block. Only
    the kept negatives have a gradient; when a block has few, they are handled as a list. When
    the pairs are symmetric (:attr:`~deepmetric.pairwise.PairBlocks.symmetric`), so are
    the weights: each block adds both roles of its rows with one matrix product, and a large
    batch is read as the square tiles on and above the diagonal
    (:meth:`~deepmetric.pairwise.PairBlocks.tiles`), a tile off the diagonal counting
    twice (its losses, and its gradients for its rows and its columns).
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        ref: Tensor,
        pairs: PairBlocks,
        kind: MatrixKind,
        loss: ContrastiveLoss,
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
            terms = contrastive_block_terms(
                block, kind, loss.pos_margin, loss.neg_margin, loss.distance, streams, copies
            )
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
        return grad_query, grad_ref, None, None, None, None, None


class ContrastiveLoss(BaseMetricLossFunction):
    """Pull positive pairs within ``pos_margin``; push negative pairs beyond ``neg_margin``.

    Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an Invariant Mapping", 2006.
    Defaults as in PML: ``pos_margin=0, neg_margin=1``, ``AvgNonZeroReducer`` applied to the
    positive and the negative losses separately, then summed.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar.
    """

    def __init__(
        self,
        pos_margin: float = 0,
        neg_margin: float = 1,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def get_default_reducer(self) -> BaseReducer:
        return AvgNonZeroReducer()

    def compute_loss(self, batch: Batch) -> LossDict:
        if batch.indices_tuple is None:
            # a reducer that reduces blocks of losses: the pairs are streamed, never listed
            pos_stream = self.reducer.stream("pos_loss", batch.embeddings)
            neg_stream = self.reducer.stream("neg_loss", batch.embeddings)
            if pos_stream is not None and neg_stream is not None:
                return self._streamed_loss(batch, pos_stream, neg_stream)
            mat = self.distance(batch.embeddings, batch.ref_emb)
            a1, p, a2, n = pairs_from_masks(*batch.masks())
            pos_dists, neg_dists = mat[a1, p], mat[a2, n]
        else:
            a1, p, a2, n = to_pairs(batch.indices_tuple)
            pos_dists, neg_dists = self._listed_pair_distances(batch, a1, p, a2, n)
        if len(a1) <= 1 and len(a2) <= 1:  # PML's rule: nothing to learn from
            return self.zero_losses("pos_loss", "neg_loss")
        pos, neg = contrastive_pair_losses(
            pos_dists, neg_dists, self.pos_margin, self.neg_margin, self.distance
        )
        return {
            "pos_loss": {"losses": pos, "indices": (a1, p), "reduction_type": "pos_pair"},
            "neg_loss": {"losses": neg, "indices": (a2, n), "reduction_type": "neg_pair"},
        }

    def _listed_pair_distances(
        self, batch: Batch, a1: Tensor, p: Tensor, a2: Tensor, n: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The distances of a miner's positive and negative pairs: one by one when there are
        few of them (:func:`~deepmetric.pairwise.few_pairs`), else read off the whole
        matrix."""
        if few_pairs(batch, len(a1) + len(a2)):
            dists = pair_distances(self.distance, batch, torch.cat([a1, a2]), torch.cat([p, n]))
            return dists[: len(a1)], dists[len(a1) :]
        mat = self.distance(batch.embeddings, batch.ref_emb)
        return mat[a1, p], mat[a2, n]

    def _streamed_loss(
        self, batch: Batch, pos_stream: ReductionStream, neg_stream: ReductionStream
    ) -> LossDict:
        """All pairs of the labels, added to the streams: one block of rows of the matrix at a
        time for the distances of :func:`~deepmetric.pairwise.fused_matrix_kind`, the
        whole ``(B, R)`` matrix (no index lists) for the others."""
        kind = fused_matrix_kind(self.distance)
        if kind is None:
            pos_mask, neg_mask = batch.masks()
            n_pos, n_neg = int(pos_mask.sum()), int(neg_mask.sum())
        else:
            pairs = PairBlocks(batch)
            n_pos, n_neg = pairs.n_pos, pairs.n_neg
        if n_pos <= 1 and n_neg <= 1:  # PML's rule: nothing to learn from
            return self.zero_losses("pos_loss", "neg_loss")
        if kind is None:
            mat = self.distance(batch.embeddings, batch.ref_emb)
            pos, neg = contrastive_pair_losses(
                mat, mat, self.pos_margin, self.neg_margin, self.distance
            )
            pos_stream.add_losses(pos, pos_mask)
            neg_stream.add_losses(neg, neg_mask)
        else:
            query, ref = normalized_inputs(self.distance, batch)
            need_grad = torch.is_grad_enabled() and (query.requires_grad or ref.requires_grad)
            with full_precision(query.device):
                pos_gradient, neg_gradient = _BlockwiseContrastive.apply(
                    query, ref, pairs, kind, self, (pos_stream, neg_stream), need_grad
                )
            pos_stream.carry(pos_gradient)
            neg_stream.carry(neg_gradient)
        return {"pos_loss": pos_stream, "neg_loss": neg_stream}
