"""TripletMarginMiner: triplets selected by their margin (as PML's)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch import Tensor

from ..distances import BaseDistance
from ..interfaces import Triplets
from ..pairwise import CHUNK_ELEMENTS, Batch, positive_pair_chunks, triplets_from_masks
from .base import BaseMiner


def triplets_in_margin_band(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    low: float,
    high: float,
    distance: BaseDistance,
    max_elements: int = CHUNK_ELEMENTS,
) -> Triplets:
    """Every triplet whose margin ``m = d(a,n) - d(a,p)`` (``s(a,p) - s(a,n)`` for a similarity)
    satisfies ``low < m <= high``, with ``pos_mask[a, p]`` and ``neg_mask[a, n]``.

    Triplets come out in lexicographic ``(a, p, n)`` order. They are visited one block of
    positive pairs at a time, so memory is bounded by the output, a byte per positive pair and
    reference, and one ``(block, R)`` slice
    (:func:`~deepmetric.pairwise.masks.triplets_from_masks`).

    Shapes: ``mat``, ``pos_mask``, ``neg_mask`` ``(B, R)`` -> three ``(T,)`` int64 tensors.
    """

    def chunks() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for anchors, positives in positive_pair_chunks(pos_mask, mat.shape[1], max_elements):
            ap_dists = mat[anchors, positives].unsqueeze(1)  # (c, 1)
            triplet_margin = distance.margin(mat[anchors], ap_dists)  # (c, R)
            keep = neg_mask[anchors] & (triplet_margin > low) & (triplet_margin <= high)
            yield anchors, positives, keep

    return triplets_from_masks(chunks(), mat.device)


class TripletMarginMiner(BaseMiner):
    """Triplets selected by their margin ``m = d(a,n) - d(a,p)`` (``s(a,p) - s(a,n)`` for a
    similarity), as in PML:

    * ``"all"``: the triplets that violate the margin, ``m <= margin``;
    * ``"hard"``: of those, the ones whose negative is at least as close as the positive,
      ``m <= 0``;
    * ``"semihard"``: of those, the ones whose negative is farther than the positive, ``0 < m``;
    * ``"easy"``: the triplets that satisfy the margin, ``m > margin``.

    The semi-hard triplets are those of Schroff, Kalenichenko & Philbin, "FaceNet: A Unified
    Embedding for Face Recognition and Clustering", 2015. Defaults as in PML: ``margin=0.2``,
    ``type_of_triplets="all"``, ``LpDistance()``.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> ``(a, p, n)``, each ``(T,)`` int64, in
    lexicographic order. Memory is ``O(B·R)`` plus the output: no ``B×R×R`` cube.
    """

    TRIPLET_TYPES = ("all", "hard", "semihard", "easy")

    def __init__(
        self,
        margin: float = 0.2,
        type_of_triplets: str = "all",
        *,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance=distance)
        if type_of_triplets not in self.TRIPLET_TYPES:
            raise ValueError(
                f"type_of_triplets must be one of {self.TRIPLET_TYPES}, got {type_of_triplets!r}"
            )
        self.margin = margin
        self.type_of_triplets = type_of_triplets

    def margin_band(self) -> tuple[float, float]:
        """The ``(low, high]`` interval of triplet margins that ``type_of_triplets`` selects."""
        bands = {
            "all": (-math.inf, self.margin),
            "hard": (-math.inf, min(self.margin, 0.0)),
            "semihard": (0.0, self.margin),
            "easy": (self.margin, math.inf),
        }
        return bands[self.type_of_triplets]

    def mine(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, batch: Batch) -> Triplets:
        low, high = self.margin_band()
        return triplets_in_margin_band(mat, pos_mask, neg_mask, low, high, self.distance)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, type_of_triplets={self.type_of_triplets!r}"
