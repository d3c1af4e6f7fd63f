"""Retrieval and clustering accuracy of an embedding: a streamed drop-in for PML's
``AccuracyCalculator``.

Every query is ranked against a reference set by squared Euclidean distance (what PML's default
``FaissKNN`` uses: ``faiss.IndexFlatL2`` on the raw embeddings), and the metrics read where each
query's *positives* (references sharing its label) land in that ranking:

* ``precision_at_1``: the nearest reference shares the label;
* ``recall_at_1/2/4/8`` (opt-in): one of the K nearest shares the label -- the "Recall@K" of
  deep-metric-learning papers (Song, Xiang, Jegelka & Savarese, 2016), not information-retrieval
  recall;
* ``r_precision`` and ``mean_average_precision_at_r`` (Musgrave, Belongie & Lim, "A Metric
  Learning Reality Check", 2020), with R the number of the query's positives;
* ``mean_average_precision`` and ``mean_reciprocal_rank`` over the ``k`` nearest neighbours;
* ``NMI`` and ``AMI``: k-means (faiss) on the query embeddings with one cluster per label,
  scored by scikit-learn (Strehl & Ghosh, 2002; Vinh, Epps & Bailey, 2010).

PML materialises the ``Nq × k`` neighbour lists and several ``Nq × k`` float64 tensors (with its
default ``k=None``, ``k = Nr``: a dense ``Nq × Nr`` result). Here queries are processed in
chunks and nothing larger than a chunk of the ranking ever exists:

1. **Exact top-k by streaming** (:func:`knn`). A query chunk is compared with one reference chunk
   at a time (one matrix product of augmented vectors ``[q, |q|², 1]·[-2r, 1, |r|²]``). Each
   query keeps a running top-k; a reference can only enter it if it is at most as far as the
   current k-th neighbour, so the chunk is first reduced to minima over small blocks of
   references and only blocks below that threshold are looked at. Neighbours are ordered by
   (distance, index) packed into one int64, so ties are broken by the smaller reference index,
   identically for every chunk size. When the references start with the queries
   (self-retrieval), each block product ``(i, j)`` is computed once and serves both query blocks
   ``i`` and ``j``, halving the matrix products; this needs the running top-k of all queries at
   once and is used only while that fits in :data:`SYMMETRIC_STATE_BYTES` and the queries are a
   good share of the references (a few queries against many references would hold that state
   to save almost nothing).
2. **Ranks by counting**, for large ``k`` (PML's default ``k=None`` ranks every reference). For a
   query chunk, one pass collects the distances of its positives; a second pass counts, for
   every other reference, how many positives it precedes (``searchsorted`` into the sorted
   positive distances). Rank of a positive = its position among the positives + the number of
   other references before it. Memory is ``O(chunk × (max positives + reference chunk))``.
3. The metrics are computed per query chunk from the ranks of its positives
   (:func:`metrics_from_ranks`) and only their sums are kept.

Deliberate differences from PML 2.9.0 are listed in :class:`AccuracyCalculator`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
from torch import Tensor

from ._checks import check_embeddings, check_labels

LOGGER = logging.getLogger(__name__)

#: PML's metrics, in the order PML returns them (``include=()`` computes these).
DEFAULT_METRICS = (
    "AMI",
    "NMI",
    "mean_average_precision",
    "mean_average_precision_at_r",
    "mean_reciprocal_rank",
    "precision_at_1",
    "r_precision",
)
#: Recall@K of deep-metric-learning papers; computed only when named in ``include``.
RECALL_KS = (1, 2, 4, 8)
RECALL_METRICS = tuple(f"recall_at_{k}" for k in RECALL_KS)
ALL_METRICS = DEFAULT_METRICS + RECALL_METRICS
CLUSTERING_METRICS = ("NMI", "AMI")
KNN_METRICS = tuple(m for m in ALL_METRICS if m not in CLUSTERING_METRICS)

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
#: Rough bound on the bytes of the temporaries of one step of the rank-counting pass.
_RANK_PASS_BYTES = 1 << 27

Array = Tensor | np.ndarray  # what get_accuracy accepts, as PML does
LabelComparisonFn = Callable[[Tensor, Tensor], Tensor]
KnnFn = Callable[..., tuple[Tensor, Tensor]]
KMeansFn = Callable[[Tensor, int], Tensor]


# --------------------------------------------------------------------------------------------
# The functional core: metrics from the ranks of each query's positives
# --------------------------------------------------------------------------------------------
def metrics_from_ranks(
    ranks: Tensor, num_relevant: Tensor, k: int, recall_ks: Sequence[int] = RECALL_KS
) -> dict[str, Tensor]:
    """Per-query retrieval metrics from where each query's positives appear in its ranking.

    Args:
        ranks: ``(Nq, M)`` 1-based ranks of each query's positives among the references (the
            query itself excluded), ascending along each row; ``inf`` pads rows with fewer than
            ``M`` positives and may stand for any rank beyond ``max(k, max(recall_ks))``.
        num_relevant: ``(Nq,)`` R, the number of references relevant to each query.
        k: how many neighbours PML's metrics look at (``mean_average_precision``,
            ``mean_reciprocal_rank``, and the cut-off of R for the R-metrics).
        recall_ks: the K of each ``recall_at_K``.

    Returns:
        ``{metric name: (Nq,) float64}``, the value PML computes for each query.
    """
    ranks = ranks.to(torch.float64)
    relevant = num_relevant.to(torch.float64)
    n, m = ranks.shape
    first = ranks[:, 0] if m > 0 else ranks.new_full((n,), math.inf)
    ordinal = torch.arange(1, m + 1, dtype=torch.float64, device=ranks.device)
    precision_at_rank = ordinal / ranks  # the i-th positive at rank r: precision i / r (inf -> 0)
    within_k = ranks <= k
    cutoff = relevant.clamp(max=k)  # PML's relevance mask: the first R columns of k
    within_r = ranks <= cutoff.unsqueeze(1)
    metrics = {
        "precision_at_1": (first == 1).to(torch.float64),
        "r_precision": within_r.sum(dim=1) / cutoff,
        "mean_average_precision_at_r": (precision_at_rank * within_r).sum(dim=1) / relevant,
        "mean_average_precision": (precision_at_rank * within_k).sum(dim=1) / relevant,
        "mean_reciprocal_rank": torch.where(first <= k, 1.0 / first, 0.0),
    }
    for recall_k in recall_ks:
        metrics[f"recall_at_{recall_k}"] = (first <= recall_k).to(torch.float64)
    return metrics


def ranks_from_hits(hits: Tensor) -> Tensor:
    """``(Nq, k)`` boolean "the j-th neighbour is a positive" -> the ``(Nq, k)`` ranks that
    :func:`metrics_from_ranks` reads (1-based, ascending, ``inf`` padded)."""
    position = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64, device=hits.device)
    return torch.where(hits, position, math.inf).sort(dim=1).values


# --------------------------------------------------------------------------------------------
# Labels: who is relevant to whom
# --------------------------------------------------------------------------------------------
def _same_label(fn: LabelComparisonFn | None, a: Tensor, b: Tensor) -> Tensor:
    return a == b if fn is None else fn(a, b).bool()


def label_match_counts(
    query_labels: Tensor, reference_labels: Tensor, label_comparison_fn: LabelComparisonFn | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The sorted unique query labels ``(U,)``, how many references match each ``(U,)``, and the
    index of each query's label in the first ``(Nq,)``."""
    unique, inverse = torch.unique(query_labels, return_inverse=True)
    if label_comparison_fn is None:
        ref_unique, ref_counts = torch.unique(reference_labels, return_counts=True)
        slot = torch.searchsorted(ref_unique, unique).clamp(max=len(ref_unique) - 1)
        found = ref_unique[slot] == unique
        counts = torch.where(found, ref_counts[slot], 0)
    else:
        counts = torch.stack(
            [_same_label(label_comparison_fn, u.view(1), reference_labels).sum() for u in unique]
        )
    return unique, counts.long(), inverse


# --------------------------------------------------------------------------------------------
# Exact top-k by streaming
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


def knn(
    query: Tensor,
    k: int,
    reference: Tensor | None = None,
    ref_includes_query: bool = False,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    symmetric: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours by squared Euclidean distance, streamed in chunks.

    Same call as PML's ``knn_func`` (``FaissKNN``), so it can be passed to PML's
    ``AccuracyCalculator`` too. ``reference=None`` means self-retrieval in ``query``. With
    ``ref_includes_query`` (implied by ``reference=None``) query ``i`` is reference ``i`` and is
    excluded by index, never by distance. Neighbours are sorted by (distance, index). Apart from
    the ``(Nq, k)`` result, memory is ``O(chunk_size² + chunk_size·k)`` (plus ``Nq·k`` keys in
    the symmetric self-retrieval mode).

    Shapes: query ``(Nq, D)``, reference ``(Nr, D)`` -> squared distances ``(Nq, k)`` float32 and
    reference indices ``(Nq, k)`` int64.
    """
    query = _as_float32(query, "query")
    if reference is None:
        reference, ref_includes_query = query, True
    else:
        reference = _as_float32(reference, "reference")
        _check_pair(query, reference, ref_includes_query)
    available = len(reference) - int(ref_includes_query)
    if not 0 < k <= available:
        raise ValueError(f"k must be in [1, {available}] for these references, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    dists = torch.empty(len(query), k, dtype=torch.float32, device=query.device)
    indices = torch.empty(len(query), k, dtype=torch.int64, device=query.device)
    for ids, keys in topk_key_chunks(
        query, reference, k, ref_includes_query, chunk_size, symmetric
    ):
        dists[ids] = _decode_dist(keys)
        indices[ids] = _decode_index(keys)
    return dists, indices


# --------------------------------------------------------------------------------------------
# Ranks by counting (large k)
# --------------------------------------------------------------------------------------------
def _labelled_blocks(
    q_aug: Tensor,
    q_labels: Tensor,
    q0: int,
    reference: Tensor,
    r_norms: Tensor,
    reference_labels: Tensor,
    ref_blocks: list[tuple[int, int]],
    ref_includes_query: bool,
    label_comparison_fn: LabelComparisonFn | None,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """For each reference block: its first index, the clamped squared distances to the query
    chunk starting at ``q0`` (``inf`` for a query and itself), and the boolean positive mask
    (never a query and itself)."""
    for r0, r1 in ref_blocks:
        r_aug = _augment(reference[r0:r1], r_norms[r0:r1], as_query=False)
        dist = (q_aug @ r_aug.T).clamp_min_(0)
        positive = _same_label(label_comparison_fn, q_labels.unsqueeze(1), reference_labels[r0:r1])
        if ref_includes_query:
            positive = positive.clone()
            positive[_self_pairs(q0, len(dist), r0, r1 - r0, dist.device)] = False
            _mask_self(dist, q0, r0)
        yield r0, dist, positive


def rank_chunks_by_counting(
    query: Tensor,
    query_labels: Tensor,
    reference: Tensor,
    reference_labels: Tensor,
    ref_includes_query: bool,
    max_rank: int,
    max_positives: int,
    label_comparison_fn: LabelComparisonFn | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(query_ids, ranks)`` for consecutive chunks of queries: the ranks (as in
    :func:`metrics_from_ranks`) of every positive of each up to ``max_rank``, without any top-k
    list.

    Two passes over the references per query chunk: the first collects the distances of the
    positives, the second counts the other references in front of each of them. The ranking is
    the one :func:`knn` produces: by (clamped squared distance, reference index).
    ``max_positives`` (the most positives any query has) sizes the query chunks.
    """
    q_norms = row_squared_norms(query)
    r_norms = row_squared_norms(reference)
    ref_blocks = _chunks(len(reference), chunk_size)
    row_bytes = 24 * (max_positives + 1) + 48 * min(chunk_size, len(reference))
    query_chunk = max(1, min(chunk_size, _RANK_PASS_BYTES // row_bytes))
    for q0, q1 in _chunks(len(query), query_chunk):
        q_aug = _augment(query[q0:q1], q_norms[q0:q1], as_query=True)
        blocks = functools.partial(
            _labelled_blocks, q_aug, query_labels[q0:q1], q0, reference, r_norms,
            reference_labels, ref_blocks, ref_includes_query, label_comparison_fn,
        )  # fmt: skip

        # first pass: the (distance, index) keys of each query's positives, sorted
        rows, keys = [], []
        for r0, dist, positive in blocks():
            row, col = positive.nonzero(as_tuple=True)
            rows.append(row)
            keys.append(_encode(dist[row, col], col + r0))
        positive_keys = _pad_rows(torch.cat(rows), torch.cat(keys), q1 - q0)
        positive_keys = positive_keys.sort(dim=1).values
        n, width = positive_keys.shape
        is_positive = positive_keys != _PAD
        num_positives = is_positive.sum(dim=1)
        positive_dist = torch.where(is_positive, _decode_dist(positive_keys), math.inf)
        positive_index = _decode_index(positive_keys)

        # second pass: for every other reference, the number of positives in front of it
        between = torch.zeros(n * (width + 1), dtype=torch.int64, device=query.device)
        row_base = (torch.arange(n, device=query.device) * (width + 1)).unsqueeze(1)
        for r0, dist, positive in blocks():
            dist.masked_fill_(positive, math.inf)  # positives (and self) land past the last one
            slot = torch.searchsorted(positive_dist, dist)
            slot_right = torch.searchsorted(positive_dist, dist, right=True)
            tie_row, tie_col = (slot_right != slot).nonzero(as_tuple=True)
            genuine = slot[tie_row, tie_col] < num_positives[tie_row]
            tie_row, tie_col = tie_row[genuine], tie_col[genuine]
            if len(tie_row):  # as far as a positive: the smaller index goes first
                lo = slot[tie_row, tie_col]
                span = slot_right[tie_row, tie_col] - lo
                step = torch.arange(int(span.max()), device=query.device)
                tied = (lo.unsqueeze(1) + step).clamp(max=width - 1)
                smaller = positive_index[tie_row.unsqueeze(1), tied] < (tie_col + r0).unsqueeze(1)
                slot[tie_row, tie_col] = lo + (smaller & (step < span.unsqueeze(1))).sum(dim=1)
            between += torch.bincount((slot + row_base).view(-1), minlength=len(between))
        in_front = between.view(n, width + 1)[:, :width].cumsum(dim=1)
        ordinal = torch.arange(1, width + 1, device=query.device)
        ranks = (ordinal + in_front).to(torch.float64)
        ids = torch.arange(q0, q1, device=query.device)
        yield ids, ranks.masked_fill(~is_positive | (ranks > max_rank), math.inf)


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


# --------------------------------------------------------------------------------------------
# Ranks of every query's positives, chunk by chunk
# --------------------------------------------------------------------------------------------
#: The top-k search is used while k <= max(TOPK_MAX_K, TOPK_MAX_FRACTION * Nr); beyond, ranks
#: are counted (:func:`rank_chunks_by_counting`), which does not depend on k.
TOPK_MAX_K = 1024
TOPK_MAX_FRACTION = 1 / 16


def _ranks_of_neighbours(
    ids: Tensor,
    neighbours: Tensor,
    query_labels: Tensor,
    reference_labels: Tensor,
    label_comparison_fn: LabelComparisonFn | None,
) -> Tensor:
    """Ranks of the positives among the ``(n, k)`` nearest references of queries ``ids``."""
    hits = _same_label(
        label_comparison_fn, query_labels[ids].unsqueeze(1), reference_labels[neighbours]
    )
    return ranks_from_hits(hits)


def rank_chunks(
    query: Tensor,
    query_labels: Tensor,
    reference: Tensor,
    reference_labels: Tensor,
    ref_includes_query: bool,
    max_rank: int,
    label_comparison_fn: LabelComparisonFn | None = None,
    knn_func: KnnFn | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(query_ids, ranks)`` for blocks of queries (each query in one block): the 1-based
    ranks of each query's positives up to ``max_rank`` (``inf`` beyond), as
    :func:`metrics_from_ranks` reads.

    With ``knn_func`` (PML's ``knn_func`` convention) its ``(Nq, max_rank)`` neighbours are used.
    """
    ranks_of = functools.partial(
        _ranks_of_neighbours,
        query_labels=query_labels,
        reference_labels=reference_labels,
        label_comparison_fn=label_comparison_fn,
    )
    if knn_func is not None:
        _, indices = knn_func(query, max_rank, reference, ref_includes_query)
        for q0, q1 in _chunks(len(query), chunk_size):
            ids = torch.arange(q0, q1, device=query.device)
            yield ids, ranks_of(ids, indices[q0:q1].to(reference_labels.device))
    elif max_rank <= max(TOPK_MAX_K, TOPK_MAX_FRACTION * len(reference)):
        for ids, keys in topk_key_chunks(
            query, reference, max_rank, ref_includes_query, chunk_size,
            query_groups=query_labels, reference_groups=reference_labels,
        ):  # fmt: skip
            yield ids, ranks_of(ids, _decode_index(keys))
    else:
        _, counts, _ = label_match_counts(query_labels, reference_labels, label_comparison_fn)
        yield from rank_chunks_by_counting(
            query,
            query_labels,
            reference,
            reference_labels,
            ref_includes_query,
            max_rank,
            int(counts.max()),
            label_comparison_fn,
            chunk_size,
        )


# --------------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------------
def faiss_kmeans(x: Tensor, n_clusters: int, niter: int = 20, gpu: bool = False) -> Tensor:
    """Cluster index of each row of ``x`` ``(N, D)`` -> ``(N,)`` int64, by faiss k-means
    (Lloyd, 1982) with faiss' defaults -- the same call as PML's ``FaissKMeans``, hence the same
    clusters."""
    try:
        import faiss
    except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "NMI and AMI cluster with faiss: pip install faiss-cpu (or pass kmeans_func)"
        ) from error
    data = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32))
    kmeans = faiss.Kmeans(data.shape[1], n_clusters, niter=niter, gpu=gpu)
    kmeans.train(data)
    _, assignment = kmeans.index.search(data, 1)
    return torch.from_numpy(assignment[:, 0].astype(np.int64)).to(x.device)


def clustering_scores(labels: Tensor, cluster_labels: Tensor) -> dict[str, float]:
    """``{"NMI": ..., "AMI": ...}`` of a clustering against the labels (both ``(N,)``)."""
    truth, found = labels.cpu().numpy(), cluster_labels.cpu().numpy()
    return {
        "NMI": float(normalized_mutual_info_score(truth, found)),
        "AMI": float(adjusted_mutual_info_score(truth, found)),
    }


# --------------------------------------------------------------------------------------------
# The drop-in calculator
# --------------------------------------------------------------------------------------------
def _check_metric_names(include: Any, exclude: Any) -> None:
    for names in (include, exclude):
        if not isinstance(names, (tuple, list)):
            raise TypeError(f"Arguments must be of type tuple, not {type(names)}.")
        unknown = set(names) - set(ALL_METRICS)
        if unknown:
            raise ValueError(
                f"Unknown metrics {sorted(unknown)}; metrics must be one or more of: "
                f"{list(ALL_METRICS)}."
            )


class AccuracyCalculator:
    """Retrieval and clustering accuracy, with PML 2.9.0's class name, arguments, defaults and
    results: ``get_accuracy(query, query_labels, reference=None, reference_labels=None,
    ref_includes_query=False, include=(), exclude=())`` -> ``{metric name: float}``.

    Metrics (see the module docstring): ``precision_at_1``, ``r_precision``,
    ``mean_average_precision_at_r`` (Musgrave, Belongie & Lim, 2020), ``mean_average_precision``,
    ``mean_reciprocal_rank``, ``NMI``, ``AMI``, and, only when named in ``include``,
    ``recall_at_1``/``_2``/``_4``/``_8`` (Recall@K of deep-metric-learning papers; Song et al.,
    2016). Queries whose label has no other reference are left out of the retrieval metrics
    (every one of them: ``nan``), as in PML.

    Args:
        include, exclude: metric names to compute / skip (``include=()``: PML's seven).
        avg_of_avgs: average per class first, then over classes.
        return_per_class: a list of per-class averages (sorted labels) instead of one number.
        k: neighbours looked at: ``None`` (every reference, PML's default), ``"max_bin_count"``
            (the largest number of references sharing a query label: enough for the R-metrics,
            and much cheaper) or a positive int.
        label_comparison_fn: ``fn(labels_a, labels_b) -> bool tensor`` on broadcastable 1-D
            integer labels, instead of equality (not with NMI/AMI, as in PML).
        device: where to compute (default: CUDA if available, like PML).
        knn_func: PML-style ``knn_func(query, k, reference, ref_includes_query) -> (distances,
            indices)``; default: the streamed exact search of this module.
        kmeans_func: ``kmeans_func(query, n_clusters) -> cluster index per query``; default:
            faiss k-means with ``niter=20`` (PML's ``FaissKMeans``).
        chunk_size: (deepmetric only) queries and references per block of the streamed search.

    Shapes: query ``(Nq, D)``, query_labels ``(Nq,)``, reference ``(Nr, D)``, reference_labels
    ``(Nr,)``; numpy arrays are accepted too.

    Differences from PML 2.9.0, all deliberate:

    * Never an ``Nq × k`` neighbour list (unless a ``knn_func`` is passed): memory is bounded by
      the chunk size, so the default ``k=None`` works at any N (PML needs ``Nq × Nr`` × 12 bytes
      for the faiss search alone, and more for its float64 metric tensors).
    * Ties in distance are broken by the smaller reference index (faiss' order as well); the
      query itself is excluded by index, never by distance.
    * Labels must be 1-D integer tensors (PML casts them to float32, which merges labels above
      2**24); embeddings must be floating point, finite, and are ranked in float32, as in PML.
    * An int ``k`` larger than the number of references is clamped to it (faiss returns index
      ``-1`` there, which PML silently reads as the last reference's label).
    * ``mean_reciprocal_rank`` alone works (PML forgets to run the k-NN search for it), and is
      computed in float64 like the others (PML averages it in float32: ~1e-7 apart).
    * The ``recall_at_K`` metrics are extra; custom ``calculate_*`` methods of a subclass are
      not called (a subclass defining one raises ``NotImplementedError``).
    """

    def __init__(
        self,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        avg_of_avgs: bool = False,
        return_per_class: bool = False,
        k: int | str | None = None,
        label_comparison_fn: LabelComparisonFn | None = None,
        device: torch.device | str | None = None,
        knn_func: KnnFn | None = None,
        kmeans_func: KMeansFn | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        custom = [name for name in dir(self) if name.startswith("calculate_")]
        if custom:
            raise NotImplementedError(
                f"deepmetric's AccuracyCalculator computes a fixed set of metrics from streamed "
                f"rankings and does not call custom methods {custom}"
            )
        _check_metric_names(include, exclude)
        self.original_metrics = [
            m for m in ALL_METRICS if m in (include or DEFAULT_METRICS) and m not in exclude
        ]
        self.curr_metrics = list(self.original_metrics)
        if avg_of_avgs and return_per_class:
            raise ValueError("avg_of_avgs and return_per_class are mutually exclusive")
        self.avg_of_avgs = avg_of_avgs
        self.return_per_class = return_per_class
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.knn_func = knn_func
        self.kmeans_func = kmeans_func
        if not (isinstance(k, int) and k > 0) and k not in (None, "max_bin_count"):
            raise ValueError("k must be an integer greater than 0, or None, or 'max_bin_count'")
        self.k = k
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.label_comparison_fn = label_comparison_fn
        if label_comparison_fn is not None and any(
            m in self.requires_clustering() for m in self.get_curr_metrics()
        ):
            raise NotImplementedError("Unsupported: clustering + custom label comparison")

    # -- PML's public helpers ------------------------------------------------------------------
    def get_curr_metrics(self) -> list[str]:
        return list(self.curr_metrics)

    def requires_clustering(self) -> list[str]:
        return list(CLUSTERING_METRICS)

    def requires_knn(self) -> list[str]:
        return list(KNN_METRICS)

    def description(self) -> str:
        return "avg_of_avgs" if self.avg_of_avgs else ""

    def determine_k(
        self, bin_counts: Tensor, num_reference_embeddings: int, ref_includes_query: bool
    ) -> int:
        """PML's choice of k (before clamping to the number of references)."""
        self_count = int(ref_includes_query)
        max_bin_count = int(bin_counts.max())
        if self.k == "max_bin_count":
            return max_bin_count - self_count
        if self.k is None:
            return num_reference_embeddings - self_count
        assert isinstance(self.k, int)
        r_metrics = {"r_precision", "mean_average_precision_at_r"} & set(self.curr_metrics)
        if self.k < max_bin_count and r_metrics:
            LOGGER.warning(
                "You are computing %s, but k (%d) is less than the max bin count (%d), so these "
                "metrics will be incorrect. Set k='max_bin_count', or use "
                "'mean_average_precision' for MAP@%d.",
                sorted(r_metrics),
                self.k,
                max_bin_count,
                self.k,
            )
        return self.k

    # -- evaluation ------------------------------------------------------------------------------
    def get_accuracy(
        self,
        query: Array,
        query_labels: Array,
        reference: Array | None = None,
        reference_labels: Array | None = None,
        ref_includes_query: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> dict[str, Any]:
        """``{metric: value}`` for the queries ranked against the references (the queries
        themselves, each excluding itself, when ``reference`` is None)."""
        query = _as_float32(query, "query").to(self.device)
        query_labels = check_labels(
            _as_tensor(query_labels, "query_labels").to(self.device), query, "query_labels"
        )
        if reference is None:
            reference, reference_labels, ref_includes_query = query, query_labels, True
        else:
            if reference_labels is None:
                raise ValueError("reference_labels must be given with reference")
            reference = _as_float32(reference, "reference").to(self.device)
            reference_labels = check_labels(
                _as_tensor(reference_labels, "reference_labels").to(self.device),
                reference,
                "reference_labels",
            )
            _check_pair(query, reference, ref_includes_query)
            if ref_includes_query and not torch.equal(query_labels, reference_labels[: len(query)]):
                raise ValueError(
                    "When ref_includes_query is True, the first len(query_labels) elements of "
                    "reference_labels must be equal to query_labels"
                )
        self.curr_metrics = [
            m for m in self.original_metrics if (not include or m in include) and m not in exclude
        ]
        results: dict[str, Any] = {}
        retrieval = [m for m in self.curr_metrics if m in KNN_METRICS]
        if retrieval:
            results.update(
                self._retrieval_metrics(
                    query, query_labels, reference, reference_labels, ref_includes_query, retrieval
                )
            )
        if any(m in CLUSTERING_METRICS for m in self.curr_metrics):
            n_clusters = len(torch.unique(query_labels))
            if self.kmeans_func is None:
                clusters = faiss_kmeans(query, n_clusters, gpu=self.device.type == "cuda")
            else:
                clusters = self.kmeans_func(query, n_clusters)
            results.update(clustering_scores(query_labels, torch.as_tensor(clusters)))
        return {m: results[m] for m in self.curr_metrics}

    def _retrieval_metrics(
        self,
        query: Tensor,
        query_labels: Tensor,
        reference: Tensor,
        reference_labels: Tensor,
        ref_includes_query: bool,
        names: list[str],
    ) -> dict[str, Any]:
        fn = self.label_comparison_fn
        unique, counts, label_index = label_match_counts(query_labels, reference_labels, fn)
        self_count = int(ref_includes_query)
        if ref_includes_query:
            matches_itself = _same_label(fn, unique, unique).long()
            lone_label = counts - matches_itself <= 0
        else:
            lone_label = counts == 0
        scored = ~lone_label[label_index]
        if not bool(scored.any()):
            LOGGER.warning("None of the query labels are in the reference set.")
            nan: float | list[float] = (
                [math.nan] * len(unique) if self.return_per_class else math.nan
            )
            return {name: nan for name in names}

        num_relevant = counts[label_index] - self_count
        available = len(reference) - self_count
        k = min(self.determine_k(counts, len(reference), ref_includes_query), available)
        recall_ks = [rk for rk in RECALL_KS if f"recall_at_{rk}" in names]
        max_rank = min(max([k, *recall_ks]), available)

        classes = torch.unique(query_labels[scored])
        sums = {name: torch.zeros(len(classes), dtype=torch.float64) for name in names}
        sizes = torch.zeros(len(classes), dtype=torch.float64)
        for ids, ranks in rank_chunks(
            query,
            query_labels,
            reference,
            reference_labels,
            ref_includes_query,
            max_rank,
            fn,
            self.knn_func,
            self.chunk_size,
        ):
            keep = scored[ids]
            if not bool(keep.any()):
                continue
            ids = ids[keep]
            per_query = metrics_from_ranks(ranks[keep], num_relevant[ids], k, recall_ks)
            cls = torch.searchsorted(classes, query_labels[ids]).cpu()
            for name in names:
                sums[name].index_add_(0, cls, per_query[name].cpu())
            sizes.index_add_(0, cls, torch.ones(len(cls), dtype=torch.float64))
        return {name: self._average(sums[name], sizes) for name in names}

    def _average(self, sums: Tensor, sizes: Tensor) -> float | list[float]:
        if self.return_per_class:
            return (sums / sizes).tolist()
        if self.avg_of_avgs:
            return float((sums / sizes).mean())
        return float(sums.sum() / sizes.sum())
