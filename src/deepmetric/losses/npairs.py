"""N-pair loss (Sohn, 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from .._pairs import to_pairs
from ..distances import BaseDistance, DotProductSimilarity
from ..reducers import LossDict
from .base import BaseMetricLossFunction, Batch, LossOptions


def first_pair_per_label(
    anchors: Tensor, positives: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Keep one positive pair per anchor label: the first in the given order, as PML does.

    ``(P,)`` anchor and positive indices and ``(B,)`` labels -> ``(N,)`` anchors and positives,
    one pair for each of the ``N`` distinct labels, ordered by label.
    """
    unique_labels, label_slot = torch.unique(labels[anchors], sorted=True, return_inverse=True)
    order = torch.arange(len(anchors), device=anchors.device)
    first = torch.full((len(unique_labels),), len(anchors), device=anchors.device)
    first = first.scatter_reduce(0, label_slot, order, reduce="amin")
    return anchors[first], positives[first]


def npairs_losses(sim_mat: Tensor) -> Tensor:
    """``(N, N)`` anchor-by-positive similarities -> ``(N,)`` cross-entropy losses: row ``i``
    should pick its own positive ``i`` among the other pairs' positives."""
    targets = torch.arange(len(sim_mat), device=sim_mat.device)
    return F.cross_entropy(sim_mat, targets, reduction="none")


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
        if batch.indices_tuple is None:
            pos_mask, _ = batch.masks()
            anchors, positives = torch.where(pos_mask)
        else:
            anchors, positives, _, _ = to_pairs(batch.indices_tuple)
        anchors, positives = first_pair_per_label(anchors, positives, batch.labels)
        self.num_pairs = len(anchors)
        if self.num_pairs == 0:
            return self.zero_losses()
        sim_mat = self.distance(batch.embeddings[anchors], batch.ref_emb[positives])
        if not self.distance.is_inverted:
            sim_mat = -sim_mat
        losses = npairs_losses(sim_mat)
        return {"loss": {"losses": losses, "indices": anchors, "reduction_type": "element"}}
