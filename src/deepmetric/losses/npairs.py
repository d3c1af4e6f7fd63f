"""N-pair loss (Sohn, 2016)."""

from __future__ import annotations

from typing_extensions import Unpack

from ..distances import BaseDistance, DotProductSimilarity
from ..functional import npairs_rows
from ..pairwise import first_pair_per_label as first_pair_per_label  # (re-export: hdml)
from ..pairwise import npairs_losses
from ..reducers import LossDict
from .base import BaseMetricLossFunction, Batch, LossOptions


class NPairsLoss(BaseMetricLossFunction):
    """One positive pair per class; each anchor classifies its positive among all the positives.

    Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NeurIPS 2016.
    As in PML: no arguments beyond the shared ones, ``DotProductSimilarity()`` (which normalises
    the embeddings by default; a distance is negated into a similarity), ``MeanReducer`` over
    the pairs. The pair kept for each label is the first positive pair (row-major over the
    batch, or in the miner's order) whose anchor has that label. ``labels`` are required, also
    with a miner.

    With ``ref_emb``/``ref_labels`` (which PML rejects) the positives are taken from the reference
    set: anchor ``i`` of the queries, positive ``j`` of the references with the same label.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar. Memory ``O(B·R)``.
    """

    def __init__(self, **options: Unpack[LossOptions]) -> None:
        super().__init__(**options)
        self.num_pairs = 0

    def get_default_distance(self) -> BaseDistance:
        return DotProductSimilarity()

    def compute_loss(self, batch: Batch) -> LossDict:
        if batch.labels is None:
            raise ValueError("NPairsLoss needs labels (it keeps one positive pair per label)")
        distance = self.distance
        losses, anchors = npairs_losses(batch, distance, lambda block: npairs_rows(block, distance))
        self.num_pairs = len(anchors)
        if self.num_pairs == 0:
            return self.zero_losses()
        return {"loss": {"losses": losses, "indices": anchors, "reduction_type": "element"}}
