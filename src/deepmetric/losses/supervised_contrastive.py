"""Supervised contrastive loss (Khosla et al., 2020), for pairwise labels."""

from __future__ import annotations

from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance, CosineSimilarity
from ..functional import supervised_contrastive_rows
from ..pairwise import RowBlock, pair_blocks_to_learn_from, row_losses
from ..reducers import AvgNonZeroReducer, BaseReducer, LossDict, row_entry
from .base import BaseMetricLossFunction, Batch, LossOptions


class SupConLoss(BaseMetricLossFunction):
    """Each positive of a query should win a softmax over the query's positives and negatives.

    Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu & Krishnan, "Supervised
    Contrastive Learning", NeurIPS 2020 (the multi-positive form of NT-Xent). Arguments and
    defaults as in PML: ``temperature=0.1``, ``CosineSimilarity``, ``AvgNonZeroReducer`` over
    the queries (the formula: :func:`~deepmetric.functional.supervised_contrastive_rows`). A
    query with no positive has a loss of 0; a miner's pairs are merged into masks (duplicates
    count once, as in PML). With a distance instead of a similarity, the logits are the negated
    distances.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(self, temperature: float = 0.1, **options: Unpack[LossOptions]) -> None:
        super().__init__(**options)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def get_default_reducer(self) -> BaseReducer:
        return AvgNonZeroReducer()

    def compute_loss(self, batch: Batch) -> LossDict:
        pairs = pair_blocks_to_learn_from(batch)
        if pairs is None or pairs.n_pos == 0 or pairs.n_neg == 0:
            return self.zero_losses()
        return {"loss": row_entry(row_losses(batch, self.distance, self._rule, pairs))}

    def _rule(self, block: RowBlock) -> tuple[Tensor, Tensor]:
        return supervised_contrastive_rows(block, self.temperature, self.distance)
