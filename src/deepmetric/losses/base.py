"""The call convention shared by every loss.

``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`` as in
pytorch-metric-learning, with ``distance=``, ``reducer=`` and ``embedding_regularizer=`` injected
by keyword. A subclass implements :meth:`BaseMetricLossFunction.compute_loss`, which receives
validated inputs (a :class:`~deepmetric.pairwise.Batch`) and returns a loss dict (see
:mod:`deepmetric.reducers`).
"""

from __future__ import annotations

from typing import Any, TypedDict

from torch import Tensor, nn

from ..distances import BaseDistance, LpDistance
from ..pairwise import Batch, prepare_batch
from ..reducers import BaseReducer, LossDict, MeanReducer, scalar_entry

__all__ = ["BaseMetricLossFunction", "Batch", "LossOptions", "prepare_batch"]


class LossOptions(TypedDict, total=False):
    """The keyword options every loss accepts (typed, one level deep: no ``**kwargs`` chains)."""

    distance: BaseDistance | None
    reducer: BaseReducer | None
    embedding_regularizer: nn.Module | None
    embedding_reg_weight: float


class BaseMetricLossFunction(nn.Module):
    """Base class of every loss: validation, the distance, the reducer and the regularizer.

    Args:
        distance: the pairwise distance or similarity (default per loss, usually
            ``LpDistance()``: Euclidean on L2-normalised embeddings).
        reducer: how per-element losses become a scalar (default per loss).
        embedding_regularizer: optional module mapping embeddings to a scalar penalty.
        embedding_reg_weight: weight of that penalty.
    """

    # Proxy and classification losses need labels even when a miner's indices_tuple is given.
    requires_labels = False
    # Pair-based losses compare queries with references (``ref_emb``, a cross-batch memory,
    # another rank's shard); the proxy and classification losses compare with class weights.
    supports_ref_emb = True

    def __init__(
        self,
        *,
        distance: BaseDistance | None = None,
        reducer: BaseReducer | None = None,
        embedding_regularizer: nn.Module | None = None,
        embedding_reg_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.distance = self.get_default_distance() if distance is None else distance
        self.reducer = self.get_default_reducer() if reducer is None else reducer
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight

    def get_default_distance(self) -> BaseDistance:
        return LpDistance()

    def get_default_reducer(self) -> BaseReducer:
        return MeanReducer()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Any:
        """``(B, D)`` embeddings and ``(B,)`` integer labels -> scalar loss.

        ``indices_tuple`` restricts the loss to a miner's pairs or triplets; ``ref_emb`` and
        ``ref_labels`` (``(R, D)``, ``(R,)``) compare the queries with a separate reference set.
        """
        batch = prepare_batch(
            embeddings, labels, indices_tuple, ref_emb, ref_labels, self.requires_labels
        )
        return self.loss_from_batch(batch)

    def loss_from_batch(self, batch: Batch) -> Any:
        """The loss of an already validated :class:`Batch`: :meth:`compute_loss`, the embedding
        regularizer, then the reducer (for wrappers that adjust the batch, e.g. to exclude
        self-comparisons)."""
        embeddings = batch.embeddings
        loss_dict = self.compute_loss(batch)
        if self.embedding_regularizer is not None:
            penalty = self.embedding_regularizer(embeddings) * self.embedding_reg_weight
            loss_dict["embedding_reg_loss"] = scalar_entry(penalty)
        return self.reducer(loss_dict, embeddings, batch.labels)

    def compute_loss(self, batch: Batch) -> LossDict:
        """The sub-losses of a validated batch, by name: each a whole tensor of losses (a
        :class:`~deepmetric.reducers.LossInfo`), or the
        :class:`~deepmetric.reducers.ReductionStream` that ``self.reducer.stream(name, ...)``
        handed out, fed block by block (when it handed one out: otherwise the losses whole)."""
        raise NotImplementedError

    def zero_losses(self, *names: str) -> LossDict:
        """A loss dict of zeros, for batches with nothing to learn from (the reducer turns them
        into a zero with a zero gradient)."""
        return {name: scalar_entry(0.0) for name in (names or ("loss",))}
