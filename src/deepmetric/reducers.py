"""Reducers turn a loss's per-element (per pair, per triplet, per sample) losses into a scalar.

A loss returns a *loss dict*, as in pytorch-metric-learning::

    {"pos_loss": {"losses": Tensor, "indices": ..., "reduction_type": "pos_pair"}, ...}

and the reducer reduces every entry and sums them. ``reduction_type`` is ``"element"``,
``"pos_pair"``, ``"neg_pair"``, ``"triplet"`` or ``"already_reduced"`` (passed through).

Unlike PML, a reducer never returns NaN: an empty set of losses reduces to a zero that keeps the
graph connected (zero gradient).

The four selecting reducers (:class:`MeanReducer`, :class:`SumReducer`,
:class:`AvgNonZeroReducer`, :class:`ThresholdReducer`) are written as *select, then divide*,
which lets a loss with billions of triplets reduce them chunk by chunk (see
:meth:`SelectingReducer.select` and :meth:`SelectingReducer.divisor`) without materialising them.
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch
from torch import Tensor, nn
from typing_extensions import NotRequired


class LossInfo(TypedDict):
    """One entry of a loss dict (``divisor`` only for :class:`DivisorReducer`)."""

    losses: Tensor | float
    indices: Any
    reduction_type: str
    divisor: NotRequired[float | Tensor]


LossDict = dict[str, LossInfo]


def zero_loss(embeddings: Tensor) -> Tensor:
    """A float32 scalar 0 connected to ``embeddings`` (its gradient is zero, never NaN)."""
    # one element is enough to connect the graph: no (B, D) product (nor copy) on every call
    return embeddings.reshape(-1)[:1].float().sum() * 0


def sum_reduced(parts: list[Tensor], embeddings: Tensor) -> Tensor:
    """The sum of reduced entries as a float32 (or float64) scalar that is connected to
    ``embeddings`` whenever they require a gradient.

    A zero connected to the embeddings is added only when no entry already is: its backward
    pass would fill and add a whole ``(B, D)`` gradient for nothing.
    """
    if not parts:
        return zero_loss(embeddings)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    if total.dtype in (torch.float16, torch.bfloat16):
        total = total.float()
    if embeddings.requires_grad and not total.requires_grad:
        total = total + zero_loss(embeddings)
    return total


class BaseReducer(nn.Module):
    """Reduce every entry of a loss dict with :meth:`reduce` and sum the results."""

    def forward(self, loss_dict: LossDict, embeddings: Tensor, labels: Tensor | None = None) -> Any:
        parts = [self.reduce_info(info, embeddings) for info in loss_dict.values()]
        return sum_reduced(parts, embeddings)

    def reduce_info(self, info: LossInfo, embeddings: Tensor) -> Tensor:
        losses = info["losses"]
        if not isinstance(losses, Tensor):
            # a plain number: only 0 ("no loss") is meaningful here
            return zero_loss(embeddings) + float(losses)
        if info["reduction_type"] == "already_reduced":
            return losses.sum()
        if losses.numel() == 0:
            return zero_loss(embeddings)
        return self.reduce(losses, embeddings)

    def reduce(self, losses: Tensor, embeddings: Tensor) -> Tensor:
        """Reduce a non-empty 1-D tensor of losses to a scalar."""
        raise NotImplementedError


class SelectingReducer(BaseReducer):
    """A reducer of the form ``sum(losses[select(losses)]) / divisor(n_selected, n_total)``."""

    def select(self, losses: Tensor) -> Tensor:
        """Boolean mask of the losses that count (same shape as ``losses``)."""
        return torch.ones_like(losses, dtype=torch.bool)

    def divisor(self, n_selected: Tensor, n_total: Tensor) -> Tensor:
        """What the sum of the selected losses is divided by."""
        raise NotImplementedError

    def reduce(self, losses: Tensor, embeddings: Tensor) -> Tensor:
        n_total = torch.tensor(losses.numel(), device=losses.device)
        if type(self).select is SelectingReducer.select:  # every loss counts: no mask to build
            return losses.sum() / self.divisor(n_total, n_total).to(losses.dtype)
        keep = self.select(losses)
        n_selected = keep.sum()
        if int(n_selected) == 0:
            return zero_loss(embeddings) + (losses * 0).sum()
        # a masked sum rather than losses[keep]: no index list, and no scatter in the backward
        divisor = self.divisor(n_selected, n_total).to(losses.dtype)
        return torch.where(keep, losses, 0).sum() / divisor


def reduces_by_selection(reducer: BaseReducer) -> bool:
    """True for a :class:`SelectingReducer` that kept the select-then-divide rule (a subclass
    that overrides ``reduce`` gets the losses materialised instead)."""
    return isinstance(reducer, SelectingReducer) and type(reducer).reduce is SelectingReducer.reduce


def reduce_masked(reducer: SelectingReducer, losses: Tensor, mask: Tensor) -> Tensor:
    """Reduce the entries of a loss *matrix* where ``mask`` is True, without gathering them:
    the same value and gradient as ``reducer.reduce(losses[mask])``, but elementwise work only
    (no index lists, no scatter in the backward pass). Zero (with a zero gradient) when nothing
    is selected."""
    keep = mask & reducer.select(losses)
    n_selected = keep.sum()
    if int(n_selected) == 0:
        return (losses * 0).sum()
    divisor = reducer.divisor(n_selected, mask.sum()).to(losses.dtype)
    return torch.where(keep, losses, 0).sum() / divisor


class MeanReducer(SelectingReducer):
    """The mean of all losses (PML's default for most losses)."""

    def divisor(self, n_selected: Tensor, n_total: Tensor) -> Tensor:
        return n_total


class SumReducer(SelectingReducer):
    """The sum of all losses."""

    def divisor(self, n_selected: Tensor, n_total: Tensor) -> Tensor:
        return torch.ones_like(n_total)


class ThresholdReducer(SelectingReducer):
    """The mean of the losses strictly between ``low`` and ``high`` (either may be None)."""

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        super().__init__()
        if low is None and high is None:
            raise ValueError("ThresholdReducer needs at least one of low or high")
        self.low = low
        self.high = high

    def select(self, losses: Tensor) -> Tensor:
        keep = torch.ones_like(losses, dtype=torch.bool)
        if self.low is not None:
            keep &= losses > self.low
        if self.high is not None:
            keep &= losses < self.high
        return keep

    def divisor(self, n_selected: Tensor, n_total: Tensor) -> Tensor:
        return n_selected

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


def keeps_the_nonzero(reducer: BaseReducer) -> bool:
    """True for a reducer that keeps exactly the losses above zero (an
    :class:`AvgNonZeroReducer`, or a ``ThresholdReducer(low=0)``): for non-negative losses, its
    selection is the losses' non-zero entries and needs no mask of its own."""
    return (
        isinstance(reducer, ThresholdReducer)
        and type(reducer).select is ThresholdReducer.select
        and reduces_by_selection(reducer)
        and reducer.low == 0
        and reducer.high is None
    )


class AvgNonZeroReducer(ThresholdReducer):
    """The mean of the losses that are greater than zero (the 'active' pairs or triplets)."""

    def __init__(self) -> None:
        super().__init__(low=0)


class DivisorReducer(BaseReducer):
    """``sum(losses) / divisor``, with the divisor carried by each loss-dict entry (PML's
    ``DivisorReducer``: the default of MarginLoss and ProxyAnchorLoss). A divisor of 0 gives a
    zero loss, never NaN."""

    def reduce_info(self, info: LossInfo, embeddings: Tensor) -> Tensor:
        losses = info["losses"]
        if not isinstance(losses, Tensor) or info["reduction_type"] == "already_reduced":
            return super().reduce_info(info, embeddings)
        divisor = info.get("divisor")
        if divisor is None:
            raise ValueError(
                "DivisorReducer needs a 'divisor' in each loss entry; this "
                f"'{info['reduction_type']}' entry has none"
            )
        if float(divisor) == 0 or losses.numel() == 0:
            return zero_loss(embeddings) + (losses * 0).sum()
        return losses.sum() / torch.as_tensor(divisor).to(losses.dtype)


class DoNothingReducer(BaseReducer):
    """Return the loss dict itself, unreduced (for users who reduce on their own)."""

    def forward(self, loss_dict: LossDict, embeddings: Tensor, labels: Tensor | None = None) -> Any:
        return loss_dict


class MultipleReducers(BaseReducer):
    """A different reducer for each named sub-loss; ``default_reducer`` (mean) for the rest."""

    def __init__(
        self, reducers: dict[str, BaseReducer], default_reducer: BaseReducer | None = None
    ) -> None:
        super().__init__()
        self.reducers = nn.ModuleDict(reducers)
        self.default_reducer = MeanReducer() if default_reducer is None else default_reducer

    def forward(self, loss_dict: LossDict, embeddings: Tensor, labels: Tensor | None = None) -> Any:
        parts = []
        for name, info in loss_dict.items():
            reducer = self.reducers[name] if name in self.reducers else self.default_reducer
            parts.append(reducer({name: info}, embeddings, labels))
        return sum_reduced(parts, embeddings)
