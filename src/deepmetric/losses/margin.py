"""Margin loss (Wu, Manmatha, Smola & Krähenbühl, 2017)."""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from .._pairs import all_triplets, pairs_to_triplets, random_triplets
from ..distances import BaseDistance
from ..reducers import (
    BaseReducer,
    DivisorReducer,
    LossDict,
    LossInfo,
    SelectingReducer,
    ThresholdReducer,
    reduces_by_selection,
)
from .base import BaseMetricLossFunction, Batch, LossOptions

# ``(low, high)`` bounds of the losses a SelectingReducer keeps; None is unbounded.
Bounds = tuple[float | None, float | None]


def margin_losses(
    pos_dists: Tensor, neg_dists: Tensor, beta: Tensor, margin: float, distance: BaseDistance
) -> tuple[Tensor, Tensor]:
    """The two halves of the margin loss: ``relu(d_ap - β + margin)`` for positive pairs and
    ``relu(β - d_an + margin)`` for negative pairs (the other way round for a similarity).

    ``pos_dists``, ``neg_dists`` and ``beta`` broadcast against each other: per-triplet vectors,
    or the whole ``(B, R)`` matrix with a ``(B, 1)`` column of per-anchor betas.
    """
    pos = F.relu(distance.margin(pos_dists, beta) + margin)
    neg = F.relu(distance.margin(beta, neg_dists) + margin)
    return pos, neg


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
    n)`` (see :func:`margin_losses`); the default reducer divides by the number of non-zero
    halves. The sub-losses are ``margin_loss`` and ``beta_reg_loss``.

    Without a miner and with ``triplets_per_anchor="all"`` the ``B·(K-1)·(B-K)`` triplets are
    never enumerated: each positive pair of anchor ``a`` occurs in ``#negatives(a)`` triplets and
    each negative pair in ``#positives(a)``, so every sum and count the reducer needs is a
    weighted sum over the ``(B, R)`` matrix (memory ``O(B·R)``, same value and gradient). This
    holds for :class:`DivisorReducer` and the selecting reducers (mean, sum, threshold,
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
        mat = self.distance(batch.embeddings, batch.ref_emb)
        betas = self._anchor_betas(batch, mat.dtype)
        if batch.indices_tuple is None and self.triplets_per_anchor == "all":
            if _divides_by_loss_divisor(self.reducer):
                return self._all_triplets_loss(mat, betas, *batch.masks(), bounds=None)
            bounds = _selection_bounds(self.reducer)
            if bounds is not None:
                return self._all_triplets_loss(mat, betas, *batch.masks(), bounds=bounds)
        return self._explicit_triplets_loss(mat, betas, batch)

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

    # -- explicit triplets (a miner's tuple, random triplets, other reducers) ---------------------
    def _explicit_triplets_loss(self, mat: Tensor, betas: Tensor, batch: Batch) -> LossDict:
        a, p, n = self._triplets(batch)
        if len(a) == 0:
            return self.zero_losses("margin_loss", "beta_reg_loss")
        beta = betas[a]
        pos, neg = margin_losses(mat[a, p], mat[a, n], beta, self.margin, self.distance)
        divisor = (pos > 0).sum() + (neg > 0).sum()
        margin_info: LossInfo = {
            "losses": pos + neg,
            "indices": (a, p, n),
            "reduction_type": "triplet",
            "divisor": divisor,
        }
        return {"margin_loss": margin_info, "beta_reg_loss": self._reg_info(beta, a, divisor)}

    def _triplets(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        if batch.indices_tuple is not None:
            return pairs_to_triplets(batch.indices_tuple)
        pos_mask, neg_mask = batch.masks()
        if self.triplets_per_anchor == "all":
            return all_triplets(pos_mask, neg_mask)
        return random_triplets(pos_mask, neg_mask, self.triplets_per_anchor)

    def _reg_info(self, beta: Tensor, anchors: Tensor, divisor: Tensor) -> LossInfo:
        """PML's ``beta_reg_loss`` entry: ``nu · beta`` once for a single beta, else per triplet."""
        if not self.learn_beta:
            return {"losses": 0.0, "indices": None, "reduction_type": "already_reduced"}
        if len(self.beta) == 1:
            single = self.beta.to(beta.dtype) * self.nu  # (1,)
            return {"losses": single, "indices": None, "reduction_type": "already_reduced"}
        info: LossInfo = {
            "losses": beta * self.nu,
            "indices": anchors,
            "reduction_type": "element",
            "divisor": divisor,
        }
        return info

    # -- all triplets, reduced from the (B, R) matrix -------------------------------------------
    def _all_triplets_loss(
        self, mat: Tensor, betas: Tensor, pos_mask: Tensor, neg_mask: Tensor, bounds: Bounds | None
    ) -> LossDict:
        """The reduced loss over every triplet of the masks, from per-pair weights.

        Triplet ``(a, p, n)`` has loss ``pos[a, p] + neg[a, n]``. Its sum over the triplets a
        reducer keeps is ``Σ c_pos · pos + Σ c_neg · neg`` over the matrix, where ``c_pos[a, p]``
        counts the kept triplets that contain the positive pair ``(a, p)`` and ``c_neg[a, n]``
        those that contain the negative pair. The counts are constants, so autograd gives the
        same gradient as the explicit sum.

        ``bounds=None`` reduces like :class:`DivisorReducer`: every triplet is kept and the sum is
        divided by the number of non-zero halves. Otherwise the triplets with
        ``low < loss < high`` are kept, and the reducer's ``divisor`` gives the denominator.
        """
        n_pos = pos_mask.sum(dim=1)
        n_neg = neg_mask.sum(dim=1)
        triplets_per_anchor = n_pos * n_neg  # (B,)
        n_triplets = triplets_per_anchor.sum()
        if int(n_triplets) == 0:
            return self.zero_losses("margin_loss", "beta_reg_loss")
        pos, neg = margin_losses(mat, mat, betas.unsqueeze(1), self.margin, self.distance)

        if bounds is None:
            # each positive pair (a, p) is in n_neg[a] triplets, each negative pair in n_pos[a]
            pos_count = pos_mask * n_neg.unsqueeze(1)
            neg_count = neg_mask * n_pos.unsqueeze(1)
            divisor = (pos_count * (pos > 0)).sum() + (neg_count * (neg > 0)).sum()
            n_kept = n_triplets
        else:
            low, high = bounds
            pos_count = _partners_in_bounds(pos, neg, neg_mask, low, high) * pos_mask
            neg_count = _partners_in_bounds(neg, pos, pos_mask, low, high) * neg_mask
            n_kept = pos_count.sum()
            divisor = cast(SelectingReducer, self.reducer).divisor(n_kept, n_triplets)

        if int(n_kept) == 0 or float(divisor) == 0:
            margin_value = (mat * 0).sum()
        else:
            kept_sum = (pos_count.to(mat.dtype) * pos).sum() + (neg_count.to(mat.dtype) * neg).sum()
            margin_value = kept_sum / divisor.to(mat.dtype)
        reg_value = self._all_triplets_reg(betas, triplets_per_anchor, divisor, bounds is None)
        return {
            "margin_loss": _already_reduced(margin_value),
            "beta_reg_loss": _already_reduced(reg_value),
        }

    def _all_triplets_reg(
        self, betas: Tensor, triplets_per_anchor: Tensor, margin_divisor: Tensor, by_divisor: bool
    ) -> Tensor | float:
        """``beta_reg_loss`` over all triplets: each anchor's ``nu · beta`` counted once per
        triplet it anchors, reduced as the explicit per-triplet entry would be."""
        if not self.learn_beta:
            return 0.0
        if len(self.beta) == 1:
            return (self.beta.to(betas.dtype) * self.nu).sum()
        reg = betas * self.nu  # (B,)
        weight = triplets_per_anchor
        if by_divisor:
            divisor = margin_divisor
        else:
            reducer = cast(SelectingReducer, self.reducer)
            weight = weight * reducer.select(reg)
            divisor = reducer.divisor(weight.sum(), triplets_per_anchor.sum())
        if int(weight.sum()) == 0 or float(divisor) == 0:
            return (reg * 0).sum()
        return (weight.to(reg.dtype) * reg).sum() / divisor.to(reg.dtype)


def _partners_in_bounds(
    values: Tensor, partners: Tensor, partner_mask: Tensor, low: float | None, high: float | None
) -> Tensor:
    """``(B, R)`` counts: for each entry ``[a, j]``, how many ``k`` with ``partner_mask[a, k]``
    have ``low < values[a, j] + partners[a, k] < high`` (None: unbounded). ``values`` and
    ``partners`` are non-negative (they are relu outputs).

    Keeping everything, or the non-zero sums (``AvgNonZeroReducer``), is a count per row;
    other bounds take two binary searches per entry in the sorted partners, ``O(B·R log R)``.
    """
    n_partners = partner_mask.sum(dim=1, keepdim=True)
    if high is None and (low is None or low < 0):
        return n_partners.expand_as(values)
    if high is None and low == 0:
        # a sum of two non-negative numbers is non-zero unless both are zero
        nonzero_partners = (partner_mask & (partners > 0)).sum(dim=1, keepdim=True)
        return torch.where(values > 0, n_partners, nonzero_partners)
    # unusable partners sort last as +inf, which is never below a finite bound
    ordered = partners.masked_fill(~partner_mask, float("inf")).sort(dim=1).values
    if high is None:
        below_high = n_partners.expand_as(values)
    else:
        below_high = torch.searchsorted(ordered, (high - values).contiguous(), side="left")
    if low is None:
        return below_high
    at_most_low = torch.searchsorted(ordered, (low - values).contiguous(), side="right")
    return (below_high - at_most_low).clamp_min(0)


def _already_reduced(value: Tensor | float) -> LossInfo:
    return {"losses": value, "indices": None, "reduction_type": "already_reduced"}


def _divides_by_loss_divisor(reducer: BaseReducer) -> bool:
    """True for :class:`DivisorReducer` (unless a subclass changed how it reduces)."""
    return isinstance(reducer, DivisorReducer) and (
        type(reducer).reduce_info is DivisorReducer.reduce_info
    )


def _selection_bounds(reducer: BaseReducer) -> Bounds | None:
    """The ``(low, high)`` a selecting reducer keeps losses within, or None when the reducer is
    not one whose selection is known (then the triplets are enumerated)."""
    if not isinstance(reducer, SelectingReducer) or not reduces_by_selection(reducer):
        return None
    select = type(reducer).select
    if select is SelectingReducer.select:  # keeps everything (mean, sum)
        return (None, None)
    if isinstance(reducer, ThresholdReducer) and select is ThresholdReducer.select:
        return (reducer.low, reducer.high)
    return None
