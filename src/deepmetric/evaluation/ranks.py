"""Where each query's positives (references sharing its label) land in its ranking of the
references: the input of :func:`~deepmetric.evaluation.metrics.metrics_from_ranks`.

Two ways, chosen by how deep the ranking must go (``max_rank``):

* **from the nearest neighbours** (:func:`~deepmetric.evaluation.neighbors.neighbor_chunks`), for
  a ``max_rank`` up to :data:`TOPK_MAX_K` or a sixteenth of the references: the positives among
  each query's ``max_rank`` nearest references;
* **by counting**, for a deeper ranking (PML's default ``k=None`` ranks every reference): for a
  query chunk, one pass collects the distances of its positives; a second pass counts, for
  every other reference, how many positives it precedes (``searchsorted`` into the sorted
  positive distances). Rank of a positive = its position among the positives + the number of
  other references before it. Memory is ``O(chunk × (max positives + reference chunk))``,
  whatever the depth.

Both rank by (squared Euclidean distance, reference index), the query itself excluded by index.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .neighbors import (
    _PAD,
    DEFAULT_CHUNK_SIZE,
    Engine,
    _augment,
    _chunks,
    _decode_dist,
    _decode_index,
    _encode,
    _mask_self,
    _pad_rows,
    _self_pairs,
    neighbor_chunks,
    one_thread,
    row_squared_norms,
)

LabelComparisonFn = Callable[[Tensor, Tensor], Tensor]
KnnFn = Callable[..., tuple[Tensor, Tensor]]
#: Rough bound on the bytes of the temporaries of one step of the rank-counting pass.
_RANK_PASS_BYTES = 1 << 27


# --------------------------------------------------------------------------------------------
# Ranks from the nearest neighbours
# --------------------------------------------------------------------------------------------
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
    the torch engine's of :func:`~deepmetric.evaluation.neighbors.nearest_neighbors`: by
    (clamped squared distance, reference index).
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
    engine: Engine = "torch",
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(query_ids, ranks)`` for blocks of queries (each query in one block): the 1-based
    ranks of each query's positives up to ``max_rank`` (``inf`` beyond), as
    :func:`~deepmetric.evaluation.metrics.metrics_from_ranks` reads.

    With ``knn_func`` (PML's ``knn_func`` convention) its ``(Nq, max_rank)`` neighbours are used;
    otherwise ``engine`` searches them (:func:`~deepmetric.evaluation.neighbors.neighbor_chunks`).
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
            with one_thread():
                ranks = ranks_of(ids, indices[q0:q1].to(reference_labels.device))
            yield ids, ranks
    elif max_rank <= max(TOPK_MAX_K, TOPK_MAX_FRACTION * len(reference)):
        for ids, _, indices in neighbor_chunks(
            query, reference, max_rank, exclude_self=ref_includes_query, engine=engine
        ):
            with one_thread():
                ranks = ranks_of(ids, indices)
            yield ids, ranks
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
