"""N-pair loss (Sohn, 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from .._pairs import to_pairs
from ..distances import BaseDistance, DotProductSimilarity
from ..reducers import LossDict
from ._blockwise import as_compared, pairs_are_the_labels
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


def first_pair_per_label_from_labels(
    labels: Tensor, ref_labels: Tensor, same_source: bool
) -> tuple[Tensor, Tensor]:
    """:func:`first_pair_per_label` over every positive pair of the labels (row-major), found
    from the sorted labels alone: a label's first pair is its first query, with its second
    sample (the references are the queries) or its first reference; labels without a positive
    pair are left out.

    ``(B,)`` labels, ``(R,)`` reference labels -> ``(N,)`` anchors and positives, by label.
    """
    order = torch.argsort(labels, stable=True)  # equal labels keep ascending indices
    sorted_labels = labels[order]
    starts_group = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts_group[1:] = sorted_labels[1:] != sorted_labels[:-1]
    firsts = torch.where(starts_group)[0]  # positions of each label's first query
    group_labels = sorted_labels[firsts]
    if same_source:
        seconds = (firsts + 1).clamp_max(len(labels) - 1)
        has_pair = sorted_labels[seconds] == group_labels
        has_pair &= firsts + 1 < len(labels)
        return order[firsts[has_pair]], order[seconds[has_pair]]
    if len(ref_labels) == 0:
        empty = torch.empty(0, dtype=torch.long, device=labels.device)
        return empty, empty.clone()
    ref_order = torch.argsort(ref_labels, stable=True)
    sorted_ref = ref_labels[ref_order]
    ref_firsts = torch.searchsorted(sorted_ref, group_labels).clamp_max(len(ref_labels) - 1)
    has_pair = sorted_ref[ref_firsts] == group_labels
    return order[firsts[has_pair]], ref_order[ref_firsts[has_pair]]


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
        if pairs_are_the_labels(batch):
            assert batch.ref_labels is not None
            anchors, positives = first_pair_per_label_from_labels(
                batch.labels, batch.ref_labels, batch.same_source
            )
        else:
            if batch.indices_tuple is None:
                anchors, positives = torch.where(batch.masks()[0])
            else:
                anchors, positives, _, _ = to_pairs(batch.indices_tuple)
            anchors, positives = first_pair_per_label(anchors, positives, batch.labels)
        self.num_pairs = len(anchors)
        if self.num_pairs == 0:
            return self.zero_losses()
        # the rows were validated with the batch: compare them without checking them again
        if batch.same_source:  # one gather (and one scatter in the backward pass) for both
            both = torch.cat([anchors, positives])  # index_select: a cheaper gather than [both]
            rows = as_compared(self.distance, batch.embeddings.index_select(0, both))
            query, ref = rows[: self.num_pairs], rows[self.num_pairs :]
        else:
            query = as_compared(self.distance, batch.embeddings.index_select(0, anchors))
            ref = as_compared(self.distance, batch.ref_emb.index_select(0, positives))
        with torch.autocast(query.device.type, enabled=False):
            sim_mat = self.distance.compute_powered_mat(query, ref)
        if not self.distance.is_inverted:
            sim_mat = -sim_mat
        losses = npairs_losses(sim_mat)
        return {"loss": {"losses": losses, "indices": anchors, "reduction_type": "element"}}
