"""DistanceWeightedMiner (Wu et al., 2017): negatives sampled by inverse density."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..distances import BaseDistance, LpDistance
from ..interfaces import Triplets
from ..pairwise import Batch, sample_in_rows
from .base import (
    BaseMiner,
    empty_triplets,
)


def distance_weighted_negative_weights(
    mat: Tensor, neg_mask: Tensor, dim: int, cutoff: float, nonzero_loss_cutoff: float
) -> Tensor:
    """Unnormalised sampling weights of the negatives, ``1 / q(max(d, cutoff))``.

    ``q(d) ∝ d^(n-2) (1 - d²/4)^((n-3)/2)`` is the density of the distance between two points
    drawn uniformly on the unit sphere of ``R^n`` (Wu et al., 2017, Sec. 4), ``n = dim``.
    Weights are zero off ``neg_mask``, where ``max(d, cutoff) >= nonzero_loss_cutoff``, and
    where ``q`` is not finite and positive (``d >= 2``). Each row is scaled so that its largest
    weight is 1.

    Shapes: ``mat`` (Euclidean distances of unit vectors), ``neg_mask`` ``(B, R)`` -> ``(B, R)``.
    """
    if mat.shape[1] == 0:
        return torch.zeros_like(mat)
    clamped = mat.clamp_min(cutoff)
    log_weights = (2.0 - dim) * torch.log(clamped) - ((dim - 3) / 2) * torch.log(
        1.0 - 0.25 * clamped**2
    )
    eligible = neg_mask & (clamped < nonzero_loss_cutoff) & torch.isfinite(log_weights)
    log_weights = log_weights.masked_fill(~eligible, -math.inf)
    row_max = log_weights.amax(dim=1, keepdim=True)
    row_max = row_max.masked_fill(~torch.isfinite(row_max), 0.0)  # rows without any candidate
    return torch.exp(log_weights - row_max)


def distance_weighted_triplets(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    dim: int,
    cutoff: float,
    nonzero_loss_cutoff: float,
    same_source: bool,
    generator: torch.Generator | None = None,
) -> Triplets:
    """Random triplets whose negatives are drawn with :func:`distance_weighted_negative_weights`.

    As in PML, every anchor with a positive and a negative of nonzero weight gets as many
    triplets as its class has reference samples (the anchor included when the references are
    the queries), each with a uniformly random positive and a weighted random negative, both drawn
    with replacement.

    Shapes: ``mat``, masks ``(B, R)`` -> three ``(T,)`` int64 tensors, grouped by anchor.
    """
    weights = distance_weighted_negative_weights(mat, neg_mask, dim, cutoff, nonzero_loss_cutoff)
    anchors = torch.where(pos_mask.any(dim=1) & (weights > 0).any(dim=1))[0]
    if len(anchors) == 0:
        return empty_triplets(mat.device)
    per_anchor = pos_mask[anchors].sum(dim=1) + int(same_source)
    a = anchors.repeat_interleave(per_anchor)
    p = sample_in_rows(pos_mask, a, generator)
    # draw the most any anchor needs, then keep each anchor's first `per_anchor` draws
    most = int(per_anchor.max())
    draws = torch.multinomial(weights[anchors], most, replacement=True, generator=generator)
    wanted = torch.arange(most, device=mat.device).unsqueeze(0) < per_anchor.unsqueeze(1)
    return a, p, draws[wanted]


class DistanceWeightedMiner(BaseMiner):
    """Random triplets whose negatives are sampled with weight inverse to the density of
    distances on the unit sphere, so that all distances are represented, not just the
    concentrated ones around ``√2``.

    Wu, Manmatha, Smola & Krähenbühl, "Sampling Matters in Deep Embedding Learning", 2017.
    Defaults as in PML: ``cutoff=0.5`` (distances below it are weighted as ``cutoff``, against
    the high variance of near points), ``nonzero_loss_cutoff=1.4`` (negatives at or beyond it are
    never drawn). The distance must be ``LpDistance(p=2, power=1, normalize_embeddings=True)``.
    See :func:`distance_weighted_triplets` for how many triplets each anchor gets.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> ``(a, p, n)``, 1-D int64.
    """

    def __init__(
        self,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        *,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance=distance)
        d = self.distance
        if not (isinstance(d, LpDistance) and d.p == 2 and d.power == 1 and d.normalize_embeddings):
            raise ValueError(
                "DistanceWeightedMiner requires LpDistance(p=2, power=1, "
                f"normalize_embeddings=True), got {d!r}"
            )
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = float(nonzero_loss_cutoff)

    def mine(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, batch: Batch) -> Triplets:
        return distance_weighted_triplets(
            mat,
            pos_mask,
            neg_mask,
            batch.embeddings.shape[1],
            self.cutoff,
            self.nonzero_loss_cutoff,
            batch.same_source,
        )

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, nonzero_loss_cutoff={self.nonzero_loss_cutoff}"
