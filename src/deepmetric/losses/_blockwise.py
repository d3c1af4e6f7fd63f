"""Matrix-based pair losses and miners one block of rows at a time, with closed-form gradients.

The losses that read every entry of the ``(B, R)`` distance matrix (multi-similarity, circle,
generalised lifted structure, ranked list, contrastive) are, written with autograd, a dozen
elementwise operations on that matrix, each allocating a new ``(B, R)`` tensor that autograd keeps
until the backward pass. Here a loss supplies a *row rule*: a plain function from one block of
rows of the matrix (a :class:`RowBlock`) to the losses of those rows **and** their gradient with
respect to the block, in closed form. :func:`blockwise_row_losses` runs the rule over blocks of
rows small enough to stay in the CPU cache, computing each block of the matrix from the
embeddings on the fly (:class:`MatrixBlocks`), and keeps a single ``(B, R)`` matrix for the
backward pass: the gradient, already divided by the distance (what the embeddings' gradient is
made of). The backward pass turns it into the embeddings' gradient with matrix products, again
block by block. (The contrastive loss, a sum over pairs, goes further and needs no ``(B, R)``
matrix at all: see :mod:`deepmetric.losses.contrastive`.)

The positive pairs of a row are few (``K - 1`` in a P×K batch), so a rule gets them as a list of
entries; the negatives, nearly the whole row, implicitly (:meth:`RowBlock.fill_non_negatives_`).
Nothing of size ``(B, R)`` is built from the labels (:class:`PairBlocks`).

This fast path covers the distances whose matrix is one matrix product (see
:func:`fused_matrix_kind`): Euclidean (``LpDistance(p=2)``, ``power`` 1 or 2) and inner products
(``CosineSimilarity``, ``DotProductSimilarity``, ``power=1``). With any other distance a loss uses
its general autograd path, which gives the same values. The same blocks serve the miners that
scan the whole matrix, and :func:`pair_distances` computes the distances of a miner's few pairs
without the matrix. The gradients are first-order only: a backward pass that builds a graph for a
second derivative (``create_graph=True``) raises an error rather than return a wrong one.
"""

from __future__ import annotations

import enum
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .._pairs import to_pairs
from ..distances import (
    BaseDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    _to_float32,
)
from ._logsumexp import at_most_one_pair_each
from .base import Batch

# Entries of one block of rows on the CPU, per thread: 2**17 float32 entries (512 KiB) stay in a
# core's L2 cache, and are small enough for malloc to hand the same memory back block after block
# (a fresh page costs a page fault, which on a virtual machine can cost more than the arithmetic
# on it). Each thread takes its share of every operation: the block grows with the threads.
BLOCK_ELEMENTS = 1 << 17
# On an accelerator, where each operation is a kernel launch, blocks are as large as memory
# comfortably allows (the whole matrix up to B = R = 4096).
ACCELERATOR_BLOCK_ELEMENTS = 1 << 24


def row_blocks(n_rows: int, n_cols: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the successive blocks of rows of an ``(n_rows, n_cols)`` matrix on
    ``device``: on the CPU as few blocks of equal height as hold at most ``BLOCK_ELEMENTS`` per
    thread each, on an accelerator blocks of ``ACCELERATOR_BLOCK_ELEMENTS`` entries; at least
    one row."""
    n_cols = max(1, n_cols)
    if device.type != "cpu":
        step = ACCELERATOR_BLOCK_ELEMENTS // n_cols
    else:
        per_block = BLOCK_ELEMENTS * max(1, torch.get_num_threads())
        n_blocks = -(-n_rows * n_cols // per_block)
        step = -(-n_rows // max(1, n_blocks))
    step = max(1, step)
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def first_order_only() -> None:
    """Raise ``RuntimeError`` inside a hand-written backward pass that is asked to build a graph
    (``create_graph=True``, for a second derivative): its gradient is computed from values saved
    without one, so a second derivative through it would be silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "deepmetric's fast paths for the matrix-based pair losses give first derivatives "
            "only (create_graph=True is not supported); for second derivatives use a distance "
            "they do not take, e.g. a subclass of the distance"
        )


def full_precision(device: torch.device) -> torch.autocast:
    """Autocast off: the fast paths compute in the precision of their inputs (float32 for half
    precision embeddings, see :func:`as_compared`), as the distances do."""
    return torch.autocast(device.type, enabled=False)


# -- the distance matrix, a block at a time ------------------------------------------------------


class MatrixKind(enum.Enum):
    """How a fusable distance computes its matrix from (normalised) embeddings."""

    EUCLIDEAN = "||q - r||"
    SQUARED_EUCLIDEAN = "||q - r||^2"
    INNER_PRODUCT = "q . r"


def fused_matrix_kind(distance: BaseDistance) -> MatrixKind | None:
    """The :class:`MatrixKind` of ``distance``, or ``None`` when the blockwise path cannot compute
    it (another ``p`` or ``power``, or a subclass that may compute its matrix differently)."""
    if type(distance) is LpDistance and distance.p == 2:
        if distance.power == 1:
            return MatrixKind.EUCLIDEAN
        if distance.power == 2:
            return MatrixKind.SQUARED_EUCLIDEAN
        return None
    if type(distance) in (CosineSimilarity, DotProductSimilarity) and distance.power == 1:
        return MatrixKind.INNER_PRODUCT
    return None


def as_compared(distance: BaseDistance, embeddings: Tensor) -> Tensor:
    """``(N, D)`` embeddings as ``distance`` compares them (through autograd): float32 for half
    precision, normalised if the distance normalises. No validation: for inputs already
    checked (e.g. by :func:`~deepmetric.losses.base.prepare_batch`)."""
    with torch.autocast(embeddings.device.type, enabled=False):
        return distance.maybe_normalize(_to_float32(embeddings))


def normalized_inputs(distance: BaseDistance, batch: Batch) -> tuple[Tensor, Tensor]:
    """The embeddings and reference embeddings of ``batch`` as ``distance`` compares them (see
    :func:`as_compared`). With no separate reference set the two are the same tensor."""
    query = as_compared(distance, batch.embeddings)
    return query, query if batch.same_source else as_compared(distance, batch.ref_emb)


# One pair's distance computed on its own (gathering two rows, and scattering their gradient)
# costs about as much as this many entries of the whole matrix (measured on CPU, B = 512 and 2048,
# forward and backward through a loss).
PAIR_COST_IN_ENTRIES = 32


def few_pairs(batch: Batch, n_pairs: int) -> bool:
    """Whether the distances of ``n_pairs`` listed pairs are cheaper to compute one by one (see
    :func:`pair_distances`) than as the whole ``(B, R)`` matrix."""
    return n_pairs * PAIR_COST_IN_ENTRIES <= len(batch.embeddings) * len(batch.ref_emb)


class MatrixBlocks:
    """The ``(B, R)`` matrix of a :class:`MatrixKind` between ``(B, D)`` queries and ``(R, D)``
    references (as :func:`normalized_inputs` gives them), one block of rows at a time.

    When the references are the queries (``same_source``), a sample's Euclidean distance to
    itself is exactly 0.
    """

    def __init__(self, kind: MatrixKind, query: Tensor, ref: Tensor, same_source: bool) -> None:
        self.kind = kind
        self.query = query
        self.ref = ref
        self.same_source = same_source
        # (1, R) squared norms of the references, for the Euclidean kinds
        self.ref_sq = None if kind is MatrixKind.INNER_PRODUCT else (ref * ref).sum(1)[None]
        self._buffer: Tensor | None = None

    def bounds(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of each block of rows (see :func:`row_blocks`)."""
        return row_blocks(len(self.query), len(self.ref), self.query.device)

    def rows(self, start: int, stop: int, root: bool = True) -> Tensor:
        """Rows ``start:stop`` of the matrix, ``(stop - start, R)``, written into the same memory
        block after block (fresh memory costs page faults): the caller keeps nothing of the
        returned tensor beyond the current block. For ``root`` see :meth:`tile`."""
        return self.tile(start, stop, 0, len(self.ref), root)

    def tile(self, r0: int, r1: int, c0: int, c1: int, root: bool = True) -> Tensor:
        """Entries ``[r0:r1, c0:c1]`` of the matrix, in the same reused memory as :meth:`rows`
        (the first request must be the largest). ``root=False`` leaves a Euclidean matrix
        squared (see :func:`root_bound` and :func:`distances_`)."""
        query, ref = self.query[r0:r1], self.ref[c0:c1]
        size = len(query) * len(ref)
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = self.query.new_empty(size)
        out = self._buffer[:size].view(len(query), len(ref))
        if self.ref_sq is None:
            return torch.mm(query, ref.t(), out=out)
        # |r|² - 2 q·r + |q|² (distances.euclidean_matrix: the same up to rounding)
        mat = torch.addmm(self.ref_sq[:, c0:c1], query, ref.t(), alpha=-2.0, out=out)
        mat.add_((query * query).sum(dim=1, keepdim=True)).clamp_min_(0)
        if self.same_source:  # a sample's distance to itself: entries with r0 + i == c0 + j
            mat.diagonal(offset=r0 - c0).fill_(0)
        return distances_(self.kind, mat) if root else mat


def distances_(kind: MatrixKind, compared: Tensor) -> Tensor:
    """The entries of a matrix of ``kind`` from :meth:`MatrixBlocks.tile` with ``root=False``
    (their squares, for :attr:`MatrixKind.EUCLIDEAN`), in place."""
    return compared.sqrt_() if kind is MatrixKind.EUCLIDEAN else compared


def closer_than(kind: MatrixKind, compared: Tensor, margin: float, inverted: bool) -> Tensor:
    """The boolean mask of the entries of a block from :meth:`MatrixBlocks.tile` with
    ``root=False`` that are closer than ``margin``: a distance below it, or a similarity
    (``inverted``) above it. A Euclidean block is compared while still squared
    (:func:`root_bound`: the same entries)."""
    if inverted:
        return compared > margin
    if kind is MatrixKind.EUCLIDEAN:
        return compared < root_bound(margin, compared.dtype)
    return compared < margin


@functools.lru_cache(maxsize=64)
def root_bound(bound: float, dtype: torch.dtype) -> float:
    """The least ``x`` of ``dtype`` whose square root (rounded to ``dtype``) is at least
    ``bound`` (rounded to ``dtype``, as a comparison with a tensor of that type rounds it): for
    every ``x >= 0`` of ``dtype``, ``sqrt(x) < bound`` exactly when ``x < root_bound(bound)``.
    A Euclidean matrix is compared with a margin while still squared, and only the entries
    that pass get their square root; the outcome is the same, bit for bit."""
    target = torch.tensor(bound, dtype=dtype)
    if not bool(target > 0):  # every root is >= 0 (and nothing compares with NaN)
        return 0.0 if bool(target <= 0) else bound
    x = target * target
    inf = torch.tensor(math.inf, dtype=dtype)
    while bool(torch.sqrt(x) >= target):  # rounding may have overshot: step down ...
        x = torch.nextafter(x, -inf)
    while bool(torch.sqrt(x) < target):  # ... then up to the least x that passes
        x = torch.nextafter(x, inf)
    return float(x)


def embedding_weight_(kind: MatrixKind, grad_mat: Tensor, mat: Tensor) -> Tensor:
    """Turn ``d loss / d mat`` into the weight ``w`` the embeddings' gradient is made of (see
    :class:`_BlockwiseRowLosses`), in place: ``g / d`` for a distance ``d`` (0 where ``d = 0``:
    the gradient of a zero distance is zero), ``2 g`` for a squared distance, ``g`` for an inner
    product."""
    if kind is MatrixKind.EUCLIDEAN:
        # g / 0 is ±inf or NaN: exactly the entries to zero (g is finite, d > 0 elsewhere)
        return grad_mat.div_(mat).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if kind is MatrixKind.SQUARED_EUCLIDEAN:
        return grad_mat.mul_(2.0)
    return grad_mat


def embedding_grads(
    kind: MatrixKind,
    query: Tensor,
    ref: Tensor,
    weight: Tensor,
    row_scale: Tensor,
    same_source: bool,
    need: tuple[bool, bool],
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of ``Σ_ij v_ij m_ij`` with respect to the queries and the references, where
    ``m`` is the matrix of ``kind`` and ``v_ij = row_scale_i w_ij`` (``w`` from
    :func:`embedding_weight_`):

    * Euclidean kinds: ``∂/∂q_i = Σ_j v_ij (q_i - r_j)``, ``∂/∂r_j = Σ_i v_ij (r_j - q_i)``;
    * inner product: ``∂/∂q_i = Σ_j v_ij r_j``, ``∂/∂r_j = Σ_i v_ij q_i``.

    When the references are the queries (``same_source``) both roles are one gradient, returned
    first: one matrix product with ``s = v + vᵀ`` instead of one per role.

    Shapes: ``query`` ``(B, D)``, ``ref`` ``(R, D)``, ``weight`` ``(B, R)``, ``row_scale``
    ``(B,)``; ``need`` says which gradients to compute.
    """
    euclidean = kind is not MatrixKind.INNER_PRODUCT
    scale = row_scale.unsqueeze(1)
    if same_source:
        grad = torch.empty_like(query)
        for start, stop in row_blocks(len(query), len(ref), query.device):
            s = weight[start:stop] * scale[start:stop]
            s += (weight[:, start:stop] * scale).t()
            block = torch.mm(s, query, out=grad[start:stop])
            if euclidean:
                block.neg_().addcmul_(s.sum(dim=1, keepdim=True), query[start:stop])
        return grad, None
    grad_query = torch.empty_like(query) if need[0] else None
    grad_ref = torch.zeros_like(ref) if need[1] else None
    col_sums = ref.new_zeros(len(ref))
    for start, stop in row_blocks(len(query), len(ref), query.device):
        v = weight[start:stop] * scale[start:stop]
        if grad_query is not None:
            block = torch.mm(v, ref, out=grad_query[start:stop])
            if euclidean:
                block.neg_().addcmul_(v.sum(dim=1, keepdim=True), query[start:stop])
        if grad_ref is not None:
            grad_ref.addmm_(v.t(), query[start:stop], alpha=-1.0 if euclidean else 1.0)
            if euclidean:
                col_sums += v.sum(dim=0)
    if grad_ref is not None and euclidean:
        grad_ref.addcmul_(col_sums.unsqueeze(1), ref)
    return grad_query, grad_ref


def add_block_embedding_grads_(
    kind: MatrixKind,
    query: Tensor,
    ref: Tensor,
    start: int,
    weight: Tensor,
    grad_query: Tensor | None,
    grad_ref: Tensor | None,
    symmetric: bool = False,
) -> None:
    """Add the gradient of ``Σ_ij w_ij m_ij`` over the rows ``start:start + c`` of the matrix,
    ``w`` being their ``(c, R)`` weight (:func:`embedding_weight_`), with the formulas of
    :func:`embedding_grads`. When the references are the queries, pass the one gradient as both
    ``grad_query`` and ``grad_ref``; if moreover the whole weight matrix is symmetric
    (``symmetric``), both roles of these rows are added to ``grad_query`` at once, with one
    matrix product: ``2 Σ_j w_ij (x_i - x_j)`` (or ``2 Σ_j w_ij x_j``).
    """
    query_block = query[start : start + len(weight)]
    euclidean = kind is not MatrixKind.INNER_PRODUCT
    if grad_query is not None:
        scale = 2.0 if symmetric else 1.0
        block = grad_query[start : start + len(weight)]
        if euclidean:
            block.addmm_(weight, ref, alpha=-scale)
            block.addcmul_(weight.sum(dim=1, keepdim=True), query_block, value=scale)
        else:
            block.addmm_(weight, ref, alpha=scale)
    if grad_ref is not None and not symmetric:
        if euclidean:
            grad_ref.addmm_(weight.t(), query_block, alpha=-1.0)
            grad_ref.addcmul_(weight.sum(dim=0).unsqueeze(1), ref)
        else:
            grad_ref.addmm_(weight.t(), query_block)


# -- the pairs, a block at a time -----------------------------------------------------------------


class RowBlock:
    """Rows ``start:stop`` of a batch's matrix and of its pairs, as a row rule reads them.

    ``mat`` holds the ``(c, R)`` rows of the matrix; ``pos_rows``/``pos_cols`` list the ``(P,)``
    positive pairs among them in row-major order, counted within ``mat``; the negative pairs are
    every other entry whose labels differ, see :meth:`fill_non_negatives_`. A rule must not
    modify these tensors.

    ``diagonal`` is the offset in ``mat`` of the entries that pair a sample with itself (``None``
    with a separate reference set); ``self_rows``/``self_cols`` list the entries that pair a
    query with its own copy in a separate reference set (same label, so neither a positive nor
    a negative); ``neg_mask`` is the ``(c, R)`` boolean mask of the negatives when they are not
    the labels' (a miner's pairs, or overridden masks).
    """

    def __init__(
        self,
        mat: Tensor,
        pos_rows: Tensor,
        pos_cols: Tensor,
        diagonal: int | None,
        neg_mask: Tensor | None,
        self_rows: Tensor | None = None,
        self_cols: Tensor | None = None,
    ) -> None:
        self.mat = mat
        self.pos_rows = pos_rows
        self.pos_cols = pos_cols
        self._diagonal = diagonal
        self._neg_mask = neg_mask
        self._self_rows = self_rows
        self._self_cols = self_cols

    def fill_non_negatives_(self, x: Tensor, value: float) -> Tensor:
        """Set the ``(c, R)`` tensor ``x`` (finite values) to ``value`` wherever the entry is not a
        negative pair, in place; return ``x``. From labels that is the positive pairs, the
        diagonal and the queries' own copies: a few writes, no ``(c, R)`` mask."""
        if self._neg_mask is not None:
            if value == 0 and x.is_floating_point():
                # multiplying (finite values) by 0/1 bytes is much faster than a masked fill
                return x.mul_(self._neg_mask.view(torch.uint8))
            return x.masked_fill_(~self._neg_mask, value)
        x[self.pos_rows, self.pos_cols] = value
        if self._diagonal is not None:
            x.diagonal(offset=self._diagonal).fill_(value)
        if self._self_rows is not None and self._self_cols is not None:
            x[self._self_rows, self._self_cols] = value
        return x


class PairBlocks:
    """A batch's positive pairs (a list) and negative pairs, served by blocks of rows.

    From labels nothing of size ``(B, R)`` is built: the positive pairs come from sorting the
    reference labels, less each query's pair with its own copy (``batch.self_index``), and a pair
    is negative unless it is positive, on the diagonal or such a copy. Otherwise (a miner's
    tuple, or a batch whose ``masks`` are overridden) the batch's ``(B, R)`` masks are built
    first (a repeated pair counts once).

    Shapes: ``pos_rows``, ``pos_cols`` ``(P,)`` int64, row-major.
    """

    def __init__(self, batch: Batch) -> None:
        self.n_query, self.n_ref = len(batch.embeddings), len(batch.ref_emb)
        self.same_source = batch.same_source
        self.neg_mask: Tensor | None = None
        # entries pairing a query with its own copy among separate references (batch.self_index)
        self.self_rows: Tensor | None = None
        self.self_cols: Tensor | None = None
        self.self_offsets: list[int] = []
        if batch.indices_tuple is not None or type(batch).masks is not Batch.masks:
            pos_mask, self.neg_mask = batch.masks()
            self.pos_rows, self.pos_cols = torch.where(pos_mask)
            # a pair listed as both: read at the positives, not by a second (B, R) mask
            self.contradicting = bool(self.neg_mask[self.pos_rows, self.pos_cols].any())
            self.n_neg = int(self.neg_mask.sum())
            counts = torch.bincount(self.pos_rows, minlength=self.n_query)
        else:
            labels, ref_labels = batch.labels, batch.ref_labels
            assert labels is not None and ref_labels is not None
            self.contradicting = False
            self.pos_rows, self.pos_cols, counts = same_label_pairs(
                labels, ref_labels, batch.same_source
            )
            n_same = len(self.pos_rows) + (self.n_query if batch.same_source else 0)
            self.n_neg = self.n_query * self.n_ref - n_same
            if batch.self_index is not None:
                # a copy with the query's label: neither positive nor negative (one with
                # another label, which no caller makes, stays a negative, as in Batch.masks)
                rows, cols = batch.self_pairs()
                same = labels[rows] == ref_labels[cols]
                self.self_rows, self.self_cols = rows[same], cols[same]
                keep = self.pos_cols != batch.self_index[self.pos_rows]
                self.pos_rows, self.pos_cols = self.pos_rows[keep], self.pos_cols[keep]
                self_counts = torch.bincount(self.self_rows, minlength=self.n_query)
                self.self_offsets = [0, *torch.cumsum(self_counts, 0).tolist()]
                counts = torch.bincount(self.pos_rows, minlength=self.n_query)
        self.row_offsets = [0, *torch.cumsum(counts, 0).tolist()]

    @property
    def n_pos(self) -> int:
        return len(self.pos_rows)

    @property
    def symmetric(self) -> bool:
        """Whether ``(i, j)`` and ``(j, i)`` are always the same kind of pair: the pairs of the
        labels, with no separate reference set."""
        return self.same_source and self.neg_mask is None

    def block(self, mat: Tensor, start: int, stop: int) -> RowBlock:
        """The :class:`RowBlock` of rows ``start:stop``, whose matrix rows are ``mat``."""
        return self.tile(mat, start, stop, 0, self.n_ref)

    def tile(self, mat: Tensor, r0: int, r1: int, c0: int, c1: int) -> RowBlock:
        """The :class:`RowBlock` of the entries ``[r0:r1, c0:c1]``, held by ``mat`` (columns,
        like rows, counted from the tile's corner)."""
        corner = (r0, r1, c0, c1 if c0 > 0 or c1 < self.n_ref else None)
        rows, cols = _entries_in(self.pos_rows, self.pos_cols, self.row_offsets, *corner)
        neg_mask = None if self.neg_mask is None else self.neg_mask[r0:r1, c0:c1]
        self_rows = self_cols = None
        if self.self_rows is not None and self.self_cols is not None:
            self_rows, self_cols = _entries_in(
                self.self_rows, self.self_cols, self.self_offsets, *corner
            )
        diagonal = r0 - c0 if self.same_source else None
        return RowBlock(mat, rows, cols, diagonal, neg_mask, self_rows, self_cols)

    def tiles(self, device: torch.device) -> Iterator[tuple[int, int, int, int, bool]]:
        """``(r0, r1, c0, c1, mirrored)`` of the parts of the matrix a sum over all its pairs
        has to look at: blocks of whole rows (see :func:`row_blocks`), or, when the pairs are
        :attr:`symmetric` and the matrix wider than one tile on the CPU, only the square tiles
        on and above the diagonal, each ``mirrored`` one (off the diagonal) standing for its
        transpose too: about half the matrix (3 tiles of 4 at B=1024 with two threads, 10 of
        16 at 2048; measured 14% and 30% faster)."""
        n = self.n_query
        # a tile as large as a block of rows: smaller ones cost more in per-operation overhead
        # than the half of the matrix saves (measured at B=512: 3 tiles of 256² 5% slower than
        # 2 blocks of 256 × 512 rows)
        side = math.isqrt(BLOCK_ELEMENTS * max(1, torch.get_num_threads()))
        if not self.symmetric or device.type != "cpu" or n <= side:
            for start, stop in row_blocks(n, self.n_ref, device):
                yield start, stop, 0, self.n_ref, False
            return
        for r0 in range(0, n, side):
            for c0 in range(r0, n, side):
                yield r0, min(r0 + side, n), c0, min(c0 + side, n), c0 != r0


def _entries_in(
    rows: Tensor, cols: Tensor, row_offsets: list[int], r0: int, r1: int, c0: int, c1: int | None
) -> tuple[Tensor, Tensor]:
    """The entries of a row-major list (``row_offsets[i]``: where row ``i`` starts) that lie in
    rows ``[r0, r1)`` and, unless ``c1`` is ``None`` (whole rows), columns ``[c0, c1)``; counted
    from the corner ``(r0, c0)``."""
    first, last = row_offsets[r0], row_offsets[r1]
    rows, cols = rows[first:last] - r0, cols[first:last]
    if c1 is None:
        return rows, cols
    keep = (cols >= c0) & (cols < c1)
    return rows[keep], cols[keep] - c0


def pairs_are_the_labels(batch: Batch) -> bool:
    """True when a batch's pairs are exactly those its labels define: no miner tuple, no
    query's own copy among the references to leave out (``self_index``), and
    :meth:`~deepmetric.losses.base.Batch.masks` not overridden. Then the pairs can come from the
    labels alone."""
    return (
        batch.indices_tuple is None
        and batch.self_index is None
        and type(batch).masks is Batch.masks
    )


def same_label_pairs(
    labels: Tensor, ref_labels: Tensor, same_source: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Every ``(i, j)`` with ``labels[i] == ref_labels[j]`` (and ``i != j`` when the references
    are the queries), in row-major order, without comparing all ``B × R`` pairs; and how many
    each row has.

    The references sorted by label (stably: equal labels keep ascending columns) hold row
    ``i``'s pairs as one run; a query among its own references skips its own place in the run.

    Shapes: ``(B,)``, ``(R,)`` -> two ``(P,)`` int64 tensors and the ``(B,)`` counts.
    """
    order = torch.argsort(ref_labels, stable=True)
    sorted_ref = ref_labels.index_select(0, order)
    first = torch.searchsorted(sorted_ref, labels)
    count = torch.searchsorted(sorted_ref, labels, right=True) - first
    if same_source:
        count -= 1  # every label's run holds the query itself
    total = int(count.sum())
    row_index = torch.arange(len(labels), device=labels.device)
    rows = torch.repeat_interleave(row_index, count, output_size=total)
    # the k-th pair of row i is entry first[i] + k of its run (past its own place if reached)
    # (index_select: a much cheaper gather than indexing with a tensor, on the CPU)
    run_offset = first.sub_(torch.cumsum(count, 0).sub_(count)).index_select(0, rows)
    place = torch.arange(total, device=labels.device).add_(run_offset)
    if same_source:
        own_place = torch.empty_like(order).scatter_(0, order, row_index)
        place += place >= own_place.index_select(0, rows)
    return rows, order.index_select(0, place), count


def pair_blocks_to_learn_from(batch: Batch) -> PairBlocks | None:
    """The :class:`PairBlocks` of a batch, or ``None`` when PML's rule says there is nothing to
    learn from: at most one positive and at most one negative pair (a miner's tuple counted as
    given, a repeated pair twice)."""
    if batch.indices_tuple is not None:
        a1, _, a2, _ = to_pairs(batch.indices_tuple)
        if at_most_one_pair_each(len(a1), len(a2)):
            return None
        return PairBlocks(batch)
    pairs = PairBlocks(batch)
    return None if at_most_one_pair_each(pairs.n_pos, pairs.n_neg) else pairs


# -- row losses ---------------------------------------------------------------------------------

# RowBlock -> ((c,) losses of its rows, (c, R) gradient of those losses with respect to its mat)
RowRule = Callable[[RowBlock], tuple[Tensor, Tensor]]


class _BlockwiseRowLosses(torch.autograd.Function):
    """``(B, D)`` queries and ``(R, D)`` references -> ``(B,)`` per-row losses of ``rule``; the
    forward pass keeps the ``(B, R)`` weight of :func:`embedding_weight_` for the backward pass
    (:func:`embedding_grads` with the incoming gradient as row scale)."""

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        ref: Tensor,
        pairs: PairBlocks,
        kind: MatrixKind,
        rule: RowRule,
        need_grad: bool,
    ) -> Tensor:
        losses = query.new_empty(len(query))
        weight = query.new_empty(len(query), len(ref)) if need_grad else None
        matrix = MatrixBlocks(kind, query, ref, pairs.same_source)
        for start, stop in matrix.bounds():
            mat = matrix.rows(start, stop)
            block_losses, grad_mat = rule(pairs.block(mat, start, stop))
            losses[start:stop] = block_losses
            if weight is not None:
                weight[start:stop] = embedding_weight_(kind, grad_mat, mat)
        ctx.kind, ctx.same_source = kind, pairs.same_source
        ctx.save_for_backward(query, ref, weight)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        first_order_only()
        query, ref, weight = ctx.saved_tensors
        with full_precision(query.device):
            grads = embedding_grads(
                ctx.kind, query, ref, weight, grad_losses, ctx.same_source, ctx.needs_input_grad[:2]
            )
        return *grads, None, None, None, None


def blockwise_row_losses(
    batch: Batch, distance: BaseDistance, rule: RowRule, pairs: PairBlocks
) -> Tensor | None:
    """Per-query losses ``(B,)`` of ``rule`` over the ``distance`` matrix of ``batch``, one block
    of rows at a time, with the gradient that ``rule`` states; ``None`` when ``distance`` is not
    one the blockwise path computes (:func:`fused_matrix_kind`): then use the general path.

    ``rule`` receives each :class:`RowBlock` and returns the ``(c,)`` losses of its rows and
    their ``(c, R)`` gradient with respect to its ``mat``; a row's loss may depend on that row
    only.
    """
    kind = fused_matrix_kind(distance)
    if kind is None:
        return None
    query, ref = normalized_inputs(distance, batch)
    need_grad = torch.is_grad_enabled() and (query.requires_grad or ref.requires_grad)
    with full_precision(query.device):
        losses = _BlockwiseRowLosses.apply(query, ref, pairs, kind, rule, need_grad)
    assert isinstance(losses, Tensor)
    return losses


# -- log-sum-exp with its gradient --------------------------------------------------------------


def row_softmax_(x: Tensor, with_one: bool) -> tuple[Tensor, Tensor]:
    """Row-wise ``log Σ_j exp(x_j)`` and the softmax weights behind it (its gradient),
    overwriting ``x`` with the weights; entries of ``x`` that are ``-inf`` are left out.

    With ``with_one`` a constant ``exp(0) = 1`` joins every sum (``log(1 + Σ exp(x_j))``, 0 for
    an empty row); without, an empty row gives ``-inf``. The weights ``exp(x_j) / sum`` are 0 at
    the left-out entries and in empty rows.

    Shapes: ``x`` ``(c, R)`` -> ``(c,)`` log-sum-exps, ``(c, R)`` weights (``x``).
    """
    if x.shape[1] == 0:
        shift = x.new_full((len(x), 1), float("-inf"))
    else:
        shift = x.amax(dim=1, keepdim=True)
    shift = shift.clamp_min_(0) if with_one else shift.nan_to_num_(neginf=0.0)
    x.sub_(shift).exp_()
    total = x.sum(dim=1, keepdim=True)
    if with_one:
        total += torch.exp(-shift)
    lse = (total.log() + shift).squeeze(1)
    x.div_(total.clamp_min_(torch.finfo(x.dtype).tiny))
    return lse, x


def sparse_softmax(x: Tensor, rows: Tensor, n_rows: int, with_one: bool) -> tuple[Tensor, Tensor]:
    """:func:`row_softmax_` for entries given as a list: ``x[k]`` sits in row ``rows[k]``.

    Returns the ``(n_rows,)`` log-sum-exps (``log(1 + Σ exp)`` with ``with_one``, else ``-inf``
    for an empty row) and the ``(n,)`` softmax weights of the entries. The work is proportional
    to the number of entries, not to the width of the matrix.
    """
    shift = x.new_full((n_rows,), float("-inf"))
    shift.scatter_reduce_(0, rows, x, reduce="amax")
    shift = shift.clamp_min_(0) if with_one else shift.nan_to_num_(neginf=0.0)
    exps = torch.exp(x - shift[rows])
    total = torch.zeros_like(shift).index_add_(0, rows, exps)
    if with_one:
        total += torch.exp(-shift)
    lse = total.log() + shift
    return lse, exps / total[rows]


def sparse_product(
    rows: Tensor, cols: Tensor, weight: Tensor, n_rows: int, dense: Tensor
) -> Tensor:
    """The ``(n_rows, D)`` product of the sparse matrix with entries ``weight_k`` at
    ``(rows_k, cols_k)`` (``(n,)`` each, repeated entries adding up) with the ``(R, D)`` matrix
    ``dense``: row ``i`` is ``Σ_{k: rows_k = i} weight_k dense[cols_k]``.

    The entries are sorted by row into a compressed-row (CSR) matrix, whose product is a
    library kernel (MKL on the CPU, cuSPARSE on CUDA): 3 to 10 times faster than scattering
    gathered rows with ``index_add_`` or than a COO product, which coalesces first.
    """
    if len(rows) > 1 and not bool((rows[1:] >= rows[:-1]).all()):  # (lists are often sorted)
        order = torch.argsort(rows, stable=True)
        cols, weight = cols.index_select(0, order), weight.index_select(0, order)
    row_starts = rows.new_zeros(n_rows + 1)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=row_starts[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": its product is not
        warnings.simplefilter("ignore", UserWarning)
        # the indices are in range by construction: no (slow) invariant checks
        matrix = torch.sparse_csr_tensor(
            row_starts, cols, weight, (n_rows, len(dense)), check_invariants=False
        )
    return matrix @ dense


def add_pair_embedding_grads_(
    kind: MatrixKind,
    query: Tensor,
    ref: Tensor,
    rows: Tensor,
    cols: Tensor,
    weight: Tensor,
    grad_query: Tensor | None,
    grad_ref: Tensor | None,
    symmetric: bool = False,
) -> None:
    """:func:`add_block_embedding_grads_` for a list of entries ``(rows_k, cols_k)`` of the
    matrix with weights ``weight_k`` (``(n,)`` each): the weight matrix is sparse, and the work
    is proportional to the number of entries (:func:`sparse_product`, no gathered copies of the
    embeddings). When ``grad_query`` and ``grad_ref`` are one tensor (the references are the
    queries) and the entries not :attr:`~PairBlocks.symmetric`, both roles are added with one
    product over the entries and their transposes."""
    if len(rows) == 0:
        return
    euclidean = kind is not MatrixKind.INNER_PRODUCT
    sign = -1.0 if euclidean else 1.0
    # a symmetric weight matrix: the references' role equals the queries', added twice
    scale = 2.0 if symmetric else 1.0
    if grad_query is not None and grad_ref is grad_query and not symmetric:  # one for both roles
        rows, cols = torch.cat([rows, cols]), torch.cat([cols, rows])
        weight = torch.cat([weight, weight])
        grad_ref = None
    if grad_query is not None:
        grad_query.add_(sparse_product(rows, cols, weight, len(query), ref), alpha=sign * scale)
        if euclidean:
            row_sums = weight.new_zeros(len(query)).index_add_(0, rows, weight)
            grad_query.addcmul_(row_sums.unsqueeze(1), query, value=scale)
    if grad_ref is not None and not symmetric:
        grad_ref.add_(sparse_product(cols, rows, weight, len(ref), query), alpha=sign)
        if euclidean:
            col_sums = weight.new_zeros(len(ref)).index_add_(0, cols, weight)
            grad_ref.addcmul_(col_sums.unsqueeze(1), ref)


# -- the distances of listed pairs ---------------------------------------------------------------


# Gathered entries per chunk of listed pairs on the CPU: a chunk's two gathered (chunk, D) blocks
# of rows stay within 512 KiB each, whatever the number of threads (measured at B=512 with 3.6k
# pairs: as fast as one chunk of all pairs, 8% faster than 256 KiB chunks, 25% than 128 KiB).
PAIR_CHUNK_ELEMENTS = 1 << 17


def pair_chunks(n_pairs: int, dim: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the chunks of ``n_pairs`` listed pairs whose rows of ``dim``
    entries are gathered at once: about :data:`PAIR_CHUNK_ELEMENTS` entries on the CPU, the
    blocks of :func:`row_blocks` on an accelerator."""
    if device.type != "cpu":
        yield from row_blocks(n_pairs, dim, device)
        return
    step = max(1, PAIR_CHUNK_ELEMENTS // max(1, dim))
    for start in range(0, n_pairs, step):
        yield start, min(start + step, n_pairs)


class _PairDistances(torch.autograd.Function):
    """``(B, D)`` queries, ``(R, D)`` references and ``(n,)`` index pairs -> the ``(n,)``
    distances of a :class:`MatrixKind` between ``query[rows_k]`` and ``ref[cols_k]``, computed
    directly from the differences (no matrix product), a chunk of pairs at a time so that the
    gathered ``(chunk, D)`` rows stay small; the backward pass is sparse products
    (:func:`add_pair_embedding_grads_`)."""

    @staticmethod
    def forward(
        ctx: Any, query: Tensor, ref: Tensor, rows: Tensor, cols: Tensor, kind: MatrixKind
    ) -> Tensor:
        dists = query.new_empty(len(rows))
        for start, stop in pair_chunks(len(rows), query.shape[1], query.device):
            q = query.index_select(0, rows[start:stop])  # (faster than query[rows] on CPU)
            r = ref.index_select(0, cols[start:stop])
            if kind is MatrixKind.INNER_PRODUCT:
                dists[start:stop] = (q * r).sum(dim=1)
            else:
                dists[start:stop] = q.sub_(r).square_().sum(dim=1)
        if kind is MatrixKind.EUCLIDEAN:
            dists.sqrt_()
        ctx.kind = kind
        ctx.same_tensor = query is ref
        ctx.save_for_backward(query, ref, rows, cols, dists)
        return dists

    @staticmethod
    def backward(ctx: Any, grad_dists: Tensor) -> tuple[Tensor | None, ...]:
        first_order_only()
        query, ref, rows, cols, dists = ctx.saved_tensors
        kind: MatrixKind = ctx.kind
        need_query, need_ref = ctx.needs_input_grad[:2]
        grad_query = torch.zeros_like(query) if need_query else None
        grad_ref = torch.zeros_like(ref) if need_ref else None
        if ctx.same_tensor and grad_query is not None:
            # the references are the queries: one gradient takes both roles (autograd would
            # otherwise add a second (B, D) gradient to it)
            grad_ref = grad_query
        weight = embedding_weight_(kind, grad_dists.clone(), dists)
        add_pair_embedding_grads_(kind, query, ref, rows, cols, weight, grad_query, grad_ref)
        if ctx.same_tensor and grad_query is not None:
            return grad_query, None, None, None, None
        return grad_query, grad_ref, None, None, None


def pair_distances(distance: BaseDistance, batch: Batch, rows: Tensor, cols: Tensor) -> Tensor:
    """``(n,)`` distances between ``batch.embeddings[rows_k]`` and ``batch.ref_emb[cols_k]``,
    through autograd, as ``distance`` measures them; for a few pairs (see :func:`few_pairs`) this
    is much cheaper than the whole matrix. Fusable distances are computed a chunk of pairs at a
    time with a hand-written backward; any other through
    :meth:`~deepmetric.distances.BaseDistance.pairwise_distance`."""
    kind = fused_matrix_kind(distance)
    if kind is None:
        return distance.pairwise_distance(batch.embeddings[rows], batch.ref_emb[cols])
    query, ref = normalized_inputs(distance, batch)
    dists = _PairDistances.apply(query, ref, rows, cols, kind)  # (no matrix product to autocast)
    assert isinstance(dists, Tensor)
    return dists
