"""Miners: pick the informative pairs or triplets of a batch for a loss to train on.

A miner is called as in pytorch-metric-learning (PML 2.9.0)::

    indices_tuple = miner(embeddings, labels, ref_emb=None, ref_labels=None)
    loss = loss_fn(embeddings, labels, indices_tuple)

and returns int64 index tensors on the embeddings' device:

* triplet miners: ``(anchor, positive, negative)``;
* pair miners: ``(anchor1, positive, anchor2, negative)``.

Anchors index ``embeddings``; positives and negatives index ``ref_emb`` (the embeddings
themselves when no reference set is given, in which case a sample is never its own positive).

Every miner reads one ``(B, R)`` distance matrix, computed without autograd, and the boolean
label masks of :mod:`deepmetric.pairwise.masks`. Each is a plain function of that matrix and
those masks (the functional core, usable on its own) wrapped by a thin :class:`BaseMiner`
subclass. Triplets are enumerated one block of positive pairs at a time, never through a
``B×R×R`` cube.
:class:`PairMarginMiner` and :class:`BatchHardMiner` go further for the common distances: they
compute the matrix one block of rows at a time and never hold it, nor the masks, whole (see
:meth:`BaseMiner.mine_batch`); the result is the same.

Beyond PML, the pair miners take ``max_neg_per_pos``: keep at most that many negative pairs per
positive pair (the hardest ones), see :func:`cap_negative_pairs`.
"""

from ..interfaces import IndicesTuple, Pairs, Triplets
from .base import BaseMiner, cap_negative_pairs
from .batch_easy_hard import BatchEasyHardMiner, BatchHardMiner, batch_easy_hard_pairs, pick_per_row
from .distance_weighted import (
    DistanceWeightedMiner,
    distance_weighted_negative_weights,
    distance_weighted_triplets,
)
from .multi_similarity import MultiSimilarityMiner, multi_similarity_pairs
from .pair_margin import PairMarginMiner, pair_margin_pairs
from .triplet_margin import TripletMarginMiner, triplets_in_margin_band

__all__ = [
    "BaseMiner",
    "BatchEasyHardMiner",
    "BatchHardMiner",
    "DistanceWeightedMiner",
    "IndicesTuple",
    "MultiSimilarityMiner",
    "PairMarginMiner",
    "Pairs",
    "TripletMarginMiner",
    "Triplets",
    "batch_easy_hard_pairs",
    "cap_negative_pairs",
    "distance_weighted_negative_weights",
    "distance_weighted_triplets",
    "multi_similarity_pairs",
    "pair_margin_pairs",
    "pick_per_row",
    "triplets_in_margin_band",
]
