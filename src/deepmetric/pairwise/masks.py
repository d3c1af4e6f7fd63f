"""Label masks over the ``B × R`` distance matrix, and conversions between masks, pair lists and
PML-style index tuples.

* ``pos_mask[i, j]`` is True when query ``i`` and reference ``j`` share a label (and are not the
  same sample, when the references are the queries themselves);
* ``neg_mask[i, j]`` is True when their labels differ.

Index tuples follow pytorch-metric-learning: ``(anchor, positive, negative)`` for triplets,
``(anchor1, positive, anchor2, negative)`` for pairs. Triplets are never enumerated through a
B×R×R cube: they are built one chunk of positive pairs at a time (:func:`positive_pair_chunks`),
so memory grows with the number of triplets, not with B³.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

# Upper bound on the number of elements of one (chunk of positive pairs) × R block.
CHUNK_ELEMENTS = 1 << 22


def label_masks(labels: Tensor, ref_labels: Tensor, same_source: bool) -> tuple[Tensor, Tensor]:
    """``(B,)``, ``(R,)`` labels -> boolean ``(B, R)`` positive and negative masks.

    ``same_source`` means the references are the queries themselves, so the diagonal (a sample
    paired with itself) is not a positive.
    """
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    neg_mask = ~same
    if same_source:
        same.fill_diagonal_(False)
    return same, neg_mask


def masks_from_indices(
    indices_tuple: tuple[Tensor, ...], n_query: int, n_ref: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """A miner's index tuple -> boolean ``(B, R)`` positive and negative masks.

    Duplicate pairs merge into one entry, as in PML's matrix-based losses.
    """
    a1, p, a2, n = to_pairs(indices_tuple)
    pos_mask = torch.zeros(n_query, n_ref, dtype=torch.bool, device=device)
    neg_mask = torch.zeros(n_query, n_ref, dtype=torch.bool, device=device)
    pos_mask[a1, p] = True
    neg_mask[a2, n] = True
    return pos_mask, neg_mask


def to_pairs(indices_tuple: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triplets ``(a, p, n)`` -> pairs ``(a, p, a, n)``; pairs pass through."""
    if len(indices_tuple) == 4:
        a1, p, a2, n = indices_tuple
        return a1, p, a2, n
    a, p, n = indices_tuple
    return a, p, a, n


def pairs_from_masks(pos_mask: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All positive and negative pairs of the masks, in row-major order."""
    a1, p = torch.where(pos_mask)
    a2, n = torch.where(neg_mask)
    return a1, p, a2, n


def pairs_to_triplets(pairs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs ``(a1, p, a2, n)`` -> every triplet ``(a, p, n)`` whose two pairs share the anchor.

    Matches PML's ``convert_to_triplets`` (same order), but joins through a sort instead of an
    ``len(a1) × len(a2)`` comparison matrix.
    """
    if len(pairs) == 3:
        a, p, n = pairs
        return a, p, n
    a1, p, a2, n = pairs
    order = torch.argsort(a2, stable=True)
    a2_sorted, n_sorted = a2[order], n[order]
    a1 = a1.contiguous()  # (searchsorted copies a strided input, with a warning)
    start = torch.searchsorted(a2_sorted, a1, side="left")
    count = torch.searchsorted(a2_sorted, a1, side="right") - start
    pos_index = torch.repeat_interleave(torch.arange(len(a1), device=a1.device), count)
    # offset of each triplet within its anchor's run of negatives
    run_start = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    within = torch.arange(len(pos_index), device=a1.device) - run_start
    neg_index = torch.repeat_interleave(start, count) + within
    return a1[pos_index], p[pos_index], n_sorted[neg_index]


def positive_pair_chunks(
    pos_mask: Tensor, n_ref: int, max_elements: int = CHUNK_ELEMENTS
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(anchors, positives)`` index chunks of the positive pairs in row-major order, each
    small enough that a ``(chunk, n_ref)`` block stays under ``max_elements``."""
    anchors, positives = torch.where(pos_mask)
    step = max(1, max_elements // max(1, n_ref))
    for start in range(0, len(anchors), step):
        yield anchors[start : start + step], positives[start : start + step]


def triplets_from_masks(
    chunks: Iterable[tuple[Tensor, Tensor, Tensor]], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, p, n)`` for every ``True`` entry ``[i, n]`` of each chunk's ``(c, R)`` boolean mask,
    whose row ``i`` stands for the pair ``(anchors[i], positives[i])``: in chunk order, then
    row-major.

    The masks (a byte per entry, a fraction of the output) are all kept and counted before the
    output is allocated and filled in place: the peak is the output and the masks, where
    concatenating per-chunk results would hold the output twice. (At B = 2048 with 4 samples per
    class a semi-hard miner returns 6 million triplets: 140 MB, 280 MB concatenated.)

    Shapes: per chunk ``(c,)`` anchors and positives and a ``(c, R)`` mask -> three ``(T,)``
    int64 tensors.
    """
    kept = list(chunks)
    counts = [int(torch.count_nonzero(mask)) for _, _, mask in kept]
    a, p, n = (torch.empty(sum(counts), dtype=torch.long, device=device) for _ in range(3))
    offset = 0
    for (anchors, positives, mask), count in zip(kept, counts, strict=True):
        part = slice(offset, offset + count)
        flat = torch.nonzero(mask.reshape(-1)).squeeze(1)  # row * R + column
        torch.remainder(flat, mask.shape[1], out=n[part])
        rows = flat.div_(mask.shape[1], rounding_mode="floor")
        torch.index_select(anchors, 0, rows, out=a[part])
        torch.index_select(positives, 0, rows, out=p[part])
        offset += count
    return a, p, n


def all_triplets(
    pos_mask: Tensor, neg_mask: Tensor, max_elements: int = CHUNK_ELEMENTS
) -> tuple[Tensor, Tensor, Tensor]:
    """Every ``(a, p, n)`` with ``pos_mask[a, p]`` and ``neg_mask[a, n]``, in lexicographic order,
    enumerated in bounded chunks (see :func:`triplets_from_masks`)."""
    chunks = positive_pair_chunks(pos_mask, neg_mask.shape[1], max_elements)
    return triplets_from_masks(
        ((anchors, positives, neg_mask[anchors]) for anchors, positives in chunks),
        pos_mask.device,
    )


def random_triplets(
    pos_mask: Tensor,
    neg_mask: Tensor,
    triplets_per_anchor: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """For every anchor with at least one positive and one negative, ``triplets_per_anchor``
    triplets with a uniformly random positive and a uniformly random negative (with replacement),
    as PML does for an integer ``triplets_per_anchor``."""
    anchors = torch.where(pos_mask.any(dim=1) & neg_mask.any(dim=1))[0]
    if len(anchors) == 0 or triplets_per_anchor <= 0:
        empty = torch.empty(0, dtype=torch.long, device=pos_mask.device)
        return empty, empty.clone(), empty.clone()
    a = anchors.repeat_interleave(triplets_per_anchor)
    return a, sample_in_rows(pos_mask, a, generator), sample_in_rows(neg_mask, a, generator)


def sample_in_rows(mask: Tensor, rows: Tensor, generator: torch.Generator | None) -> Tensor:
    """For each entry of ``rows``, a uniformly random column where ``mask[row]`` is True (every
    requested row must have one). Works on the list of True entries, never a dense copy."""
    true_rows, true_cols = torch.where(mask)
    counts = mask.sum(dim=1)
    row_start = torch.cumsum(counts, 0) - counts
    u = torch.rand(len(rows), generator=generator, device=mask.device)
    k = (u * counts[rows]).long().clamp_max(counts[rows] - 1)
    return true_cols[row_start[rows] + k]


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


def at_most_one_pair_each(n_pos_pairs: int, n_neg_pairs: int) -> bool:
    """PML's rule for every pair-based loss: with at most one positive and at most one negative
    pair there is nothing to learn from, and the loss is zero."""
    return n_pos_pairs <= 1 and n_neg_pairs <= 1
