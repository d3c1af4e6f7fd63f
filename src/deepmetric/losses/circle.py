"""Circle loss (Sun, Cheng, Zhang, Zhang, Zheng, Wang & Wei, 2020), for pairwise labels."""

from __future__ import annotations

from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance, CosineSimilarity
from ..functional import circle_rows
from ..pairwise import RowBlock, pair_blocks_to_learn_from, row_losses
from ..reducers import AvgNonZeroReducer, BaseReducer, LossDict, row_entry
from .base import BaseMetricLossFunction, Batch, LossOptions


class CircleLoss(BaseMetricLossFunction):
    """Re-weight each similarity by how far it is from its optimum, giving a circular decision
    boundary.

    Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization", 2020.
    Arguments and defaults as in PML: ``m=0.4`` (relaxation margin), ``gamma=80`` (scale),
    ``CosineSimilarity``, ``AvgNonZeroReducer`` over the queries (the formula:
    :func:`~deepmetric.functional.circle_rows`).
    The paper suggests ``m=0.25, gamma=256`` for face recognition, ``m=0.25, gamma=128`` for
    person re-identification, ``m=0.4, gamma=80`` for fine-grained retrieval.

    The distance must be a similarity (``is_inverted``); PML accepts only ``CosineSimilarity``,
    this also accepts e.g. ``DotProductSimilarity``.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(
        self,
        m: float = 0.4,
        gamma: float = 80,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        if not self.distance.is_inverted:
            raise ValueError(
                f"CircleLoss needs a similarity (e.g. CosineSimilarity), got "
                f"{type(self.distance).__name__}"
            )
        self.m = m
        self.gamma = gamma

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def get_default_reducer(self) -> BaseReducer:
        return AvgNonZeroReducer()

    def compute_loss(self, batch: Batch) -> LossDict:
        pairs = pair_blocks_to_learn_from(batch)
        if pairs is None:
            return self.zero_losses()
        return {"loss": row_entry(row_losses(batch, self.distance, self._rule, pairs))}

    def _rule(self, block: RowBlock) -> tuple[Tensor, Tensor]:
        return circle_rows(block, self.m, self.gamma)
