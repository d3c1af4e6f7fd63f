"""Per-positive-pair losses over the whole matrix: for each positive pair, a formula of its
entry and of the negatives of its rows (the softmax-style pair losses: lifted structure,
NT-Xent).

A miner's tuple may name one pair several times (a triplet tuple repeats each negative pair
once per positive), and PML then counts that pair several times; a *count* matrix of the
negatives reproduces this in ``O(B·R)`` memory (``log Σ_j c_ij exp(x_ij)``, see
:func:`~deepmetric.pairwise.masked_logsumexp`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..distances import BaseDistance
from ..reducers import LossInfo
from .batch import Batch
from .masks import at_most_one_pair_each, to_pairs

PositivePairRule = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``(mat, anchors, positives, neg_weight)`` -> the ``(P,)`` losses of the positive pairs
``(anchors[k], positives[k])`` (autograd): ``mat`` the ``(B, R)`` matrix, ``neg_weight`` the
``(B, R)`` boolean mask or count of the negative pairs."""


def positive_pair_losses(
    batch: Batch, distance: BaseDistance, rule: PositivePairRule
) -> LossInfo | None:
    """The ``"pos_pair"`` loss-dict entry of ``rule`` over the positive pairs of ``batch`` (a
    miner's, in its order and with repeats, or every one of the labels in row-major order), on
    the whole ``distance`` matrix; ``None`` when there is nothing to learn from (no positive or
    no negative pair, or PML's rule: at most one of each)."""
    mat = distance(batch.embeddings, batch.ref_emb)
    anchors, positives, n_neg_pairs, neg_weight = positive_pairs_and_negative_weights(
        batch, mat.dtype
    )
    n_pos_pairs = len(anchors)
    if n_pos_pairs == 0 or n_neg_pairs == 0 or at_most_one_pair_each(n_pos_pairs, n_neg_pairs):
        return None
    losses = rule(mat, anchors, positives, neg_weight)
    return {"losses": losses, "indices": (anchors, positives), "reduction_type": "pos_pair"}


def pair_counts(rows: Tensor, cols: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """``(n,)`` row and column indices -> ``(shape)`` matrix counting how often each pair occurs."""
    counts = torch.zeros(shape, dtype=dtype, device=rows.device)
    ones = torch.ones(len(rows), dtype=dtype, device=rows.device)
    return counts.index_put_((rows, cols), ones, accumulate=True)


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
