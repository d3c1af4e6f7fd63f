"""The base class of every miner, and the cap on negative pairs the pair miners share."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distances import BaseDistance, LpDistance
from ..interfaces import IndicesTuple, Pairs, Triplets
from ..pairwise import Batch, prepare_batch


def empty_indices(n: int, device: torch.device) -> tuple[Tensor, ...]:
    return tuple(torch.empty(0, dtype=torch.long, device=device) for _ in range(n))


def empty_triplets(device: torch.device) -> Triplets:
    a, p, n = empty_indices(3, device)
    return a, p, n


def empty_pairs(device: torch.device) -> Pairs:
    a1, p, a2, n = empty_indices(4, device)
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


def check_max_neg_per_pos(max_neg_per_pos: int | None) -> None:
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
    check_max_neg_per_pos(max_neg_per_pos)
    if max_neg_per_pos is None:
        return pairs
    _, _, a2, n = pairs
    return cap_negatives_by_distance(mat[a2, n], pairs, max_neg_per_pos, is_inverted)


def cap_negatives_by_distance(
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
