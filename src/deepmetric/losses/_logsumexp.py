"""Masked (and weighted) log-sum-exp over the rows of a ``(B, R)`` matrix, and the pair
bookkeeping shared by the pair-based softmax losses (lifted structure, NT-Xent).

The softmax-style losses (lifted structure, NT-Xent) need, for every query row, the
log-sum-exp over *some* of its entries: those a label mask or a miner's pairs select. A miner's
index tuple may name one pair several times (a triplet tuple repeats each negative pair once per
positive), and PML then counts that pair several times; a *count* matrix reproduces this in
``O(B·R)`` memory: ``log Σ_j c_ij exp(x_ij)``.

An empty row (nothing selected) gets a caller-chosen value, and its gradient is zero, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..pairwise import at_most_one_pair_each, to_pairs
from .base import Batch

__all__ = [
    "at_most_one_pair_each",
    "masked_logsumexp",
    "pair_counts",
    "positive_pairs_and_negative_weights",
]


def pair_counts(rows: Tensor, cols: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """``(n,)`` row and column indices -> ``(shape)`` matrix counting how often each pair occurs."""
    counts = torch.zeros(shape, dtype=dtype, device=rows.device)
    ones = torch.ones(len(rows), dtype=dtype, device=rows.device)
    return counts.index_put_((rows, cols), ones, accumulate=True)


def masked_logsumexp(
    x: Tensor, weight: Tensor, dim: int = -1, empty_value: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``log Σ_j w_j exp(x_j)`` along ``dim`` over the entries with ``w_j > 0``.

    Args:
        x: values, any shape.
        weight: same shape; a boolean mask (weight 1 where True) or non-negative counts.
        dim: the dimension to reduce.
        empty_value: the result where no entry is selected (e.g. ``0`` or ``-inf``).

    Returns:
        ``(value, nonempty)``: the reduced values and a boolean tensor, True where at least one
        entry was selected. Gradients are finite everywhere.
    """
    keep = weight if weight.dtype == torch.bool else weight > 0
    if weight.dtype != torch.bool:
        # w·exp(x) = exp(x + log w); unselected entries become -inf below
        x = x + weight.clamp_min(1).log().to(x.dtype)
    nonempty = keep.any(dim=dim)
    z = x.masked_fill(~keep, float("-inf"))
    # an empty row is filled with finite dummies so that logsumexp's backward stays finite; its
    # result is replaced by empty_value below (and passes no gradient back to x)
    z = z.masked_fill(~nonempty.unsqueeze(dim), 0.0)
    value = torch.logsumexp(z, dim=dim).masked_fill(~nonempty, empty_value)
    return value, nonempty


def positive_pairs_and_negative_weights(
    batch: Batch, dtype: torch.dtype
) -> tuple[Tensor, Tensor, int, Tensor]:
    """The positive pairs and the negatives of a batch, as the pair-based softmax losses use them.

    Returns ``(anchors, positives, n_negative_pairs, negative_weight)``: the positive pairs as two
    ``(P,)`` index tensors (a miner's pairs in its order, duplicates kept; otherwise every
    positive pair of the labels in row-major order), how many negative pairs there are, and a
    ``(B, R)`` weight over the distance matrix: the boolean negative mask, or, for a miner's
    tuple, how many times it names each negative pair (PML counts a repeated pair repeatedly).
    """
    n_query, n_ref = len(batch.embeddings), len(batch.ref_emb)
    if batch.indices_tuple is None:
        pos_mask, neg_mask = batch.masks()
        anchors, positives = torch.where(pos_mask)
        return anchors, positives, int(neg_mask.sum()), neg_mask
    anchors, positives, neg_anchors, negatives = to_pairs(batch.indices_tuple)
    counts = pair_counts(neg_anchors, negatives, (n_query, n_ref), dtype)
    return anchors, positives, len(neg_anchors), counts
