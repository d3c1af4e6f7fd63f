"""Exact k nearest neighbours: the one search that evaluation, few-shot classification, reports
and the command line share.

:func:`nearest_neighbors` ``(queries, references, k, exclude_self=..., metric=...)`` ->
``(distances, indices)``, nearest first, ties broken by the smaller reference index; with
``exclude_self`` query ``i`` is reference ``i`` and is excluded by index, never by distance.
:func:`neighbor_chunks` yields the same answer a block of queries at a time, so that a caller
that only needs a summary of each query's neighbours (the ranks of its positives, a vote) never
holds all ``Nq × k`` of them.

The search (``engine="torch"``, any device) works on blocks of at most :data:`BLOCK_ENTRIES`
distances, a few large operations each: one matrix product gives a block of queries × references
(squared Euclidean distances from augmented vectors, ``[q, |q|², 1]·[-2r, 1, |r|²]``, in one
product), one ``topk`` keeps the ``k + 1`` nearest of each query, and the rare rows where the
``(k+1)``-th ties with the ``k``-th are sorted whole, so that ties always go to the smaller index
(``topk`` alone breaks them arbitrarily). Where the references do not fit one block, each
reference block's best are merged the same way. Memory: one block, plus ``k`` per query.

Few large operations keep their speed on a CPU shared with other processes, where many small
ones lose the cores to spinning threads (the small ones that follow each block run on one
thread: :func:`one_thread`). On two busy cores this search took half the time of faiss's exact
search (``engine="faiss"``: ``faiss.knn``, what PML's default ``FaissKNN`` runs; Johnson, Douze
& Jégou, "Billion-scale similarity search with GPUs", 2017) at 5k and 20k embeddings. The faiss
engine stays available (CPU, squared Euclidean only: its ties in inner products follow no fixed
rule) and gives the same neighbours up to float32 rounding of nearly equal distances.

Distances are squared Euclidean (``metric="l2"``, smaller is closer, negative rounding noise
read as 0) or inner products (``metric="inner_product"``, larger is closer): the names and values
of faiss and of :class:`~deepmetric.index.EmbeddingIndex`. Embeddings are ranked in float32, as
faiss and PML rank them, or in float64 when both sets are float64 (torch engine).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._checks import check_embeddings

Metric = Literal["l2", "inner_product"]
Engine = Literal["torch", "faiss"]
METRICS = ("l2", "inner_product")
ENGINES = ("torch", "faiss")

#: Default number of queries per chunk of the rank-counting pass and of a ``knn_func``'s output.
DEFAULT_CHUNK_SIZE = 2048
#: Most distances in one block of the search (64 MiB of float32): queries × references.
BLOCK_ENTRIES = 1 << 24
#: A block holds at least this many queries (when there are as many): the references are split
#: into blocks of at most ``BLOCK_ENTRIES / _MIN_BLOCK_QUERIES`` (65536) and their best merged.
_MIN_BLOCK_QUERIES = 256
#: The references' augmented forms are made once and kept when they fit in this many bytes (32k
#: rows of 128-d embeddings); beyond, they are made again for each block, so memory stays bounded.
AUGMENTED_CACHE_BYTES = 1 << 25
#: The faiss engine asks for at most this many bytes of results per call (a distance and an
#: index, 12 bytes, per neighbour): every query at once unless ``Nq × k`` is large.
FAISS_RESULT_BYTES = 1 << 28

_PAD = torch.iinfo(torch.int64).max  # sorts after every real (distance, index) key
_INDEX_BITS = 32
_INDEX_MASK = (1 << _INDEX_BITS) - 1


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


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


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
# The torch engine: blocks of distances, the k smallest of each row
# --------------------------------------------------------------------------------------------
@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU operators of the block on one thread, then restore the thread count.

    For the many small operators on ``Nq × k`` tensors that follow each block (ties, ranks,
    metrics): split over threads, each one waits for every thread at its end, and on a CPU shared
    with other processes that wait dominates (two busy cores, ranks and metrics of 5000 × 22
    neighbours: 176 ms on two threads, 10 ms on one). The large products and ``topk`` keep every
    thread."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _by_value_then_column(values: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``(value, column)`` pairs ``(n, k)``, sorted by value, to be sorted by value then
    column: only the rows with a tie are re-sorted."""
    rows = (values[:, 1:] == values[:, :-1]).any(dim=1).nonzero().squeeze(1)
    if len(rows) == 0:
        return values, columns
    tied_values, tied_columns = values.index_select(0, rows), columns.index_select(0, rows)
    by_column = tied_columns.argsort(dim=1)
    tied_values, tied_columns = tied_values.gather(1, by_column), tied_columns.gather(1, by_column)
    by_value = tied_values.argsort(dim=1, stable=True)
    values = values.index_copy(0, rows, tied_values.gather(1, by_value))
    columns = columns.index_copy(0, rows, tied_columns.gather(1, by_value))
    return values, columns


def smallest_per_row(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest entries of each row of ``scores`` ``(n, m)``, ``k <= m``, as
    ``(values, columns)`` ``(n, k)``, ordered by (value, column): among equal values the
    smaller column is kept and comes first, as a stable sort of each row would give.

    One ``topk`` of ``k + 1``: where its last value is larger than the k-th, the k kept are the
    k smallest whatever ``topk`` did with ties; where they are equal (a tie at the boundary,
    rare in real data), the row is sorted whole.
    """
    n, m = scores.shape
    if k >= m:
        return scores.sort(dim=1, stable=True)
    values, columns = scores.topk(k + 1, dim=1, largest=False, sorted=True)
    with one_thread():
        tied = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
        values, columns = values[:, :k].contiguous(), columns[:, :k].contiguous()
        if len(tied):
            exact_values, exact_columns = scores.index_select(0, tied).sort(dim=1, stable=True)
            values.index_copy_(0, tied, exact_values[:, :k].contiguous())
            columns.index_copy_(0, tied, exact_columns[:, :k].contiguous())
        return _by_value_then_column(values, columns)


def _block_chunks(
    queries: Tensor, references: Tensor, k: int, exclude_self: bool, metric: Metric
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """:func:`neighbor_chunks` by blocks of distances (see the module docstring)."""
    n_query, n_ref = len(queries), len(references)
    width = min(n_ref, max(1, BLOCK_ENTRIES // _MIN_BLOCK_QUERIES))
    rows = max(1, min(n_query, BLOCK_ENTRIES // width))
    ref_spans = _chunks(n_ref, width)
    l2 = metric == "l2"
    q_norms = row_squared_norms(queries) if l2 else None
    r_norms = q_norms if l2 and references is queries else None
    if l2 and r_norms is None:
        r_norms = row_squared_norms(references)

    def ref_form(r0: int, r1: int) -> Tensor:
        if r_norms is None:  # inner products: the rows themselves
            return references[r0:r1]
        return _augment(references[r0:r1], r_norms[r0:r1], as_query=False)

    form_bytes = n_ref * (references.shape[1] + 2) * references.element_size()
    keep_forms = len(ref_spans) == 1 or form_bytes <= AUGMENTED_CACHE_BYTES
    forms = [ref_form(r0, r1) for r0, r1 in ref_spans] if keep_forms else None
    # every block of distances is written into the same memory (a fresh 64 MiB block would
    # fault all its pages in again)
    memory = queries.new_empty(rows * width)
    for q0, q1 in _chunks(n_query, rows):
        q_form = queries[q0:q1]
        if q_norms is not None:
            q_form = _augment(q_form, q_norms[q0:q1], as_query=True)
        best_values, best_columns = [], []
        for b, (r0, r1) in enumerate(ref_spans):
            r_form = forms[b] if forms is not None else ref_form(r0, r1)
            scores = memory[: (q1 - q0) * (r1 - r0)].view(q1 - q0, r1 - r0)
            torch.mm(q_form, r_form.T, out=scores)
            if l2:
                scores.clamp_min_(0)  # rounding noise below 0 reads 0, as in faiss
            else:
                scores.neg_()  # largest product first
            if exclude_self:
                _mask_self(scores, q0, r0)
            values, columns = smallest_per_row(scores, min(k, r1 - r0))
            best_values.append(values)
            best_columns.append(columns + r0)
        with one_thread():
            if len(ref_spans) == 1:
                values, indices = best_values[0], best_columns[0]
            else:  # each block's best, in reference order: positions order ties by index
                values, position = smallest_per_row(torch.cat(best_values, dim=1), k)
                indices = torch.cat(best_columns, dim=1).gather(1, position)
            ids = torch.arange(q0, q1, device=queries.device)
            values = values if l2 else values.neg_()
        yield ids, values, indices


# --------------------------------------------------------------------------------------------
# The faiss engine, and the one entry point
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


def neighbor_chunks(
    queries: Tensor,
    references: Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    metric: Metric = "l2",
    engine: Engine = "torch",
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(query_ids, distances, indices)`` for blocks of queries: the ``(len(query_ids),
    k)`` nearest references of each (see :func:`nearest_neighbors`). Every query is in exactly
    one block. Inputs are checked float32 tensors on one device (:func:`nearest_neighbors`
    checks them); ``1 <= k <= len(references) - exclude_self``.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "torch":
        yield from _block_chunks(queries, references, k, exclude_self, metric)
        return
    if queries.device.type != "cpu" or metric != "l2" or _faiss_module() is None:
        raise ValueError(
            "engine='faiss' needs CPU tensors, metric='l2' and faiss (pip install faiss-cpu); "
            "use engine='torch'"
        )
    yield from _faiss_chunks(queries, references, k, exclude_self)


def nearest_neighbors(
    queries: Tensor | np.ndarray,
    references: Tensor | np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    metric: Metric = "l2",
    engine: Engine = "torch",
) -> tuple[Tensor, Tensor]:
    """Exact ``k`` nearest references of every query.

    Args:
        queries: ``(Nq, D)`` floating point: ranked in float64 if both are float64 (and the
            engine is torch), else in float32.
        references: ``(Nr, D)``, on the queries' device.
        k: neighbours per query, ``1 <= k <= Nr - exclude_self``.
        exclude_self: the references start with the queries (query ``i`` is reference ``i``,
            checked), and no query is its own neighbour. It is excluded by index: a duplicate
            of it at distance 0 stays a neighbour.
        metric: ``"l2"`` (squared Euclidean, ascending) or ``"inner_product"`` (descending).
        engine: ``"torch"`` (any device) or ``"faiss"`` (CPU, ``"l2"``); see the module
            docstring.

    Returns:
        ``(distances, indices)``, both ``(Nq, k)``: squared distances (or inner products) in
        the precision of the ranking, and int64 reference indices, nearest first, ties by the
        smaller index.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    pair = (_as_tensor(queries, "queries"), _as_tensor(references, "references"))
    in_float64 = engine == "torch" and all(x.dtype == torch.float64 for x in pair)
    q = _as_float32(queries, "queries", keep_float64=in_float64)
    r = q if references is queries else _as_float32(references, "references", in_float64)
    if r.device != q.device:
        raise ValueError(f"queries are on {q.device} but references on {r.device}")
    _check_pair(q, r, exclude_self)
    available = len(r) - int(exclude_self)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= available:
        raise ValueError(f"k must be an int in [1, {available}] for these references, got {k!r}")
    dists = torch.empty(len(q), k, dtype=q.dtype, device=q.device)
    indices = torch.empty(len(q), k, dtype=torch.int64, device=q.device)
    for ids, chunk_dists, chunk_indices in neighbor_chunks(
        q, r, k, exclude_self=exclude_self, metric=metric, engine=engine
    ):
        dists[ids] = chunk_dists
        indices[ids] = chunk_indices
    return dists, indices


def knn(
    query: Tensor,
    k: int,
    reference: Tensor | None = None,
    ref_includes_query: bool = False,
    *,
    engine: Engine = "torch",
) -> tuple[Tensor, Tensor]:
    """:func:`nearest_neighbors` (squared Euclidean) called as PML's ``knn_func``
    (``FaissKNN``), so it can be passed to PML's ``AccuracyCalculator`` too: ``reference=None``
    is self-retrieval in ``query``, ``ref_includes_query`` is ``exclude_self``.

    Shapes: query ``(Nq, D)``, reference ``(Nr, D)`` -> squared distances ``(Nq, k)`` float32
    and reference indices ``(Nq, k)`` int64.
    """
    if reference is None:
        reference, ref_includes_query = query, True
    return nearest_neighbors(query, reference, k, exclude_self=ref_includes_query, engine=engine)


def topk_key_chunks(
    query: Tensor, reference: Tensor, k: int, ref_includes_query: bool
) -> Iterator[tuple[Tensor, Tensor]]:
    """:func:`neighbor_chunks` (squared Euclidean, float32 inputs) with each neighbour packed
    into one int64 (distance, index) key that sorts as the neighbours do: yields
    ``(query_ids, keys (len(query_ids), k))``."""
    for ids, dists, indices in neighbor_chunks(
        query, reference, k, exclude_self=ref_includes_query
    ):
        yield ids, _encode(dists, indices)


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


def _as_float32(embeddings: Any, name: str, keep_float64: bool = False) -> Tensor:
    """Validated ``(N, D)`` float32 embeddings (the precision PML and faiss rank in); float64
    ones stay float64 with ``keep_float64``."""
    embeddings = _as_tensor(embeddings, name)
    check_embeddings(embeddings, name)
    if len(embeddings) == 0:
        raise ValueError(f"{name} must contain at least one embedding")
    keep = keep_float64 and embeddings.dtype == torch.float64
    embeddings = embeddings.detach().to(torch.float64 if keep else torch.float32).contiguous()
    if not bool(torch.isfinite(row_squared_norms(embeddings)).all()):
        raise ValueError(f"{name} are too large: squared norms overflow {embeddings.dtype}")
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
