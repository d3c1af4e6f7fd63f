"""Exact k nearest neighbours: the one search that evaluation, few-shot classification, reports
and the command line share.

:func:`nearest_neighbors` ``(queries, references, k, exclude_self=..., metric=...)`` ->
``(distances, indices)``, nearest first, ties broken by the smaller reference index; with
``exclude_self`` query ``i`` is reference ``i`` and is excluded by index, never by distance.
:func:`neighbor_chunks` yields the same answer a block of queries at a time, so that a caller
that only needs a summary of each query's neighbours (the ranks of its positives, a vote) never
holds all ``Nq × k`` of them.

Two engines give the same neighbours (up to float32 rounding of nearly equal distances):

* **faiss** (``faiss.knn``: the exact search behind PML's default ``FaissKNN``; Johnson, Douze &
  Jégou, "Billion-scale similarity search with GPUs", 2017), for squared Euclidean distances
  of tensors on the CPU (for inner products its ties follow no fixed rule). It makes a
  few large calls (a BLAS product per block of references, a heap per query), which keep their
  speed on a CPU shared with other processes, where many small operators lose the cores to
  spinning threads. Queries go through in blocks whose ``block × k`` result fits in
  :data:`FAISS_RESULT_BYTES`; faiss streams the references itself.
* **torch** (:func:`topk_key_chunks`), for other devices (CUDA) or without faiss. (Inner
  products: each query's row of products, stable-sorted.) A query chunk
  is compared with one reference chunk at a time (one matrix product of augmented vectors
  ``[q, |q|², 1]·[-2r, 1, |r|²]``). Each query keeps a running top-k; a reference can only enter
  it if it is at most as far as the current k-th neighbour, so the chunk is first reduced to
  minima over small blocks of references and only blocks below that threshold are looked at.
  Neighbours are ordered by (distance, index) packed into one int64, identically for every
  chunk size. When the references start with the queries (self-retrieval), each block product
  ``(i, j)`` is computed once and serves both query blocks ``i`` and ``j``, halving the matrix
  products, while the running top-k of all queries fits in :data:`SYMMETRIC_STATE_BYTES` and
  the queries are a good share of the references. Memory is ``O(chunk_size² + chunk_size·k)``.

Distances are squared Euclidean (``metric="l2"``, smaller is closer, negative rounding noise
read as 0) or inner products (``metric="inner_product"``, larger is closer): the names and values
of faiss and of :class:`~deepmetric.index.EmbeddingIndex`. Embeddings are ranked in float32, as
faiss and PML rank them.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._checks import check_embeddings

Metric = Literal["l2", "inner_product"]
Engine = Literal["auto", "faiss", "torch"]
METRICS = ("l2", "inner_product")
ENGINES = ("auto", "faiss", "torch")

#: The faiss engine asks for at most this many bytes of results per call (a distance and an
#: index, 12 bytes, per neighbour): every query at once unless ``Nq × k`` is large.
FAISS_RESULT_BYTES = 1 << 28
#: The torch engine's inner-product search compares queries with the references about this many
#: matrix entries at a time.
_INNER_PRODUCT_ENTRIES = 1 << 24
#: Default number of queries (and references) per block of the streamed ranking.
DEFAULT_CHUNK_SIZE = 2048
#: Self-retrieval reuses each block product for two query blocks while the running top-k of all
#: queries fits in this many bytes; beyond it, query chunks are processed one after the other.
SYMMETRIC_STATE_BYTES = 1 << 30
#: Self-retrieval keeps the augmented query and reference forms of all blocks when they fit in
#: this many bytes (both forms of 32k rows of 128-d embeddings): it saves a gather and a copy
#: per block product, which weighs most where products are few (10k: about 5%); beyond, the
#: forms are made again for each product, so memory stays bounded by the chunk size.
AUGMENTED_CACHE_BYTES = 1 << 25

# --------------------------------------------------------------------------------------------
# The torch engine: exact top-k by streaming
# --------------------------------------------------------------------------------------------
_PAD = torch.iinfo(torch.int64).max  # sorts after every real (distance, index) key
_INDEX_BITS = 32
_INDEX_MASK = (1 << _INDEX_BITS) - 1
# Most references per block minimum (blocks too far for the running top-k are skipped whole):
# along a row, a block is contiguous; down a column (symmetric mode), reading one back touches
# ``width`` rows, so those blocks are kept shorter.
_ROW_BLOCK = 32
_COLUMN_BLOCK = 8
#: About the most candidate distances gathered at once: a block of the search whose open blocks
#: hold more is scanned in slices of rows, so that its temporaries (a few int64 per candidate;
#: every entry is a candidate while a query's top-k is still empty) stay bounded by the chunk
#: size rather than growing with ``k``. Once the top-k is tight, a block is one slice.
_SCAN_ENTRIES = 1 << 19


#: Rows per step of :func:`row_squared_norms`.
NORM_CHUNK_ROWS = 1 << 16


def row_squared_norms(x: Tensor) -> Tensor:
    """``(N, D)`` -> ``(N,)`` squared L2 norms, ``(x * x).sum(dim=1)`` computed
    :data:`NORM_CHUNK_ROWS` rows at a time: the same values, without an ``(N, D)`` temporary
    (500 MB at 1M × 128)."""
    if len(x) <= NORM_CHUNK_ROWS:
        return (x * x).sum(dim=1)
    return torch.cat([(c * c).sum(dim=1) for c in x.split(NORM_CHUNK_ROWS)])


def _encode(dist: Tensor, index: Tensor) -> Tensor:
    """Squared distances (float32) and reference indices -> int64 keys ordered by distance,
    then index. Negative rounding noise counts as 0 (faiss clamps the same way)."""
    # a negative float (sign bit set) is a negative int32: clamping the bits maps it to +0.0
    bits = dist.view(torch.int32).to(torch.int64).clamp_min_(0)
    return (bits << _INDEX_BITS) | index


def _decode_dist(keys: Tensor) -> Tensor:
    return (keys >> _INDEX_BITS).to(torch.int32).view(torch.float32)


def _decode_index(keys: Tensor) -> Tensor:
    return keys & _INDEX_MASK


def _augment(x: Tensor, squared_norms: Tensor, as_query: bool) -> Tensor:
    """``[x, |x|², 1]`` (queries) and ``[-2x, 1, |x|²]`` (references): their product is the
    squared Euclidean distance, so a block of distances is one matrix product."""
    one = torch.ones_like(squared_norms)
    parts = (x, squared_norms, one) if as_query else (-2 * x, one, squared_norms)
    return torch.cat([p if p.ndim == 2 else p.unsqueeze(1) for p in parts], dim=1)


#: When block minima bound the k-th distances, a block holds at least this many times k blocks
#: if they can still be ``_MIN_BOUND_WIDTH`` wide: the k-th smallest of 8k minima is a much
#: tighter bound than the k-th of 2k (about k / 8k of the blocks stay open rather than half),
#: which keeps the first scan of every query sparse (10k self-retrieval, k = 22, blocks of 8:
#: 5-10% faster; 50k, k = 70, blocks of 2: 13%). For a k so large next to the block that the
#: minima would be single entries, they cost more than they save (10k queries against 100k
#: references, k = 130: 40% slower): then 2k blocks, as wide as they can be.
_BOUND_BLOCKS_PER_K = 8
_MIN_BOUND_WIDTH = 2


def _block_width(n_refs: int, k: int, bound: bool, cap: int) -> int:
    """References per block minimum for a block of ``n_refs``: a power of two up to ``cap``
    dividing ``n_refs``; with ``bound``, small enough to leave ``_BOUND_BLOCKS_PER_K · k``
    blocks or more where that leaves them at least ``_MIN_BOUND_WIDTH`` wide, else ``2k`` blocks
    or more (so that the k-th smallest block minimum bounds the k-th distance)."""
    if bound:
        width = n_refs // (_BOUND_BLOCKS_PER_K * k)
        if width < _MIN_BOUND_WIDTH:
            width = n_refs // (2 * k)
        width = min(cap, max(1, width))
    else:
        width = cap
    return math.gcd(n_refs, 1 << int(math.log2(width)))


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x.flatten()[index]`` (``x`` contiguous), by ``index_select``: several times faster than
    advanced indexing for the large gathers of the search."""
    return x.reshape(-1).index_select(0, index.reshape(-1)).view(index.shape)


class _TopKBuffer:
    """Running k nearest references of ``n`` queries, as int64 (distance, index) keys.

    New candidates are appended into ``slack`` spare slots per row and only merged (one top-k
    over ``k + slack`` keys) when a row runs out of space, so merging costs ``O(1 + k/slack)``
    per candidate. ``tau`` is an upper bound on each query's k-th distance (``inf`` until
    known): a reference farther than ``tau`` can never enter that query's top-k.
    """

    def __init__(self, n: int, k: int, slack: int, device: torch.device) -> None:
        self.k = k
        self.capacity = k + slack
        self.keys = torch.full((n, self.capacity), _PAD, dtype=torch.int64, device=device)
        self.fill = torch.zeros(n, dtype=torch.int64, device=device)
        self.tau = torch.full((n,), math.inf, dtype=torch.float32, device=device)

    def needs_bound(self) -> bool:
        return bool(torch.isinf(self.tau).any())

    def tighten(self, bound: Tensor) -> None:
        torch.minimum(self.tau, bound, out=self.tau)

    def add(self, rows: Tensor, keys: Tensor) -> None:
        """Insert candidate ``keys`` for the queries ``rows`` (local indices, ascending)."""
        if rows.numel() == 0:
            return
        counts = torch.bincount(rows, minlength=len(self.fill))
        overflow = self.fill + counts > self.capacity
        if bool(overflow.any()):
            self._keep_best(overflow.nonzero().squeeze(1), None)
            overflow = self.fill + counts > self.capacity
            if bool(overflow.any()):  # more new candidates than spare slots: merge directly
                direct = _take(overflow, rows)
                targets, local = torch.unique_consecutive(rows[direct], return_inverse=True)
                self._keep_best(targets, _pad_rows(local, keys[direct], len(targets)))
                rows, keys = rows[~direct], keys[~direct]
                counts = counts.masked_fill(overflow, 0)
        first = torch.cumsum(counts, 0) - counts
        position = torch.arange(len(rows), device=rows.device)
        slot = _take(self.fill, rows) + position - _take(first, rows)
        self.keys.view(-1).index_copy_(0, rows * self.capacity + slot, keys)
        self.fill += counts

    def _keep_best(self, rows: Tensor, extra: Tensor | None) -> None:
        """Keep the k smallest keys of ``rows`` (and of ``extra``); tighten their ``tau``."""
        merged = self.keys.index_select(0, rows)
        merged = merged if extra is None else torch.cat([merged, extra], 1)
        best = merged.topk(self.k, dim=1, largest=False, sorted=False).values
        kept = torch.full_like(self.keys[: len(rows)], _PAD)
        kept[:, : self.k] = best
        self.keys.index_copy_(0, rows, kept)
        self.fill.index_copy_(0, rows, (best != _PAD).sum(dim=1))
        largest = best.amax(dim=1)
        known = largest != _PAD
        rows = rows[known]
        bound = torch.minimum(_take(self.tau, rows), _decode_dist(largest[known]))
        self.tau.index_copy_(0, rows, bound)

    def result(self) -> Tensor:
        """``(n, k)`` keys of the k nearest references, nearest first (sorted a slice of rows
        at a time: a whole sort's values and indices would be 4× the result)."""
        rows = max(1, _SCAN_ENTRIES // self.capacity)
        return torch.cat([c.sort(dim=1).values[:, : self.k] for c in self.keys.split(rows)])


def _flat_nonzero(mask: Tensor) -> Tensor:
    """Flat (row-major) indices of the True entries of a contiguous boolean tensor."""
    return mask.view(-1).nonzero().squeeze(1)


def _candidates(dist: Tensor, is_open: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, column, distance) of every entry of ``dist`` ``(n, m)`` at most ``tau[row]``, by
    row. ``is_open`` ``(n, m / width)`` marks the blocks of ``width`` columns whose minimum is
    at most ``tau[row]``: a closed block (nearly all of them, once ``tau`` is tight) is never
    looked at. With ``width == 1``, ``is_open`` is the answer itself."""
    n, m = dist.shape
    width = m // is_open.shape[1]
    open_blocks = _flat_nonzero(is_open)  # into (n, m / width)
    if width == 1 or 4 * len(open_blocks) >= is_open.numel():  # dense: test every entry
        hit = open_blocks if width == 1 else _flat_nonzero(dist <= tau.unsqueeze(1))
        return hit // m, hit % m, _take(dist, hit)
    row, first_col = open_blocks // (m // width), open_blocks % (m // width) * width
    values = dist.view(-1, width).index_select(0, open_blocks)
    hit = _flat_nonzero(values <= _take(tau, row).unsqueeze(1))
    block, offset = hit // width, hit % width
    return _take(row, block), _take(first_col, block) + offset, _take(values, hit)


def _column_candidates(dist: Tensor, is_open: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_candidates` of ``dist.T`` (``is_open`` ``(m / width, n)`` over blocks of rows),
    returned as (column, row, distance) by column, without transposing the block.

    The open blocks' entries are read one row of the block at a time (``width`` sweeps, each
    along the rows of the matrix: 2.4× faster than walking down each open column, which touches
    a new cache line per entry), then the few hits are sorted by column."""
    m, n = dist.shape
    width = m // is_open.shape[0]
    open_blocks = _flat_nonzero(is_open)  # into (m / width, n), by block of rows
    if width == 1 or 4 * len(open_blocks) >= is_open.numel():
        hit = _flat_nonzero((dist <= tau if width > 1 else is_open).T.contiguous())
        col, row = hit // m, hit % m
        return col, row, _take(dist, row * n + col)
    block_row, col = open_blocks // n, open_blocks % n
    first = block_row * (width * n) + col
    index = first.unsqueeze(0) + n * torch.arange(width, device=dist.device).unsqueeze(1)
    values = _take(dist, index)  # (width, open blocks)
    hit = _flat_nonzero(values <= _take(tau, col).unsqueeze(0))
    offset, block = hit // len(open_blocks), hit % len(open_blocks)
    col = _take(col, block)
    order = torch.argsort(col, stable=True)
    row = _take(block_row, block) * width + offset
    return _take(col, order), _take(row, order), _take(_take(values, hit), order)


def _block_plan(buf: _TopKBuffer, n_refs: int, cap: int) -> tuple[int, bool]:
    """(block width, whether the block minima should bound the k-th distances) for a block of
    ``n_refs`` references offered to ``buf``."""
    bound = buf.needs_bound() and n_refs >= 2 * buf.k
    width = _block_width(n_refs, buf.k, bound, cap)
    return width, bound and width > 1


def _slices(n: int, open_entries: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Split ``n`` rows (in whole groups of ``multiple``) so that each slice holds about
    :data:`_SCAN_ENTRIES` of the ``open_entries`` entries to look at: one slice when few are."""
    pieces = 1 + open_entries // _SCAN_ENTRIES
    step = max(1, -(-n // pieces))
    return _chunks(n, -(-step // multiple) * multiple)


def _scan_rows(
    buf: _TopKBuffer, dist: Tensor, ref_ids: Tensor, query_ids: Tensor | None = None
) -> None:
    """Offer block ``dist`` (queries × the references ``ref_ids``) to ``buf``. With
    ``query_ids``, a query is skipped as its own neighbour (its entry must be ``inf``)."""
    n, m = dist.shape
    width, bound = _block_plan(buf, m, _ROW_BLOCK)
    block_min = dist.view(n, m // width, width).amin(2) if width > 1 else dist
    if bound:  # at least k distinct references lie within the k-th smallest block minimum
        top = block_min.topk(buf.k, dim=1, largest=False, sorted=False).values
        buf.tighten(top.amax(dim=1))
    is_open = block_min <= buf.tau.unsqueeze(1)
    for p0, p1 in _slices(n, int(is_open.sum()) * width):
        row, col, values = _candidates(dist[p0:p1], is_open[p0:p1], buf.tau[p0:p1])
        row += p0
        ref = _take(ref_ids, col)
        if query_ids is not None:
            keep = _take(query_ids, row) != ref
            row, ref, values = row[keep], ref[keep], values[keep]
        buf.add(row, _encode(values, ref))


def _scan_columns(buf: _TopKBuffer, dist: Tensor, ref_ids: Tensor) -> None:
    """Offer block ``dist.T`` (the queries of ``buf`` are the columns of ``dist``, its rows the
    references ``ref_ids``) to ``buf``."""
    m, n = dist.shape
    width, bound = _block_plan(buf, m, _COLUMN_BLOCK)
    block_min = dist.view(m // width, width, n).amin(1) if width > 1 else dist
    if bound:
        top = block_min.topk(buf.k, dim=0, largest=False, sorted=False).values
        buf.tighten(top.amax(dim=0))
    is_open = block_min <= buf.tau.unsqueeze(0)
    for r0, r1 in _slices(m, int(is_open.sum()) * width, width):  # whole blocks of rows
        piece = is_open[r0 // width : r1 // width]
        col, row, values = _column_candidates(dist[r0:r1], piece, buf.tau)
        buf.add(col, _encode(values, _take(ref_ids, row + r0)))


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _visiting_order(n: int, groups: Tensor | None, device: torch.device) -> Tensor:
    """Indices ``0..n-1``, sorted by group (stable) when groups are given."""
    if groups is None:
        return torch.arange(n, device=device)
    return torch.argsort(groups, stable=True)


def topk_key_chunks(
    query: Tensor,
    reference: Tensor,
    k: int,
    ref_includes_query: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    symmetric: bool | None = None,
    query_groups: Tensor | None = None,
    reference_groups: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(query_ids, keys)`` for blocks of queries: the ``(len(query_ids), k)``
    (distance, index) keys of the k nearest references of each, nearest first. Every query is
    in exactly one block.

    ``query`` and ``reference`` are float32 ``(Nq, D)``, ``(Nr, D)``; with ``ref_includes_query``
    query ``i`` is reference ``i`` and is never its own neighbour. ``symmetric=None`` reuses
    block products for two query blocks when possible (see :data:`SYMMETRIC_STATE_BYTES`).

    ``query_groups`` ``(Nq,)`` and ``reference_groups`` ``(Nr,)`` (labels, typically) only choose
    the order of the work: queries and references are blocked by group, and a query block meets
    the references of its own groups first. When the embeddings cluster by label, these hold
    many of its nearest neighbours, so the running top-k tightens early and fewer later
    references need a second look. The result does not depend on them.
    """
    device = query.device
    n_query, n_ref = len(query), len(reference)
    q_norms = row_squared_norms(query)
    r_norms = q_norms if reference is query else row_squared_norms(reference)
    q_order = _visiting_order(n_query, query_groups, device)
    if ref_includes_query:
        extra_groups = None if reference_groups is None else reference_groups[n_query:]
        extra = n_query + _visiting_order(n_ref - n_query, extra_groups, device)
        r_order = torch.cat([q_order, extra])
    else:
        r_order = _visiting_order(n_ref, reference_groups, device)
    q_blocks = [q_order[s:e] for s, e in _chunks(n_query, chunk_size)]
    slack = max(16, k // 4)  # spare slots of the running top-k of all queries at once
    if symmetric is None:
        # it saves n_query² / 2 of n_query × n_ref products: worth its state from a quarter on
        symmetric = (
            n_query * (k + slack) * 8 <= SYMMETRIC_STATE_BYTES
            and len(q_blocks) > 1
            and 4 * n_query >= n_ref
        )
    symmetric = symmetric and ref_includes_query

    def query_block(ids: Tensor) -> Tensor:
        return _augment(query.index_select(0, ids), q_norms.index_select(0, ids), as_query=True)

    def ref_block(ids: Tensor) -> Tensor:
        return _augment(
            reference.index_select(0, ids), r_norms.index_select(0, ids), as_query=False
        )

    # every block of distances is written into the same memory (a fresh chunk_size² block, 16
    # MiB, would fault all its pages in again: measured 10-15% of a 10k self-retrieval)
    product_memory = query.new_empty(min(chunk_size, n_query) * min(chunk_size, n_ref))

    def distances(q_aug: Tensor, r_aug: Tensor) -> Tensor:
        """Squared distances ``(len(q_aug), len(r_aug))`` between augmented blocks, in the
        reused memory: valid until the next call."""
        out = product_memory[: len(q_aug) * len(r_aug)].view(len(q_aug), len(r_aug))
        return torch.mm(q_aug, r_aug.T, out=out)

    if not symmetric:
        r_blocks = [r_order[s:e] for s, e in _chunks(n_ref, chunk_size)]
        r_position = torch.empty_like(r_order)
        r_position[r_order] = torch.arange(n_ref, device=device)
        sorted_groups = None if reference_groups is None else reference_groups[r_order]
        for q_ids in q_blocks:
            # start with the reference block holding the first query's group (or itself)
            if ref_includes_query:
                start = int(r_position[q_ids[0]])
            elif sorted_groups is not None and query_groups is not None:
                start = int(torch.searchsorted(sorted_groups, query_groups[q_ids[:1]]))
            else:
                start = 0
            first = min(start // chunk_size, len(r_blocks) - 1)
            q_aug = query_block(q_ids)
            buf = _TopKBuffer(len(q_ids), k, max(16, k), device)
            for b in [*range(first, len(r_blocks)), *range(first)]:
                dist = distances(q_aug, ref_block(r_blocks[b]))
                if ref_includes_query:
                    position = r_position[q_ids] - b * chunk_size
                    row = ((position >= 0) & (position < dist.shape[1])).nonzero().squeeze(1)
                    dist[row, position[row]] = math.inf
                _scan_rows(buf, dist, r_blocks[b], q_ids if ref_includes_query else None)
            yield q_ids, buf.result()
        return

    # Self-retrieval: the references start with the queries; block (i, j) serves both. Blocks
    # are visited by diagonals (i, i), (i, i + 1), ...: with grouped blocks, nearest first.
    # Each block's two augmented forms are made once when they fit AUGMENTED_CACHE_BYTES (each
    # is used by one product per block otherwise: a gather and a copy as large as the data).
    buffers = [_TopKBuffer(len(ids), k, slack, device) for ids in q_blocks]
    keep_augmented = 2 * n_query * (query.shape[1] + 2) * 4 <= AUGMENTED_CACHE_BYTES
    augmented: dict[tuple[int, bool], Tensor] = {}

    def block_form(b: int, as_query: bool) -> Tensor:
        """Block ``b`` in its augmented query or reference form (kept if it fits)."""
        form = augmented.get((b, as_query))
        if form is None:
            form = (query_block if as_query else ref_block)(q_blocks[b])
            if keep_augmented:
                augmented[b, as_query] = form
        return form

    for offset in range(len(q_blocks)):
        for i in range(len(q_blocks) - offset):
            j = i + offset
            dist = distances(block_form(i, True), block_form(j, False))
            if offset == 0:
                dist.fill_diagonal_(math.inf)
                _scan_rows(buffers[i], dist, q_blocks[j], q_blocks[i])
            else:
                _scan_rows(buffers[i], dist, q_blocks[j])
                _scan_columns(buffers[j], dist, q_blocks[i])
    extra_blocks = [extra[s:e] for s, e in _chunks(n_ref - n_query, chunk_size)]
    for q_ids, buf in zip(q_blocks, buffers, strict=True):
        q_aug = query_block(q_ids)
        for r_ids in extra_blocks:  # references beyond the queries: no symmetry to use
            _scan_rows(buf, distances(q_aug, ref_block(r_ids)), r_ids)
        yield q_ids, buf.result()


def _self_pairs(q0: int, n: int, r0: int, m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(row, column) of every query paired with itself in the block of queries ``q0:q0+n`` ×
    references ``r0:r0+m`` (query ``i`` is reference ``i``)."""
    lo = max(q0, r0)
    idx = torch.arange(lo, max(lo, min(q0 + n, r0 + m)), device=device)
    return idx - q0, idx - r0


def _mask_self(dist: Tensor, q0: int, r0: int) -> None:
    """Set each query's distance to itself to ``inf`` in a block starting at ``(q0, r0)``."""
    dist[_self_pairs(q0, dist.shape[0], r0, dist.shape[1], dist.device)] = math.inf


# --------------------------------------------------------------------------------------------
# The faiss engine, the inner-product fallback, and the one entry point
# --------------------------------------------------------------------------------------------
def _faiss_module() -> Any | None:
    """faiss, or ``None`` where it is not installed."""
    try:
        return importlib.import_module("faiss")
    except ModuleNotFoundError:  # pragma: no cover - depends on the environment
        return None


def _drop_self(ids: Tensor, dist: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """``(n, k + 1)`` neighbours of the queries ``ids`` among references that include them ->
    ``(n, k)`` without the query itself: where it was found, it is removed; where it was not
    (``k + 1`` others at least as close, all ranked before it), the last neighbour is."""
    n, width = index.shape
    keep = index != ids.unsqueeze(1)
    keep[:, -1] &= ~keep.all(dim=1)
    return dist[keep].view(n, width - 1), index[keep].view(n, width - 1)


def _faiss_chunks(
    queries: Tensor, references: Tensor, k: int, exclude_self: bool
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """:func:`neighbor_chunks` by ``faiss.knn`` (squared Euclidean; its heaps break ties by the
    smaller index), for float32 CPU tensors."""
    faiss: Any = _faiss_module()
    # ``faiss.contrib.torch_utils`` (which PML imports) wraps faiss.knn; numpy passes through it
    q, r = queries.numpy(), references.numpy()
    depth = k + int(exclude_self)
    rows = max(1, FAISS_RESULT_BYTES // (12 * depth))
    for q0, q1 in _chunks(len(q), rows):
        dist_np, index_np = faiss.knn(q[q0:q1], r, depth, metric=faiss.METRIC_L2)
        ids = torch.arange(q0, q1)
        dist, index = torch.from_numpy(dist_np), torch.from_numpy(index_np)
        if exclude_self:
            dist, index = _drop_self(ids, dist, index)
        yield ids, dist, index


def _inner_product_chunks(
    queries: Tensor, references: Tensor, k: int, exclude_self: bool
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """:func:`neighbor_chunks` for ``metric="inner_product"`` in torch: each query's whole row
    of products, sorted (stable: ties keep the smaller index first)."""
    rows = max(1, _INNER_PRODUCT_ENTRIES // len(references))
    for q0, q1 in _chunks(len(queries), rows):
        scores = queries[q0:q1] @ references.T
        if exclude_self:
            scores[_self_pairs(q0, q1 - q0, 0, len(references), scores.device)] = -math.inf
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        yield torch.arange(q0, q1, device=queries.device), scores.gather(1, order), order


def _resolve_engine(engine: str, device: torch.device, metric: str) -> str:
    """The engine that runs: faiss's breaks ties in inner products by neither index nor any
    fixed rule, so it ranks squared Euclidean distances only."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    faiss_can = device.type == "cpu" and metric == "l2" and _faiss_module() is not None
    if engine == "faiss" and not faiss_can:
        raise ValueError(
            "engine='faiss' needs CPU tensors, metric='l2' and faiss (pip install faiss-cpu); "
            "use engine='auto'"
        )
    if engine == "auto":
        return "faiss" if faiss_can else "torch"
    return engine


def neighbor_chunks(
    queries: Tensor,
    references: Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    metric: Metric = "l2",
    engine: Engine = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    symmetric: bool | None = None,
    query_groups: Tensor | None = None,
    reference_groups: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(query_ids, distances, indices)`` for blocks of queries: the ``(len(query_ids),
    k)`` nearest references of each (see :func:`nearest_neighbors`). Every query is in exactly
    one block. Inputs are checked float32 tensors on one device (:func:`nearest_neighbors`
    checks them); ``1 <= k <= len(references) - exclude_self``.

    ``engine``: ``"faiss"`` (CPU, ``"l2"`` only), ``"torch"``, or ``"auto"``: faiss where it can,
    when it is installed. ``chunk_size``, ``symmetric`` and the groups only steer the torch engine's
    work (see :func:`topk_key_chunks`), never the result.
    """
    chosen = _resolve_engine(engine, queries.device, metric)
    if chosen == "faiss":
        yield from _faiss_chunks(queries, references, k, exclude_self)
    elif metric == "inner_product":
        yield from _inner_product_chunks(queries, references, k, exclude_self)
    else:
        for ids, keys in topk_key_chunks(
            queries, references, k, exclude_self, chunk_size, symmetric,
            query_groups, reference_groups,
        ):  # fmt: skip
            yield ids, _decode_dist(keys), _decode_index(keys)


def nearest_neighbors(
    queries: Tensor | np.ndarray,
    references: Tensor | np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    metric: Metric = "l2",
    engine: Engine = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    symmetric: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact ``k`` nearest references of every query.

    Args:
        queries: ``(Nq, D)`` floating point (ranked in float32).
        references: ``(Nr, D)``, on the queries' device.
        k: neighbours per query, ``1 <= k <= Nr - exclude_self``.
        exclude_self: the references start with the queries (query ``i`` is reference ``i``,
            checked), and no query is its own neighbour. It is excluded by index: a duplicate
            of it at distance 0 stays a neighbour.
        metric: ``"l2"`` (squared Euclidean, ascending) or ``"inner_product"`` (descending).
        engine: ``"auto"`` (faiss for ``"l2"`` on CPU tensors when installed, else torch),
            ``"faiss"`` or ``"torch"``; see the module docstring.
        chunk_size, symmetric: how the torch engine blocks its work (not the result).

    Returns:
        ``(distances, indices)``, both ``(Nq, k)``: float32 squared distances (or inner
        products) and int64 reference indices, nearest first, ties by the smaller index.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    q = _as_float32(queries, "queries")
    r = q if references is queries else _as_float32(references, "references")
    if r.device != q.device:
        raise ValueError(f"queries are on {q.device} but references on {r.device}")
    _check_pair(q, r, exclude_self)
    available = len(r) - int(exclude_self)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= available:
        raise ValueError(f"k must be an int in [1, {available}] for these references, got {k!r}")
    dists = torch.empty(len(q), k, dtype=torch.float32, device=q.device)
    indices = torch.empty(len(q), k, dtype=torch.int64, device=q.device)
    for ids, chunk_dists, chunk_indices in neighbor_chunks(
        q, r, k, exclude_self=exclude_self, metric=metric, engine=engine,
        chunk_size=chunk_size, symmetric=symmetric,
    ):  # fmt: skip
        dists[ids] = chunk_dists
        indices[ids] = chunk_indices
    return dists, indices


def knn(
    query: Tensor,
    k: int,
    reference: Tensor | None = None,
    ref_includes_query: bool = False,
    *,
    engine: Engine = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    symmetric: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`nearest_neighbors` (squared Euclidean) called as PML's ``knn_func``
    (``FaissKNN``), so it can be passed to PML's ``AccuracyCalculator`` too: ``reference=None``
    is self-retrieval in ``query``, ``ref_includes_query`` is ``exclude_self``.

    Shapes: query ``(Nq, D)``, reference ``(Nr, D)`` -> squared distances ``(Nq, k)`` float32
    and reference indices ``(Nq, k)`` int64.
    """
    if reference is None:
        reference, ref_includes_query = query, True
    return nearest_neighbors(
        query, reference, k, exclude_self=ref_includes_query, engine=engine,
        chunk_size=chunk_size, symmetric=symmetric,
    )  # fmt: skip


def _pad_rows(rows: Tensor, values: Tensor, n: int) -> Tensor:
    """Scatter ``values`` into an ``(n, max count)`` int64 matrix, row ``rows[i]``, padded with
    ``_PAD`` (at least one column)."""
    counts = torch.bincount(rows, minlength=n)
    order = torch.argsort(rows, stable=True)
    rows, values = rows[order], values[order]
    slot = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    width = max(int(counts.max()) if n else 0, 1)
    out = torch.full((n, width), _PAD, dtype=torch.int64, device=values.device)
    out[rows, slot] = values
    return out


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def _as_float32(embeddings: Any, name: str) -> Tensor:
    """Validated ``(N, D)`` float32 embeddings (the precision PML and faiss rank in)."""
    embeddings = _as_tensor(embeddings, name)
    check_embeddings(embeddings, name)
    if len(embeddings) == 0:
        raise ValueError(f"{name} must contain at least one embedding")
    embeddings = embeddings.detach().to(torch.float32).contiguous()
    if not bool(torch.isfinite(row_squared_norms(embeddings)).all()):
        raise ValueError(f"{name} are too large: squared norms overflow float32")
    return embeddings


def _check_pair(query: Tensor, reference: Tensor, ref_includes_query: bool) -> None:
    if query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"query has dimension {query.shape[1]} but reference has {reference.shape[1]}"
        )
    if ref_includes_query and (
        len(reference) < len(query) or not torch.allclose(query, reference[: len(query)])
    ):
        raise ValueError(
            "When ref_includes_query is True, the first len(query) elements of reference must "
            "be equal to query"
        )
