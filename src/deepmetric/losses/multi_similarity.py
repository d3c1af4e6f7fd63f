"""Multi-similarity loss (Wang, Han, Huang, Dong & Scott, 2019)."""

from __future__ import annotations

from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance, CosineSimilarity
from ..functional import multi_similarity_rows
from ..pairwise import RowBlock, pair_blocks_to_learn_from, row_losses
from ..reducers import LossDict, row_entry
from .base import BaseMetricLossFunction, Batch, LossOptions


class MultiSimilarityLoss(BaseMetricLossFunction):
    """Weight every pair by its similarity to the others of its query (soft hard mining).

    Wang, Han, Huang, Dong & Scott, "Multi-Similarity Loss with General Pair Weighting for Deep
    Metric Learning", 2019. Arguments and defaults as in PML: ``alpha=2`` (positive
    temperature), ``beta=50`` (negative temperature), ``base=0.5``, ``CosineSimilarity``,
    ``MeanReducer`` over the queries (the formula:
    :func:`~deepmetric.functional.multi_similarity_rows`).

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(
        self,
        alpha: float = 2,
        beta: float = 50,
        base: float = 0.5,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        if alpha == 0 or beta == 0:
            raise ValueError(f"alpha and beta must be non-zero, got alpha={alpha}, beta={beta}")
        self.alpha = alpha
        self.beta = beta
        self.base = base

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> LossDict:
        pairs = pair_blocks_to_learn_from(batch)
        if pairs is None:
            return self.zero_losses()
        return {"loss": row_entry(row_losses(batch, self.distance, self._rule, pairs))}

    def _rule(self, block: RowBlock) -> tuple[Tensor, Tensor]:
        return multi_similarity_rows(block, self.alpha, self.beta, self.base, self.distance)
