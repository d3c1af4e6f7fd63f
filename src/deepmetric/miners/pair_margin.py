"""PairMarginMiner: the pairs that violate their margin."""

from __future__ import annotations

import torch
from torch import Tensor

from ..distances import BaseDistance
from ..interfaces import IndicesTuple, Pairs
from ..pairwise import (
    Batch,
    MatrixBlocks,
    MatrixKind,
    PairBlocks,
    closer_than,
    distances_,
    full_precision,
    fused_matrix_kind,
    normalized_inputs,
    pairs_from_masks,
)
from .base import (
    BaseMiner,
    cap_negative_pairs,
    cap_negatives_by_distance,
    check_max_neg_per_pos,
    empty_pairs,
)


def pair_margin_pairs(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    pos_margin: float,
    neg_margin: float,
    is_inverted: bool,
) -> Pairs:
    """Positive pairs farther than ``pos_margin`` and negative pairs closer than ``neg_margin``
    (strictly; for a similarity: ``s < pos_margin`` and ``s > neg_margin``).

    Shapes: ``mat``, masks ``(B, R)`` -> four 1-D int64 tensors, row-major.
    """
    if is_inverted:
        return pairs_from_masks(pos_mask & (mat < pos_margin), neg_mask & (mat > neg_margin))
    return pairs_from_masks(pos_mask & (mat > pos_margin), neg_mask & (mat < neg_margin))


def pair_margin_pairs_blockwise(
    kind: MatrixKind,
    distance: BaseDistance,
    batch: Batch,
    pos_margin: float,
    neg_margin: float,
) -> tuple[Pairs, Tensor]:
    """:func:`pair_margin_pairs` over the matrix of ``distance`` (a fusable ``kind``, see
    :func:`~deepmetric.pairwise.fused_matrix_kind`), computed one block of rows at a
    time from the embeddings: neither the whole matrix nor the label masks are built. Also
    returns the distances of the negative pairs (for :func:`cap_negative_pairs`).

    Shapes: four 1-D int64 tensors, row-major, and ``(N,)`` distances.
    """
    inverted = distance.is_inverted
    query, ref = normalized_inputs(distance, batch)
    matrix = MatrixBlocks(kind, query, ref, batch.same_source)
    pairs = PairBlocks(batch)
    parts: tuple[list[Tensor], ...] = ([], [], [], [], [])
    for start, stop in matrix.bounds():
        mat = matrix.rows(start, stop, root=False)
        block = pairs.block(mat, start, stop)
        pos_dists = distances_(kind, mat[block.pos_rows, block.pos_cols])
        keep = pos_dists < pos_margin if inverted else pos_dists > pos_margin
        kept = torch.where(keep)[0]  # (then index_select: cheaper than two boolean indexings)
        candidates = closer_than(kind, mat, neg_margin, inverted)
        rows, cols = torch.where(block.fill_non_negatives_(candidates, False))
        neg_dists = distances_(kind, mat[rows, cols])
        for part, found in zip(
            parts,
            (
                block.pos_rows.index_select(0, kept).add_(start),
                block.pos_cols.index_select(0, kept),
                rows.add_(start),
                cols,
                neg_dists,
            ),
            strict=True,
        ):
            part.append(found)
    if not parts[0]:  # an empty batch
        return empty_pairs(query.device), query.new_empty(0)
    a1, p, a2, n, neg_dists = (torch.cat(part) for part in parts)
    return (a1, p, a2, n), neg_dists


class PairMarginMiner(BaseMiner):
    """The pairs that violate a contrastive margin: positives farther than ``pos_margin``,
    negatives closer than ``neg_margin``.

    The margins of the contrastive loss (Hadsell, Chopra & LeCun, "Dimensionality Reduction by
    Learning an Invariant Mapping", 2006) used to select pairs. Defaults as in PML:
    ``pos_margin=0.2``, ``neg_margin=0.8``, ``LpDistance()``; for a similarity the comparisons
    flip. Beyond PML, ``max_neg_per_pos`` caps the negatives at that many per positive pair,
    keeping the hardest (:func:`cap_negative_pairs`).

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> ``(a1, p, a2, n)``, 1-D int64.
    """

    def __init__(
        self,
        pos_margin: float = 0.2,
        neg_margin: float = 0.8,
        *,
        max_neg_per_pos: int | None = None,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance=distance)
        check_max_neg_per_pos(max_neg_per_pos)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.max_neg_per_pos = max_neg_per_pos

    def mine_batch(self, batch: Batch) -> IndicesTuple:
        kind = fused_matrix_kind(self.distance)
        if kind is None:
            return super().mine_batch(batch)
        with full_precision(batch.embeddings.device):
            pairs, neg_dists = pair_margin_pairs_blockwise(
                kind, self.distance, batch, self.pos_margin, self.neg_margin
            )
        if self.max_neg_per_pos is None:
            return pairs
        return cap_negatives_by_distance(
            neg_dists, pairs, self.max_neg_per_pos, self.distance.is_inverted
        )

    def mine(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, batch: Batch) -> Pairs:
        inverted = self.distance.is_inverted
        pairs = pair_margin_pairs(
            mat, pos_mask, neg_mask, self.pos_margin, self.neg_margin, inverted
        )
        return cap_negative_pairs(mat, pairs, self.max_neg_per_pos, inverted)

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"
