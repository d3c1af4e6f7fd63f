"""Ranked list loss (Wang, Hua, Kodirov, Hu, Garnier & Robertson, 2019)."""

from __future__ import annotations

import warnings

from torch import Tensor
from typing_extensions import Unpack

from ..functional import ranked_list_rows
from ..pairwise import PairBlocks, RowBlock, row_losses
from ..reducers import LossDict, row_entry
from .base import BaseMetricLossFunction, Batch, LossOptions


class RankedListLoss(BaseMetricLossFunction):
    """Push every query's negatives beyond ``alpha`` and pull its positives within
    ``alpha - margin``, weighting the violating pairs by how badly they rank.

    Wang et al., "Ranked List Loss for Deep Metric Learning", 2019. Arguments and defaults as in
    PML: ``margin`` and ``Tn`` are required, ``imbalance=0.5`` (weight of the negative part),
    ``alpha=None`` (then ``1 + margin / 2``), ``Tp=0`` (temperatures of the positive and negative
    weights; ``Tp=0`` is RLL-Simpler), ``LpDistance``, ``MeanReducer`` over the queries (see
    :func:`~deepmetric.functional.ranked_list_rows`).

    PML refuses ``indices_tuple`` and ``ref_emb``; here a miner's pairs (or triplets, as pairs)
    restrict the positive and negative sets, and ``ref_emb``/``ref_labels`` supply the ranked
    list.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(
        self,
        margin: float,
        Tn: float,
        imbalance: float = 0.5,
        alpha: float | None = None,
        Tp: float = 0,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        if not 0 <= imbalance <= 1:
            raise ValueError(f"imbalance must be between 0 and 1, got {imbalance}")
        if Tp > 5 or Tn > 5:
            warnings.warn(
                "Values of Tp or Tn are too high. Too large temperature values may lead to "
                "overflow.",
                stacklevel=2,
            )
        self.margin = margin
        self.Tn = Tn
        self.imbalance = imbalance
        self.alpha = 1 + margin / 2 if alpha is None else alpha
        self.Tp = Tp

    def compute_loss(self, batch: Batch) -> LossDict:
        # (no PML rule of "nothing to learn from" here: every query's row is a loss)
        losses = row_losses(batch, self.distance, self._rule, PairBlocks(batch))
        return {"loss": row_entry(losses)}

    def _rule(self, block: RowBlock) -> tuple[Tensor, Tensor]:
        return ranked_list_rows(block, self.margin, self.alpha, self.imbalance, self.Tp, self.Tn)
