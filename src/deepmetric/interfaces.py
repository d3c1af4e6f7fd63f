"""The types that losses, miners and their wrappers exchange, in one module that imports none of
them (as OML's ``oml.interfaces``): index tuples, and the protocols of a miner and of a loss.

Index tuples follow pytorch-metric-learning: ``(anchor, positive, negative)`` for triplets,
``(anchor1, positive, anchor2, negative)`` for pairs, each a 1-D int64 tensor. Anchors index the
queries (``embeddings``); positives and negatives index the references (``ref_emb``, or the
queries themselves when there is none).

A module that needs "some miner" or "some loss" (the cross-batch memory, the distributed
wrappers, the trainer) types it with :class:`Miner` or :class:`MetricLoss` and checks it with
``isinstance`` (both are runtime checkable), so that ``deepmetric.losses`` and
``deepmetric.miners`` never import each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:  # (annotations only)
    from .distances import BaseDistance
    from .pairwise import Batch

Triplets = tuple[Tensor, Tensor, Tensor]
"""``(anchor, positive, negative)``, each ``(T,)`` int64."""
Pairs = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(anchor1, positive, anchor2, negative)``: ``(P,)`` positive and ``(N,)`` negative pairs."""
IndicesTuple = Triplets | Pairs
"""What a miner returns and a loss accepts as ``indices_tuple``."""


@runtime_checkable
class Miner(Protocol):
    """A deepmetric miner (:class:`deepmetric.miners.BaseMiner` and its subclasses).

    ``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` takes ``(B, D)`` queries with
    ``(B,)`` labels (and optionally ``(R, D)`` references with ``(R,)`` labels) and returns an
    :data:`IndicesTuple`. Wrappers that adjust the batch first (to leave out each query's own
    copy among the references) call :meth:`mine` on the batch's distance matrix and masks.
    """

    distance: BaseDistance
    num_triplets: int
    num_pos_pairs: int
    num_neg_pairs: int

    def __call__(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> IndicesTuple: ...

    def mine_batch(self, batch: Batch) -> IndicesTuple:
        """Mine a validated batch (gradients off)."""
        ...

    def mine(self, mat: Tensor, pos_mask: Tensor, neg_mask: Tensor, batch: Batch) -> IndicesTuple:
        """Select from the ``(B, R)`` distance matrix and the boolean ``(B, R)`` label masks."""
        ...


@runtime_checkable
class MetricLoss(Protocol):
    """A deepmetric loss (:class:`deepmetric.losses.BaseMetricLossFunction` and its subclasses).

    ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`` -> a scalar
    (the loss dict itself with ``DoNothingReducer``). :meth:`loss_from_batch` is the same on an
    already validated batch. ``requires_labels``: labels are needed even with a miner's tuple
    (proxy and classification losses); ``supports_ref_emb``: the loss compares the queries with
    a separate reference set (every pair-based loss).
    """

    requires_labels: bool
    supports_ref_emb: bool

    def __call__(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Any: ...

    def loss_from_batch(self, batch: Batch) -> Any:
        """The loss of a validated batch."""
        ...
