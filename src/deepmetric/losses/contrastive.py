"""Contrastive loss (Hadsell, Chopra & LeCun, 2006)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from .._pairs import pairs_from_masks, to_pairs
from ..distances import BaseDistance
from ..reducers import (
    AvgNonZeroReducer,
    BaseReducer,
    LossDict,
    SelectingReducer,
    keeps_the_nonzero,
    reduce_masked,
    reduces_by_selection,
)
from ._blockwise import (
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
    selects_elementwise,
)
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


class ContrastiveBlockTerms(NamedTuple):
    """What one block of the matrix adds to :class:`_BlockwiseContrastive`'s sums.

    ``sums`` and ``selected``: ``(2,)`` positive and negative sums of the kept losses and how
    many each kept. The gradient of each sum with respect to the pairs' distances is
    ``pos_grad`` at the ``(P,)`` positive entries of the block (distances ``pos_dists``) and, for
    the negatives, either ``neg_grad`` at the listed entries ``neg_rows``/``neg_cols`` (distances
    ``neg_dists``), when they are few, or the dense ``(c, R)`` ``neg_grad`` with ``neg_dists``
    the block's distances (``neg_rows`` is then ``None``).
    """

    sums: Tensor
    selected: Tensor
    pos_grad: Tensor
    pos_dists: Tensor
    neg_grad: Tensor
    neg_dists: Tensor
    neg_rows: Tensor | None
    neg_cols: Tensor | None


# A block whose kept negatives are at most 1/_FEW_NEGATIVES of its entries gets their gradient
# from a list of them rather than from a dense matrix product (negatives beyond the margin have
# none: after some training, most of them).
_FEW_NEGATIVES = 64


def contrastive_block_terms(
    block: RowBlock,
    kind: MatrixKind,
    pos_margin: float,
    neg_margin: float,
    distance: BaseDistance,
    select: Callable[[Tensor], Tensor] | None,
) -> ContrastiveBlockTerms:
    """The :class:`ContrastiveBlockTerms` of ``block``, whose ``mat`` holds the entries of
    :meth:`~deepmetric.losses._blockwise.MatrixBlocks.tile` with ``root=False`` (squared
    Euclidean distances are turned into distances here, in place): the losses of
    :func:`contrastive_pair_losses` that ``select`` keeps (a reducer's elementwise choice;
    ``None``: the losses above zero, as :class:`~deepmetric.reducers.AvgNonZeroReducer` keeps).
    """
    sign = 1.0 if distance.is_inverted else -1.0  # d(negative violation) / d distance
    pos_dists = distances_(kind, block.mat[block.pos_rows, block.pos_cols])
    pos_losses = F.relu(distance.margin(pos_dists, pos_margin))
    pos_keep = pos_losses > 0 if select is None else select(pos_losses)
    pos_losses.mul_(pos_keep)
    pos_grad = pos_losses.sign().mul_(-sign)
    if select is None:
        neg = _negatives_inside_margin(block, kind, neg_margin, distance)
    else:
        neg = _selected_negatives(block, kind, neg_margin, distance, select)
    neg_sum, neg_selected, neg_grad, neg_dists, neg_rows, neg_cols = neg
    return ContrastiveBlockTerms(
        sums=torch.stack([pos_losses.sum(), neg_sum]),
        selected=torch.stack([pos_keep.sum(), neg_selected]),
        pos_grad=pos_grad,
        pos_dists=pos_dists,
        neg_grad=neg_grad.mul_(sign),
        neg_dists=neg_dists,
        neg_rows=neg_rows,
        neg_cols=neg_cols,
    )


# The negative terms of a block: the sum of the kept losses, how many are kept, the slope of
# each kept loss (1 or 0) and its distance, listed at (rows, columns) when they are few, or
# dense (c, R) with rows and columns None.
_NegativeTerms = tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]


def _negatives_inside_margin(
    block: RowBlock, kind: MatrixKind, neg_margin: float, distance: BaseDistance
) -> _NegativeTerms:
    """The negatives inside the margin, the only ones with a loss: found by one comparison of
    the block before any square root (:func:`~deepmetric.losses._blockwise.root_bound`: the same
    entries), and when they are few only they become distances and losses."""
    mat = block.mat
    inside = closer_than(kind, mat, neg_margin, distance.is_inverted)
    inside = block.fill_non_negatives_(inside, False)
    n_inside = torch.count_nonzero(inside)
    if int(n_inside) * _FEW_NEGATIVES <= inside.numel():
        rows, cols = torch.where(inside)
        dists = distances_(kind, mat[rows, cols])
        losses = distance.margin(neg_margin, dists)  # > 0: inside the margin
        return losses.sum(), n_inside, torch.ones_like(losses), dists, rows, cols
    dists = distances_(kind, mat)
    inside_bytes = inside.view(torch.uint8)  # (0/1 bytes: fast arithmetic, unlike bool)
    losses = distance.margin(neg_margin, dists).mul_(inside_bytes)
    return losses.sum(), n_inside, inside_bytes.to(mat.dtype), dists, None, None


def _selected_negatives(
    block: RowBlock,
    kind: MatrixKind,
    neg_margin: float,
    distance: BaseDistance,
    select: Callable[[Tensor], Tensor],
) -> _NegativeTerms:
    """The negatives' losses that ``select`` keeps, from the whole block of distances."""
    dists = distances_(kind, block.mat)
    losses = block.fill_non_negatives_(distance.margin(neg_margin, dists).clamp_min_(0), 0.0)
    # what the reducer keeps of the negatives, as 0/1 bytes (fast arithmetic, unlike bool)
    keep = block.fill_non_negatives_(select(losses), False).view(torch.uint8)
    losses.mul_(keep)
    # relu's slope is 1 where a loss is positive: the sign of the kept losses
    slope = losses.sign()
    if int(torch.count_nonzero(slope)) * _FEW_NEGATIVES <= slope.numel():
        rows, cols = torch.where(slope)
        return losses.sum(), keep.sum(), slope[rows, cols], dists[rows, cols], rows, cols
    return losses.sum(), keep.sum(), slope, dists, None, None


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
    """``(B, D)`` queries and ``(R, D)`` references -> the kept positive and negative loss sums
    and how many losses each kept (see :func:`contrastive_block_terms`), one block of rows at a
    time.

    Each sum is a fixed sum over pairs, so the forward pass also computes the gradient of each
    sum with respect to the embeddings while the block is at hand (when a gradient is wanted at
    all): the backward pass only scales them. Nothing of size ``(B, R)`` outlives a block. Only
    the kept negatives have a gradient; when a block has few, they are handled as a list. When
    the pairs are symmetric (:attr:`~deepmetric.losses._blockwise.PairBlocks.symmetric`), so are
    the weights: each block adds both roles of its rows with one matrix product, and a large
    batch is read as the square tiles on and above the diagonal
    (:meth:`~deepmetric.losses._blockwise.PairBlocks.tiles`), a tile off the diagonal counting
    twice (its sums, and its gradients for its rows and its columns).
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        ref: Tensor,
        pairs: PairBlocks,
        kind: MatrixKind,
        loss: ContrastiveLoss,
        select: Callable[[Tensor], Tensor] | None,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
        sums = query.new_zeros(2)
        selected = torch.zeros(2, dtype=torch.long, device=query.device)
        matrix = MatrixBlocks(kind, query, ref, same)
        for r0, r1, c0, c1, mirrored in pairs.tiles(query.device):
            block = pairs.tile(matrix.tile(r0, r1, c0, c1, root=False), r0, r1, c0, c1)
            terms = contrastive_block_terms(
                block, kind, loss.pos_margin, loss.neg_margin, loss.distance, select
            )
            copies = 2 if mirrored else 1  # a mirrored tile's pairs count for its transpose too
            sums += copies * terms.sums
            selected += copies * terms.selected
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
        ctx.mark_non_differentiable(selected)
        return sums[0], sums[1], selected[0], selected[1]

    @staticmethod
    def backward(
        ctx: Any, grad_pos: Tensor, grad_neg: Tensor, *unused: Tensor | None
    ) -> tuple[Tensor | None, ...]:
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
            if selects_elementwise(self.reducer) and fused_matrix_kind(self.distance) is not None:
                return self._blockwise_loss(batch)
            mat = self.distance(batch.embeddings, batch.ref_emb)
            if reduces_by_selection(self.reducer):
                return self._masked_loss(mat, *batch.masks())
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
        few of them (:func:`~deepmetric.losses._blockwise.few_pairs`), else read off the whole
        matrix."""
        if few_pairs(batch, len(a1) + len(a2)):
            dists = pair_distances(self.distance, batch, torch.cat([a1, a2]), torch.cat([p, n]))
            return dists[: len(a1)], dists[len(a1) :]
        mat = self.distance(batch.embeddings, batch.ref_emb)
        return mat[a1, p], mat[a2, n]

    def _blockwise_loss(self, batch: Batch) -> LossDict:
        """All pairs of the labels, one block of rows of the matrix at a time, each sum reduced
        by its counts: the fast path for the elementwise selecting reducers and the distances
        of :func:`~deepmetric.losses._blockwise.fused_matrix_kind`."""
        reducer = self.reducer
        assert isinstance(reducer, SelectingReducer)
        kind = fused_matrix_kind(self.distance)
        assert kind is not None
        pairs = PairBlocks(batch)
        if pairs.n_pos <= 1 and pairs.n_neg <= 1:  # PML's rule: nothing to learn from
            return self.zero_losses("pos_loss", "neg_loss")
        query, ref = normalized_inputs(self.distance, batch)
        need_grad = torch.is_grad_enabled() and (query.requires_grad or ref.requires_grad)
        with full_precision(query.device):
            select = None if keeps_the_nonzero(reducer) else reducer.select
            pos_sum, neg_sum, pos_selected, neg_selected = _BlockwiseContrastive.apply(
                query, ref, pairs, kind, self, select, need_grad
            )
        loss_dict: LossDict = {}
        for name, total, selected, n_pairs in (
            ("pos_loss", pos_sum, pos_selected, pairs.n_pos),
            ("neg_loss", neg_sum, neg_selected, pairs.n_neg),
        ):
            if int(selected) == 0:  # nothing selected: zero, with a zero gradient
                value = total * 0
            else:
                n_total = torch.tensor(n_pairs, device=selected.device)
                value = total / reducer.divisor(selected, n_total).to(total.dtype)
            loss_dict[name] = {
                "losses": value,
                "indices": None,
                "reduction_type": "already_reduced",
            }
        return loss_dict

    def _masked_loss(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor) -> LossDict:
        """All pairs of the labels, reduced straight from the ``(B, R)`` matrix (no index
        lists): the fast path for the selecting reducers."""
        reducer = self.reducer
        assert isinstance(reducer, SelectingReducer)
        if int(pos_mask.sum()) <= 1 and int(neg_mask.sum()) <= 1:  # PML's rule, as above
            return self.zero_losses("pos_loss", "neg_loss")
        pos, neg = contrastive_pair_losses(
            mat, mat, self.pos_margin, self.neg_margin, self.distance
        )
        return {
            name: {
                "losses": reduce_masked(reducer, losses, mask),
                "indices": None,
                "reduction_type": "already_reduced",
            }
            for name, losses, mask in (("pos_loss", pos, pos_mask), ("neg_loss", neg, neg_mask))
        }
