"""Triplet margin loss (Schroff, Kalenichenko & Philbin, FaceNet, 2015)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor
from typing_extensions import Unpack

from ..functional import triplet_margin
from ..pairwise import triplet_losses
from ..reducers import AvgNonZeroReducer, BaseReducer, LossDict
from .base import BaseMetricLossFunction, Batch, LossOptions


class TripletMarginLoss(BaseMetricLossFunction):
    """Every anchor should be closer to its positive than to its negative by ``margin``.

    Schroff, Kalenichenko & Philbin, "FaceNet: A Unified Embedding for Face Recognition and
    Clustering", 2015. Arguments and defaults as in PML: ``margin=0.05``, ``swap=False`` (use the
    positive-negative distance when it violates the margin more; Balntas 2016),
    ``smooth_loss=False`` (softplus instead of relu), ``triplets_per_anchor="all"`` (or an
    integer: that many random triplets per anchor), ``AvgNonZeroReducer``.

    The formula is :func:`~deepmetric.functional.triplet_margin`; the pair engine picks the
    triplets and the computation (:func:`~deepmetric.pairwise.triplet_losses`). Without a miner
    the loss covers all ``B·(K-1)·(B-K)`` triplets, but never holds them in memory: they are
    visited one block of positive pairs at a time and the gradient with respect to the
    ``(B, R)`` distance matrix is accumulated in closed form, so memory stays ``O(B·R)``.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar.
    """

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        triplets_per_anchor: int | Literal["all"] = "all",
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        if triplets_per_anchor != "all" and not isinstance(triplets_per_anchor, int):
            raise ValueError(
                f"triplets_per_anchor must be 'all' or an int, got {triplets_per_anchor!r}"
            )
        self.margin = margin
        self.swap = swap
        self.smooth_loss = smooth_loss
        self.triplets_per_anchor = triplets_per_anchor

    def get_default_reducer(self) -> BaseReducer:
        return AvgNonZeroReducer()

    def compute_loss(self, batch: Batch) -> LossDict:
        entry = triplet_losses(
            batch,
            self.distance,
            self._rule,
            self.reducer.stream("loss", batch.embeddings),
            self.swap,
            self.triplets_per_anchor,
        )
        return self.zero_losses() if entry is None else {"loss": entry}

    def _rule(self, ap: Tensor, an: Tensor) -> tuple[Tensor, Tensor]:
        return triplet_margin(ap, an, self.margin, self.smooth_loss, self.distance)
