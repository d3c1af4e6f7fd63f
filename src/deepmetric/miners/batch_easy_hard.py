"""BatchEasyHardMiner and BatchHardMiner: one positive and one negative per anchor."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..distances import BaseDistance
from ..interfaces import IndicesTuple, Pairs, Triplets
from ..pairwise import (
    Batch,
    MatrixBlocks,
    MatrixKind,
    PairBlocks,
    full_precision,
    fused_matrix_kind,
    normalized_inputs,
    pairs_from_masks,
)
from .base import (
    BaseMiner,
    cap_negative_pairs,
    check_max_neg_per_pos,
    empty_triplets,
)

HARD = "hard"
SEMIHARD = "semihard"
EASY = "easy"
ALL = "all"


def pick_per_row(
    mat: Tensor,
    keep: Tensor,
    largest: bool,
    threshold: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The largest (or smallest) entry of each row among those where ``keep`` is True.

    With ``threshold`` (one value per row), only entries strictly below it (when ``largest``) or
    strictly above it (otherwise) compete: PML's semi-hard rule.

    Shapes: ``mat``, ``keep`` ``(B, R)``, ``threshold`` ``(B,)`` -> values ``(B,)``, column
    indices ``(B,)`` int64, ``found`` ``(B,)`` bool (False for rows with no candidate, whose value
    is ``∓inf`` and index meaningless).
    """
    if threshold is not None:
        bound = threshold.unsqueeze(1)
        keep = keep & ((mat < bound) if largest else (mat > bound))
    fill = -math.inf if largest else math.inf
    found = keep.any(dim=1)
    if mat.shape[1] == 0:
        values = torch.full((mat.shape[0],), fill, dtype=mat.dtype, device=mat.device)
        return values, torch.zeros(mat.shape[0], dtype=torch.long, device=mat.device), found
    masked = mat.masked_fill(~keep, fill)
    values, indices = masked.max(dim=1) if largest else masked.min(dim=1)
    return values, indices, found


def _within(mat: Tensor, mask: Tensor, allowed_range: tuple[float, float] | None) -> Tensor:
    if allowed_range is None:
        return mask
    low, high = allowed_range
    return mask & (mat >= low) & (mat <= high)


def batch_easy_hard_pairs(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    pos_strategy: str,
    neg_strategy: str,
    allowed_pos_range: tuple[float, float] | None = None,
    allowed_neg_range: tuple[float, float] | None = None,
    is_inverted: bool = False,
) -> Pairs:
    """One positive and one negative per anchor, chosen by strategy, as PML's
    ``BatchEasyHardMiner``.

    * positives: ``"hard"`` the farthest, ``"easy"`` the closest, ``"semihard"`` the farthest
      that is still strictly closer than the anchor's chosen negative, ``"all"`` every one;
    * negatives: ``"hard"`` the closest, ``"easy"`` the farthest, ``"semihard"`` the closest that
      is still strictly farther than the anchor's chosen positive, ``"all"`` every one.

    ``allowed_*_range = (low, high)`` restricts the candidates to ``low <= d <= high`` (ignored
    by ``"all"``, as in PML). When neither strategy is ``"all"``, only anchors with both a
    positive and a negative are returned, as ``(a, p, a, n)``.

    Shapes: ``mat``, masks ``(B, R)`` -> four 1-D int64 tensors.
    """
    if pos_strategy == ALL and neg_strategy == ALL:
        return pairs_from_masks(pos_mask, neg_mask)
    pos_keep = _within(mat, pos_mask, allowed_pos_range)
    neg_keep = _within(mat, neg_mask, allowed_neg_range)
    # "largest" is the farthest for a distance and the closest for a similarity
    pos_largest = (pos_strategy != EASY) != is_inverted  # hard/semi-hard: the farthest positive
    neg_largest = (neg_strategy == EASY) != is_inverted  # easy: the farthest negative

    pos: tuple[Tensor, Tensor, Tensor] | None = None
    neg: tuple[Tensor, Tensor, Tensor] | None = None
    if pos_strategy == SEMIHARD:  # the positive must be closer than the chosen negative
        neg = pick_per_row(mat, neg_keep, neg_largest)
        pos = pick_per_row(mat, pos_keep, pos_largest, threshold=neg[0])
    elif neg_strategy == SEMIHARD:  # the negative must be farther than the chosen positive
        pos = pick_per_row(mat, pos_keep, pos_largest)
        neg = pick_per_row(mat, neg_keep, neg_largest, threshold=pos[0])
    else:
        if pos_strategy != ALL:
            pos = pick_per_row(mat, pos_keep, pos_largest)
        if neg_strategy != ALL:
            neg = pick_per_row(mat, neg_keep, neg_largest)

    rows = torch.arange(mat.shape[0], device=mat.device)
    if pos is not None and neg is not None:
        anchors = rows[pos[2] & neg[2]]
        return anchors, pos[1][anchors], anchors.clone(), neg[1][anchors]
    if pos is None:  # every positive pair, one negative per anchor
        assert neg is not None
        a1, p = torch.where(pos_mask)
        a2 = rows[neg[2]]
        return a1, p, a2, neg[1][a2]
    a2, n = torch.where(neg_mask)  # one positive per anchor, every negative pair
    a1 = rows[pos[2]]
    return a1, pos[1][a1], a2, n


class BatchEasyHardMiner(BaseMiner):
    """For every anchor, one positive and one negative chosen by ``pos_strategy`` and
    ``neg_strategy`` (:attr:`HARD`, :attr:`SEMIHARD`, :attr:`EASY` or :attr:`ALL`); see
    :func:`batch_easy_hard_pairs` for the exact rules.

    Xuan, Stylianou & Pless, "Improved Embeddings with Easy Positive Triplet Mining", 2020.
    Arguments and defaults as in PML: ``pos_strategy="easy"``, ``neg_strategy="semihard"``,
    ``allowed_pos_range=None``, ``allowed_neg_range=None`` (``(low, high)`` bounds on the
    candidates' distances). Both strategies cannot be ``"semihard"``, and ``"semihard"`` cannot
    be combined with ``"all"``.

    Beyond PML, ``max_neg_per_pos`` caps the negatives at that many per positive pair, keeping
    the hardest (see :func:`cap_negative_pairs`); it only matters with ``pos_strategy="all"`` or
    ``neg_strategy="all"``.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> ``(a1, p, a2, n)``, 1-D int64.
    """

    HARD = HARD
    SEMIHARD = SEMIHARD
    EASY = EASY
    ALL = ALL
    all_batch_mining_strategies = [HARD, SEMIHARD, EASY, ALL]

    def __init__(
        self,
        pos_strategy: str = EASY,
        neg_strategy: str = SEMIHARD,
        allowed_pos_range: tuple[float, float] | None = None,
        allowed_neg_range: tuple[float, float] | None = None,
        *,
        max_neg_per_pos: int | None = None,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance=distance)
        for name, strategy in (("pos_strategy", pos_strategy), ("neg_strategy", neg_strategy)):
            if strategy not in self.all_batch_mining_strategies:
                raise ValueError(
                    f"{name} must be one of {self.all_batch_mining_strategies}, got {strategy!r}"
                )
        if pos_strategy == neg_strategy == SEMIHARD:
            raise ValueError('pos_strategy and neg_strategy cannot both be "semihard"')
        if {pos_strategy, neg_strategy} == {ALL, SEMIHARD}:
            raise ValueError('"semihard" cannot be used in combination with "all"')
        for name, allowed in (
            ("allowed_pos_range", allowed_pos_range),
            ("allowed_neg_range", allowed_neg_range),
        ):
            if allowed is not None and len(allowed) != 2:
                raise ValueError(f"{name} must be None or a (low, high) pair, got {allowed!r}")
        check_max_neg_per_pos(max_neg_per_pos)
        self.pos_strategy = pos_strategy
        self.neg_strategy = neg_strategy
        self.allowed_pos_range = allowed_pos_range
        self.allowed_neg_range = allowed_neg_range
        self.max_neg_per_pos = max_neg_per_pos

    def mine(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, batch: Batch) -> IndicesTuple:
        pairs = batch_easy_hard_pairs(
            mat,
            pos_mask,
            neg_mask,
            self.pos_strategy,
            self.neg_strategy,
            self.allowed_pos_range,
            self.allowed_neg_range,
            self.distance.is_inverted,
        )
        return cap_negative_pairs(mat, pairs, self.max_neg_per_pos, self.distance.is_inverted)

    def extra_repr(self) -> str:
        return f"pos_strategy={self.pos_strategy!r}, neg_strategy={self.neg_strategy!r}"


def batch_hard_triplets_blockwise(
    kind: MatrixKind,
    distance: BaseDistance,
    batch: Batch,
    allowed_pos_range: tuple[float, float] | None = None,
    allowed_neg_range: tuple[float, float] | None = None,
) -> Triplets:
    """The triplets of :func:`batch_easy_hard_pairs` with ``"hard"`` for both strategies (each
    anchor's farthest positive and closest negative) over the matrix of ``distance`` (a fusable
    ``kind``, see :func:`~deepmetric.pairwise.fused_matrix_kind`), computed one block of
    rows at a time from the embeddings: neither the whole matrix nor the label masks are built.
    Ties are broken as :func:`pick_per_row` breaks them.

    Shapes: three ``(T,)`` int64 tensors, ``T <= B``, by anchor.
    """
    if len(batch.ref_emb) == 0:
        return empty_triplets(batch.embeddings.device)
    # the hardest positive is the largest distance (smallest similarity), the hardest negative
    # the smallest distance; entries that do not compete get the losing extreme
    pos_largest = not distance.is_inverted
    pos_fill = -math.inf if pos_largest else math.inf
    neg_fill = -pos_fill
    query, ref = normalized_inputs(distance, batch)
    matrix = MatrixBlocks(kind, query, ref, batch.same_source)
    pairs = PairBlocks(batch)
    parts: tuple[list[Tensor], ...] = ([], [], [])
    for start, stop in matrix.bounds():
        mat = matrix.rows(start, stop)
        block = pairs.block(mat, start, stop)
        pos_vals = mat.new_full(mat.shape, pos_fill)
        pos_vals[block.pos_rows, block.pos_cols] = mat[block.pos_rows, block.pos_cols]
        neg_vals = mat  # no longer needed as such: overwritten in place
        for vals, allowed, fill in (
            (pos_vals, allowed_pos_range, pos_fill),
            (neg_vals, allowed_neg_range, neg_fill),
        ):
            if allowed is not None:
                low, high = allowed
                vals.masked_fill_((vals < low) | (vals > high), fill)
        block.fill_non_negatives_(neg_vals, neg_fill)
        pos_values, pos_cols = pos_vals.max(dim=1) if pos_largest else pos_vals.min(dim=1)
        neg_values, neg_cols = neg_vals.min(dim=1) if pos_largest else neg_vals.max(dim=1)
        rows = torch.where((pos_values != pos_fill) & (neg_values != neg_fill))[0]
        for part, found in zip(parts, (rows + start, pos_cols[rows], neg_cols[rows]), strict=True):
            part.append(found)
    if not parts[0]:  # an empty batch
        return empty_triplets(batch.embeddings.device)
    a, p, n = (torch.cat(part) for part in parts)
    return a, p, n


class BatchHardMiner(BatchEasyHardMiner):
    """For every anchor with a positive and a negative, the triplet of its farthest positive and
    its closest negative ("batch hard").

    Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person Re-Identification", 2017.
    As in PML, ``allowed_pos_range``/``allowed_neg_range`` (``(low, high)``) restrict the
    candidates.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> ``(a, p, n)``, at most ``B`` each, int64.
    """

    def __init__(
        self,
        allowed_pos_range: tuple[float, float] | None = None,
        allowed_neg_range: tuple[float, float] | None = None,
        *,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(
            pos_strategy=HARD,
            neg_strategy=HARD,
            allowed_pos_range=allowed_pos_range,
            allowed_neg_range=allowed_neg_range,
            distance=distance,
        )

    def mine_batch(self, batch: Batch) -> IndicesTuple:
        kind = fused_matrix_kind(self.distance)
        if kind is None:
            return super().mine_batch(batch)
        with full_precision(batch.embeddings.device):
            return batch_hard_triplets_blockwise(
                kind, self.distance, batch, self.allowed_pos_range, self.allowed_neg_range
            )

    def mine(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, batch: Batch) -> Triplets:
        a, p, _, n = batch_easy_hard_pairs(
            mat,
            pos_mask,
            neg_mask,
            HARD,
            HARD,
            self.allowed_pos_range,
            self.allowed_neg_range,
            self.distance.is_inverted,
        )
        return a, p, n
