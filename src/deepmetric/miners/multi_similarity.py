"""MultiSimilarityMiner (Wang et al., 2019): the informative pairs of each anchor."""

from __future__ import annotations

import math

from torch import Tensor

from ..distances import BaseDistance, CosineSimilarity
from ..interfaces import Pairs
from ..pairwise import Batch, pairs_from_masks
from .base import (
    BaseMiner,
    cap_negative_pairs,
    check_max_neg_per_pos,
    empty_pairs,
)


def multi_similarity_pairs(
    mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, epsilon: float, is_inverted: bool
) -> Pairs:
    """The pairs of the multi-similarity miner (Wang et al., 2019), as in PML.

    A positive pair is kept when it is less than ``epsilon`` easier than the anchor's closest
    negative, a negative pair when it is less than ``epsilon`` easier than the anchor's farthest
    positive. For a similarity ``s``: ``s(a,p) - ε < max_n s(a,n)`` and
    ``s(a,n) + ε > min_p s(a,p)``; for a distance ``d``: ``d(a,p) + ε > min_n d(a,n)`` and
    ``d(a,n) - ε < max_p d(a,p)``. A batch without any positive pair or without any negative
    pair gives nothing.

    Shapes: ``mat``, masks ``(B, R)`` -> four 1-D int64 tensors, row-major.
    """
    if not bool(pos_mask.any()) or not bool(neg_mask.any()):
        return empty_pairs(mat.device)
    # the closest negative and the farthest positive of each row (±inf where a row has none)
    inf = math.inf
    if is_inverted:
        closest_neg = mat.masked_fill(~neg_mask, -inf).amax(dim=1, keepdim=True)
        farthest_pos = mat.masked_fill(~pos_mask, inf).amin(dim=1, keepdim=True)
        hard_pos = pos_mask & (mat - epsilon < closest_neg)
        hard_neg = neg_mask & (mat + epsilon > farthest_pos)
    else:
        closest_neg = mat.masked_fill(~neg_mask, inf).amin(dim=1, keepdim=True)
        farthest_pos = mat.masked_fill(~pos_mask, -inf).amax(dim=1, keepdim=True)
        hard_pos = pos_mask & (mat + epsilon > closest_neg)
        hard_neg = neg_mask & (mat - epsilon < farthest_pos)
    return pairs_from_masks(hard_pos, hard_neg)


class MultiSimilarityMiner(BaseMiner):
    """Positive pairs harder than the anchor's easiest-to-confuse negative, and negative pairs
    harder than its least similar positive, each with slack ``epsilon``.

    Wang, Han, Huang, Dong & Scott, "Multi-Similarity Loss with General Pair Weighting for Deep
    Metric Learning", 2019. Defaults as in PML: ``epsilon=0.1``, ``CosineSimilarity()``. See
    :func:`multi_similarity_pairs` for the exact rule. Beyond PML, ``max_neg_per_pos`` caps the
    negatives at that many per positive pair, keeping the hardest (:func:`cap_negative_pairs`).

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> ``(a1, p, a2, n)``, 1-D int64.
    """

    def __init__(
        self,
        epsilon: float = 0.1,
        *,
        max_neg_per_pos: int | None = None,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance=distance)
        check_max_neg_per_pos(max_neg_per_pos)
        self.epsilon = epsilon
        self.max_neg_per_pos = max_neg_per_pos

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def mine(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, batch: Batch) -> Pairs:
        inverted = self.distance.is_inverted
        pairs = multi_similarity_pairs(mat, pos_mask, neg_mask, self.epsilon, inverted)
        return cap_negative_pairs(mat, pairs, self.max_neg_per_pos, inverted)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"
