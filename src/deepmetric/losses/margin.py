"""Margin loss (Wu, Manmatha, Smola & Krähenbühl, 2017)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from ..functional import margin_halves
from ..pairwise import compute_dtype, separable_triplet_losses
from ..reducers import (
    BaseReducer,
    DivisorReducer,
    LossDict,
    LossInfo,
    ReductionStream,
    scalar_entry,
)
from .base import BaseMetricLossFunction, Batch, LossOptions


class MarginLoss(BaseMetricLossFunction):
    """Separate positive pairs from negative pairs by a learnable boundary ``beta``, with slack
    ``margin`` on both sides.

    Wu, Manmatha, Smola & Krähenbühl, "Sampling Matters in Deep Embedding Learning", 2017.
    Arguments and defaults as in PML: ``margin=0.2``, ``nu=0`` (weight of the ``nu · beta``
    regularizer, applied only with ``learn_beta``), ``beta=1.2``, ``triplets_per_anchor="all"``
    (or an integer: that many random triplets per anchor), ``learn_beta=False`` (make ``beta`` an
    ``nn.Parameter``), ``num_classes=None`` (one beta per class, picked by each anchor's label),
    :class:`DivisorReducer`.

    As in PML the loss is a sum over triplets ``(a, p, n)`` of ``pos_loss(a, p) + neg_loss(a,
    n)`` (the formula: :func:`~deepmetric.functional.margin_halves`); the default reducer
    divides by the number of non-zero halves. The sub-losses are ``margin_loss`` and
    ``beta_reg_loss``.

    Without a miner and with ``triplets_per_anchor="all"`` the ``B·(K-1)·(B-K)`` triplets are
    never enumerated (:func:`~deepmetric.pairwise.separable_triplet_losses`): every sum and
    count the reducer needs is a weighted sum over the ``(B, R)`` matrix (memory ``O(B·R)``,
    same value and gradient). This holds for every reducer that reduces a stream of blocks
    (:class:`DivisorReducer` and the selecting reducers: mean, sum, threshold,
    average-non-zero); any other reducer gets the explicit triplets.

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` -> scalar; ``beta`` is ``(1,)`` or
    ``(num_classes,)``.
    """

    beta: Tensor

    def __init__(
        self,
        margin: float = 0.2,
        nu: float = 0,
        beta: float = 1.2,
        triplets_per_anchor: int | Literal["all"] = "all",
        learn_beta: bool = False,
        num_classes: int | None = None,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        if triplets_per_anchor != "all" and not isinstance(triplets_per_anchor, int):
            raise ValueError(
                f"triplets_per_anchor must be 'all' or an int, got {triplets_per_anchor!r}"
            )
        if num_classes is not None and num_classes < 0:
            raise ValueError(f"num_classes must be positive or None, got {num_classes}")
        self.margin = margin
        self.nu = nu
        self.learn_beta = learn_beta
        self.triplets_per_anchor = triplets_per_anchor
        # as in PML, num_classes=0 means a single beta
        initial = torch.full((num_classes or 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(initial)
        else:
            self.register_buffer("beta", initial, persistent=False)

    def get_default_reducer(self) -> BaseReducer:
        return DivisorReducer()

    def compute_loss(self, batch: Batch) -> LossDict:
        dtype = compute_dtype(batch.embeddings)
        betas = self._anchor_betas(batch, dtype)

        def halves(ap: Tensor, an: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
            return margin_halves(ap, an, betas[anchors], self.margin, self.distance)

        # a reducer that reduces blocks of losses (both sub-losses): the triplets are counted
        margin_stream = self.reducer.stream("margin_loss", batch.embeddings)
        reg_stream = self.reducer.stream("beta_reg_loss", batch.embeddings)
        stream = margin_stream if reg_stream is not None else None
        result = separable_triplet_losses(
            batch, self.distance, halves, stream, self.triplets_per_anchor
        )
        if result is None:
            return self.zero_losses("margin_loss", "beta_reg_loss")
        # PML's divisor: the number of non-zero halves of all triplets
        divisor = result.nonzero_halves
        margin_entry = result.losses
        if isinstance(margin_entry, ReductionStream):
            margin_entry.divide_by(divisor)
        else:
            margin_entry["divisor"] = divisor
        reg_entry: LossInfo | ReductionStream
        if result.anchors is not None:  # listed triplets: nu · beta per triplet
            reg_entry = self._reg_info(betas[result.anchors], result.anchors, divisor)
        else:
            assert reg_stream is not None and result.triplets_per_anchor is not None
            reg_entry = self._all_triplets_reg(
                betas, result.triplets_per_anchor, divisor, reg_stream
            )
        return {"margin_loss": margin_entry, "beta_reg_loss": reg_entry}

    # -- the per-anchor beta ----------------------------------------------------------------------
    def _anchor_betas(self, batch: Batch, dtype: torch.dtype) -> Tensor:
        """``(B,)``: the beta of each query (its class's, with ``num_classes``)."""
        beta = self.beta.to(dtype)
        if len(beta) == 1:
            return beta.expand(len(batch.embeddings))
        labels = batch.labels
        if labels is None:
            raise ValueError("MarginLoss with num_classes needs labels to pick each anchor's beta")
        if len(labels) > 0 and (int(labels.min()) < 0 or int(labels.max()) >= len(beta)):
            raise ValueError(
                f"labels must be in [0, num_classes={len(beta)}) to index the per-class betas"
            )
        return beta[labels]

    # -- beta_reg_loss ----------------------------------------------------------------------------
    def _reg_info(self, beta: Tensor, anchors: Tensor, divisor: Tensor) -> LossInfo:
        """PML's ``beta_reg_loss`` entry: ``nu · beta`` once for a single beta, else per triplet."""
        if not self.learn_beta:
            return scalar_entry(0.0)
        if len(self.beta) == 1:
            single = self.beta.to(beta.dtype) * self.nu  # (1,)
            return scalar_entry(single)
        info: LossInfo = {
            "losses": beta * self.nu,
            "indices": anchors,
            "reduction_type": "element",
            "divisor": divisor,
        }
        return info

    def _all_triplets_reg(
        self,
        betas: Tensor,
        triplets_per_anchor: Tensor,
        margin_divisor: Tensor,
        stream: ReductionStream,
    ) -> LossInfo | ReductionStream:
        """``beta_reg_loss`` over all triplets: each anchor's ``nu · beta`` counted once per
        triplet it anchors, reduced as the explicit per-triplet entry would be."""
        if not self.learn_beta or len(self.beta) == 1:
            return self._reg_info(betas, betas, margin_divisor)
        stream.add_losses(betas * self.nu, counts=triplets_per_anchor)
        stream.divide_by(margin_divisor)
        return stream
