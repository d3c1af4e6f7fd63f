"""Miners: pick the informative pairs or triplets of a batch for a loss to train on.

A miner is called as in pytorch-metric-learning (PML 2.9.0)::

    indices_tuple = miner(embeddings, labels, ref_emb=None, ref_labels=None)
    loss = loss_fn(embeddings, labels, indices_tuple)

and returns int64 index tensors on the embeddings' device:

* triplet miners: ``(anchor, positive, negative)``;
* pair miners: ``(anchor1, positive, anchor2, negative)``.

Anchors index ``embeddings``; positives and negatives index ``ref_emb`` (the embeddings
themselves when no reference set is given, in which case a sample is never its own positive).

Every miner reads one ``(B, R)`` distance matrix, computed without autograd, and the boolean label
masks of :mod:`deepmetric._pairs`. Each is a plain function of that matrix and those masks (the
functional core, usable on its own) wrapped by a thin :class:`BaseMiner` subclass. Triplets are
enumerated one block of positive pairs at a time, never through a ``B×R×R`` cube.
:class:`PairMarginMiner` and :class:`BatchHardMiner` go further for the common distances: they
compute the matrix one block of rows at a time and never hold it, nor the masks, whole (see
:meth:`BaseMiner.mine_batch`); the result is the same.

Beyond PML, the pair miners take ``max_neg_per_pos``: keep at most that many negative pairs per
positive pair (the hardest ones), see :func:`cap_negative_pairs`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ._pairs import (
    CHUNK_ELEMENTS,
    pairs_from_masks,
    positive_pair_chunks,
    sample_in_rows,
    triplets_from_masks,
)
from .distances import BaseDistance, CosineSimilarity, LpDistance
from .losses._blockwise import (
    MatrixBlocks,
    MatrixKind,
    PairBlocks,
    closer_than,
    distances_,
    full_precision,
    fused_matrix_kind,
    normalized_inputs,
)
from .losses.base import Batch, prepare_batch

__all__ = [
    "BaseMiner",
    "BatchEasyHardMiner",
    "BatchHardMiner",
    "DistanceWeightedMiner",
    "MultiSimilarityMiner",
    "PairMarginMiner",
    "TripletMarginMiner",
    "cap_negative_pairs",
]

Triplets = tuple[Tensor, Tensor, Tensor]
Pairs = tuple[Tensor, Tensor, Tensor, Tensor]
IndicesTuple = Triplets | Pairs


def _empty_indices(n: int, device: torch.device) -> tuple[Tensor, ...]:
    return tuple(torch.empty(0, dtype=torch.long, device=device) for _ in range(n))


def _empty_triplets(device: torch.device) -> Triplets:
    a, p, n = _empty_indices(3, device)
    return a, p, n


def _empty_pairs(device: torch.device) -> Pairs:
    a1, p, a2, n = _empty_indices(4, device)
    return a1, p, a2, n


# ---------------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------------


class BaseMiner(nn.Module):
    """Base class of every miner: validation, the distance matrix, the label masks.

    ``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` takes ``(B, D)`` embeddings and
    ``(B,)`` integer labels (optionally an ``(R, D)`` reference set with ``(R,)`` labels) and
    returns a tuple of int64 index tensors. A subclass implements :meth:`mine`.

    Like PML, the miner records the size of its last output in ``num_triplets`` (triplet miners)
    or ``num_pos_pairs`` and ``num_neg_pairs`` (pair miners).

    Args:
        distance: the pairwise distance or similarity (keyword only; default per miner, usually
            ``LpDistance()``: Euclidean on L2-normalised embeddings).
    """

    def __init__(self, *, distance: BaseDistance | None = None) -> None:
        super().__init__()
        self.distance = self.get_default_distance() if distance is None else distance
        self.num_triplets = 0
        self.num_pos_pairs = 0
        self.num_neg_pairs = 0

    def get_default_distance(self) -> BaseDistance:
        return LpDistance()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> IndicesTuple:
        """``(B, D)``, ``(B,)`` [, ``(R, D)``, ``(R,)``] -> ``(a, p, n)`` or ``(a1, p, a2, n)``."""
        if labels is None:
            raise ValueError("miners need labels")
        batch = prepare_batch(embeddings, labels, None, ref_emb, ref_labels)
        with torch.no_grad():
            output = self.mine_batch(batch)
        if len(output) == 3:
            self.num_triplets = len(output[0])
        else:
            self.num_pos_pairs, self.num_neg_pairs = len(output[0]), len(output[2])
        return output

    def mine_batch(self, batch: Batch) -> IndicesTuple:
        """Mine a validated batch (gradients off): :meth:`mine` on the whole ``(B, R)`` matrix
        and label masks. A miner that can work one block of rows at a time overrides this."""
        mat = self.distance(batch.embeddings, None if batch.same_source else batch.ref_emb)
        pos_mask, neg_mask = batch.masks()
        return self.mine(mat, pos_mask, neg_mask, batch)

    def mine(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, batch: Batch) -> IndicesTuple:
        """Select from the ``(B, R)`` matrix and the boolean ``(B, R)`` label masks."""
        raise NotImplementedError


def _check_max_neg_per_pos(max_neg_per_pos: int | None) -> None:
    if max_neg_per_pos is None:
        return
    if isinstance(max_neg_per_pos, bool) or not isinstance(max_neg_per_pos, int):
        raise ValueError(f"max_neg_per_pos must be an int or None, got {max_neg_per_pos!r}")
    if max_neg_per_pos < 1:
        raise ValueError(f"max_neg_per_pos must be at least 1, got {max_neg_per_pos}")


def cap_negative_pairs(
    mat: Tensor, pairs: Pairs, max_neg_per_pos: int | None, is_inverted: bool
) -> Pairs:
    """Keep at most ``max_neg_per_pos`` negative pairs per positive pair: the hardest ones.

    Of the negative pairs ``(anchor2, negative)`` the ``min(max_neg_per_pos * #positive pairs,
    #negative pairs)`` closest are kept (smallest distance, or largest similarity when
    ``is_inverted``), in their original order; the positive pairs are untouched. For example
    ``max_neg_per_pos=3`` bounds a pair loss's negatives to a 3:1 ratio, which keeps the
    thousands of easy negatives of a large batch from drowning its few positives. With no
    positive pair, no negative pair is kept. ``None`` returns the pairs unchanged.

    Shapes: ``mat`` ``(B, R)``; each index tensor 1-D.
    """
    _check_max_neg_per_pos(max_neg_per_pos)
    if max_neg_per_pos is None:
        return pairs
    _, _, a2, n = pairs
    return _cap_negatives_by_distance(mat[a2, n], pairs, max_neg_per_pos, is_inverted)


def _cap_negatives_by_distance(
    neg_dists: Tensor, pairs: Pairs, max_neg_per_pos: int, is_inverted: bool
) -> Pairs:
    """:func:`cap_negative_pairs`, given the ``(N,)`` distances of the negative pairs."""
    a1, p, a2, n = pairs
    n_keep = min(max_neg_per_pos * len(a1), len(a2))
    if n_keep == len(a2):
        return pairs
    hardest = torch.topk(neg_dists, n_keep, largest=is_inverted, sorted=False).indices
    keep = torch.sort(hardest).values
    return a1, p, a2[keep], n[keep]


# ---------------------------------------------------------------------------------------------
# TripletMarginMiner
# ---------------------------------------------------------------------------------------------


def triplets_in_margin_band(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    low: float,
    high: float,
    distance: BaseDistance,
    max_elements: int = CHUNK_ELEMENTS,
) -> Triplets:
    """Every triplet whose margin ``m = d(a,n) - d(a,p)`` (``s(a,p) - s(a,n)`` for a similarity)
    satisfies ``low < m <= high``, with ``pos_mask[a, p]`` and ``neg_mask[a, n]``.

    Triplets come out in lexicographic ``(a, p, n)`` order. They are visited one block of
    positive pairs at a time, so memory is bounded by the output, a byte per positive pair and
    reference, and one ``(block, R)`` slice (:func:`~deepmetric._pairs.triplets_from_masks`).

    Shapes: ``mat``, ``pos_mask``, ``neg_mask`` ``(B, R)`` -> three ``(T,)`` int64 tensors.
    """

    def chunks() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for anchors, positives in positive_pair_chunks(pos_mask, mat.shape[1], max_elements):
            ap_dists = mat[anchors, positives].unsqueeze(1)  # (c, 1)
            triplet_margin = distance.margin(mat[anchors], ap_dists)  # (c, R)
            keep = neg_mask[anchors] & (triplet_margin > low) & (triplet_margin <= high)
            yield anchors, positives, keep

    return triplets_from_masks(chunks(), mat.device)


class TripletMarginMiner(BaseMiner):
    """Triplets selected by their margin ``m = d(a,n) - d(a,p)`` (``s(a,p) - s(a,n)`` for a
    similarity), as in PML:

    * ``"all"``: the triplets that violate the margin, ``m <= margin``;
    * ``"hard"``: of those, the ones whose negative is at least as close as the positive,
      ``m <= 0``;
    * ``"semihard"``: of those, the ones whose negative is farther than the positive, ``0 < m``;
    * ``"easy"``: the triplets that satisfy the margin, ``m > margin``.

    The semi-hard triplets are those of Schroff, Kalenichenko & Philbin, "FaceNet: A Unified
    Embedding for Face Recognition and Clustering", 2015. Defaults as in PML: ``margin=0.2``,
    ``type_of_triplets="all"``, ``LpDistance()``.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> ``(a, p, n)``, each ``(T,)`` int64, in
    lexicographic order. Memory is ``O(B·R)`` plus the output: no ``B×R×R`` cube.
    """

    TRIPLET_TYPES = ("all", "hard", "semihard", "easy")

    def __init__(
        self,
        margin: float = 0.2,
        type_of_triplets: str = "all",
        *,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance=distance)
        if type_of_triplets not in self.TRIPLET_TYPES:
            raise ValueError(
                f"type_of_triplets must be one of {self.TRIPLET_TYPES}, got {type_of_triplets!r}"
            )
        self.margin = margin
        self.type_of_triplets = type_of_triplets

    def margin_band(self) -> tuple[float, float]:
        """The ``(low, high]`` interval of triplet margins that ``type_of_triplets`` selects."""
        bands = {
            "all": (-math.inf, self.margin),
            "hard": (-math.inf, min(self.margin, 0.0)),
            "semihard": (0.0, self.margin),
            "easy": (self.margin, math.inf),
        }
        return bands[self.type_of_triplets]

    def mine(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, batch: Batch) -> Triplets:
        low, high = self.margin_band()
        return triplets_in_margin_band(mat, pos_mask, neg_mask, low, high, self.distance)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, type_of_triplets={self.type_of_triplets!r}"


# ---------------------------------------------------------------------------------------------
# BatchEasyHardMiner and BatchHardMiner
# ---------------------------------------------------------------------------------------------

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
        _check_max_neg_per_pos(max_neg_per_pos)
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
    ``kind``, see :func:`~deepmetric.losses._blockwise.fused_matrix_kind`), computed one block of
    rows at a time from the embeddings: neither the whole matrix nor the label masks are built.
    Ties are broken as :func:`pick_per_row` breaks them.

    Shapes: three ``(T,)`` int64 tensors, ``T <= B``, by anchor.
    """
    if len(batch.ref_emb) == 0:
        return _empty_triplets(batch.embeddings.device)
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
        return _empty_triplets(batch.embeddings.device)
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


# ---------------------------------------------------------------------------------------------
# MultiSimilarityMiner
# ---------------------------------------------------------------------------------------------


def multi_similarity_pairs(
    mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, epsilon: float, is_inverted: bool
) -> Pairs:
    """The pairs of the multi-similarity miner (Wang et al., 2019), as in PML.

    A positive pair is kept when it is less than ``epsilon`` easier than the anchor's closest
    negative, a negative pair when it is less than ``epsilon`` easier than the anchor's farthest
    positive. For a similarity ``s``: ``s(a,p) - ε < max_n s(a,n)`` and
    ``s(a,n) + ε > min_p s(a,p)``; for a distance ``d``: ``d(a,p) + ε > min_n d(a,n)`` and
    ``d(a,n) - ε < max_p d(a,p)``. A batch without any positive pair or without any negative
    pair gives nothing.

    Shapes: ``mat``, masks ``(B, R)`` -> four 1-D int64 tensors, row-major.
    """
    if not bool(pos_mask.any()) or not bool(neg_mask.any()):
        return _empty_pairs(mat.device)
    # the closest negative and the farthest positive of each row (±inf where a row has none)
    inf = math.inf
    if is_inverted:
        closest_neg = mat.masked_fill(~neg_mask, -inf).amax(dim=1, keepdim=True)
        farthest_pos = mat.masked_fill(~pos_mask, inf).amin(dim=1, keepdim=True)
        hard_pos = pos_mask & (mat - epsilon < closest_neg)
        hard_neg = neg_mask & (mat + epsilon > farthest_pos)
    else:
        closest_neg = mat.masked_fill(~neg_mask, inf).amin(dim=1, keepdim=True)
        farthest_pos = mat.masked_fill(~pos_mask, -inf).amax(dim=1, keepdim=True)
        hard_pos = pos_mask & (mat + epsilon > closest_neg)
        hard_neg = neg_mask & (mat - epsilon < farthest_pos)
    return pairs_from_masks(hard_pos, hard_neg)


class MultiSimilarityMiner(BaseMiner):
    """Positive pairs harder than the anchor's easiest-to-confuse negative, and negative pairs
    harder than its least similar positive, each with slack ``epsilon``.

    Wang, Han, Huang, Dong & Scott, "Multi-Similarity Loss with General Pair Weighting for Deep
    Metric Learning", 2019. Defaults as in PML: ``epsilon=0.1``, ``CosineSimilarity()``. See
    :func:`multi_similarity_pairs` for the exact rule. Beyond PML, ``max_neg_per_pos`` caps the
    negatives at that many per positive pair, keeping the hardest (:func:`cap_negative_pairs`).

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> ``(a1, p, a2, n)``, 1-D int64.
    """

    def __init__(
        self,
        epsilon: float = 0.1,
        *,
        max_neg_per_pos: int | None = None,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance=distance)
        _check_max_neg_per_pos(max_neg_per_pos)
        self.epsilon = epsilon
        self.max_neg_per_pos = max_neg_per_pos

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def mine(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, batch: Batch) -> Pairs:
        inverted = self.distance.is_inverted
        pairs = multi_similarity_pairs(mat, pos_mask, neg_mask, self.epsilon, inverted)
        return cap_negative_pairs(mat, pairs, self.max_neg_per_pos, inverted)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


# ---------------------------------------------------------------------------------------------
# PairMarginMiner
# ---------------------------------------------------------------------------------------------


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
    :func:`~deepmetric.losses._blockwise.fused_matrix_kind`), computed one block of rows at a
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
        return _empty_pairs(query.device), query.new_empty(0)
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
        _check_max_neg_per_pos(max_neg_per_pos)
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
        return _cap_negatives_by_distance(
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


# ---------------------------------------------------------------------------------------------
# DistanceWeightedMiner
# ---------------------------------------------------------------------------------------------


def distance_weighted_negative_weights(
    mat: Tensor, neg_mask: Tensor, dim: int, cutoff: float, nonzero_loss_cutoff: float
) -> Tensor:
    """Unnormalised sampling weights of the negatives, ``1 / q(max(d, cutoff))``.

    ``q(d) ∝ d^(n-2) (1 - d²/4)^((n-3)/2)`` is the density of the distance between two points
    drawn uniformly on the unit sphere of ``R^n`` (Wu et al., 2017, Sec. 4), ``n = dim``.
    Weights are zero off ``neg_mask``, where ``max(d, cutoff) >= nonzero_loss_cutoff``, and
    where ``q`` is not finite and positive (``d >= 2``). Each row is scaled so that its largest
    weight is 1.

    Shapes: ``mat`` (Euclidean distances of unit vectors), ``neg_mask`` ``(B, R)`` -> ``(B, R)``.
    """
    if mat.shape[1] == 0:
        return torch.zeros_like(mat)
    clamped = mat.clamp_min(cutoff)
    log_weights = (2.0 - dim) * torch.log(clamped) - ((dim - 3) / 2) * torch.log(
        1.0 - 0.25 * clamped**2
    )
    eligible = neg_mask & (clamped < nonzero_loss_cutoff) & torch.isfinite(log_weights)
    log_weights = log_weights.masked_fill(~eligible, -math.inf)
    row_max = log_weights.amax(dim=1, keepdim=True)
    row_max = row_max.masked_fill(~torch.isfinite(row_max), 0.0)  # rows without any candidate
    return torch.exp(log_weights - row_max)


def distance_weighted_triplets(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    dim: int,
    cutoff: float,
    nonzero_loss_cutoff: float,
    same_source: bool,
    generator: torch.Generator | None = None,
) -> Triplets:
    """Random triplets whose negatives are drawn with :func:`distance_weighted_negative_weights`.

    As in PML, every anchor with a positive and a negative of nonzero weight gets as many
    triplets as its class has reference samples (the anchor included when the references are
    the queries), each with a uniformly random positive and a weighted random negative, both drawn
    with replacement.

    Shapes: ``mat``, masks ``(B, R)`` -> three ``(T,)`` int64 tensors, grouped by anchor.
    """
    weights = distance_weighted_negative_weights(mat, neg_mask, dim, cutoff, nonzero_loss_cutoff)
    anchors = torch.where(pos_mask.any(dim=1) & (weights > 0).any(dim=1))[0]
    if len(anchors) == 0:
        return _empty_triplets(mat.device)
    per_anchor = pos_mask[anchors].sum(dim=1) + int(same_source)
    a = anchors.repeat_interleave(per_anchor)
    p = sample_in_rows(pos_mask, a, generator)
    # draw the most any anchor needs, then keep each anchor's first `per_anchor` draws
    most = int(per_anchor.max())
    draws = torch.multinomial(weights[anchors], most, replacement=True, generator=generator)
    wanted = torch.arange(most, device=mat.device).unsqueeze(0) < per_anchor.unsqueeze(1)
    return a, p, draws[wanted]


class DistanceWeightedMiner(BaseMiner):
    """Random triplets whose negatives are sampled with weight inverse to the density of
    distances on the unit sphere, so that all distances are represented, not just the
    concentrated ones around ``√2``.

    Wu, Manmatha, Smola & Krähenbühl, "Sampling Matters in Deep Embedding Learning", 2017.
    Defaults as in PML: ``cutoff=0.5`` (distances below it are weighted as ``cutoff``, against
    the high variance of near points), ``nonzero_loss_cutoff=1.4`` (negatives at or beyond it are
    never drawn). The distance must be ``LpDistance(p=2, power=1, normalize_embeddings=True)``.
    See :func:`distance_weighted_triplets` for how many triplets each anchor gets.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> ``(a, p, n)``, 1-D int64.
    """

    def __init__(
        self,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        *,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance=distance)
        d = self.distance
        if not (isinstance(d, LpDistance) and d.p == 2 and d.power == 1 and d.normalize_embeddings):
            raise ValueError(
                "DistanceWeightedMiner requires LpDistance(p=2, power=1, "
                f"normalize_embeddings=True), got {d!r}"
            )
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = float(nonzero_loss_cutoff)

    def mine(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, batch: Batch) -> Triplets:
        return distance_weighted_triplets(
            mat,
            pos_mask,
            neg_mask,
            batch.embeddings.shape[1],
            self.cutoff,
            self.nonzero_loss_cutoff,
            batch.same_source,
        )

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, nonzero_loss_cutoff={self.nonzero_loss_cutoff}"
