"""Contrastive loss (Hadsell, Chopra & LeCun, 2006)."""

from __future__ import annotations

from torch import Tensor
from typing_extensions import Unpack

from ..distances import BaseDistance, SNRDistance
from ..functional import contrastive_pairs
from ..pairwise import PairLoss, pair_losses
from ..reducers import AvgNonZeroReducer, BaseReducer, LossDict
from .base import BaseMetricLossFunction, Batch, LossOptions


class ContrastiveLoss(BaseMetricLossFunction):
    """Pull positive pairs within ``pos_margin``; push negative pairs beyond ``neg_margin``.

    Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an Invariant Mapping", 2006.
    Defaults as in PML: ``pos_margin=0, neg_margin=1``, ``AvgNonZeroReducer`` applied to the
    positive and the negative losses separately, then summed. The formula is
    :func:`~deepmetric.functional.contrastive_pairs`; the pair engine picks the pairs and the
    computation (:func:`~deepmetric.pairwise.pair_losses`).

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar.
    """

    def __init__(
        self,
        pos_margin: float = 0,
        neg_margin: float = 1,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def get_default_reducer(self) -> BaseReducer:
        return AvgNonZeroReducer()

    def compute_loss(self, batch: Batch) -> LossDict:
        streams = (
            self.reducer.stream("pos_loss", batch.embeddings),
            self.reducer.stream("neg_loss", batch.embeddings),
        )
        loss = PairLoss(self._positive_rule, self._negative_rule, self.neg_margin)
        entries = pair_losses(batch, self.distance, loss, streams)
        if entries is None:
            return self.zero_losses("pos_loss", "neg_loss")
        return {"pos_loss": entries[0], "neg_loss": entries[1]}

    def _positive_rule(self, dists: Tensor) -> tuple[Tensor, Tensor]:
        return contrastive_pairs(dists, self.pos_margin, True, self.distance)

    def _negative_rule(self, dists: Tensor) -> tuple[Tensor, Tensor]:
        return contrastive_pairs(dists, self.neg_margin, False, self.distance)


class SignalToNoiseRatioContrastiveLoss(ContrastiveLoss):
    """The contrastive loss over the signal-to-noise ratio distance.

    Yuan, Chen, Zhang & Tian, "Signal-To-Noise Ratio: A Robust Distance Metric for Deep Metric
    Learning", CVPR 2019. As PML's: :class:`ContrastiveLoss` with its arguments and defaults
    (``pos_margin=0, neg_margin=1``, ``AvgNonZeroReducer``) and an
    :class:`~deepmetric.distances.SNRDistance`, the only distance it takes.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar.
    """

    def __init__(
        self,
        pos_margin: float = 0,
        neg_margin: float = 1,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(pos_margin=pos_margin, neg_margin=neg_margin, **options)
        if not isinstance(self.distance, SNRDistance):
            raise ValueError(
                "SignalToNoiseRatioContrastiveLoss needs an SNRDistance, got "
                f"{type(self.distance).__name__}"
            )

    def get_default_distance(self) -> BaseDistance:
        return SNRDistance()
