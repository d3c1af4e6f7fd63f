"""A batch's positive and negative pairs, served by blocks of rows or tiles of the matrix."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .batch import Batch
from .masks import (
    at_most_one_pair_each,
    same_label_pairs,
    to_pairs,
)
from .matrix import (
    cpu_block_elements,
    row_blocks,
)


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
        side = math.isqrt(cpu_block_elements())
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
