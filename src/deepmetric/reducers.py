"""Reducers turn a loss's per-element (per pair, per triplet, per sample) losses into a scalar.

A loss returns a *loss dict*, as in pytorch-metric-learning::

    {"pos_loss": {"losses": Tensor, "indices": ..., "reduction_type": "pos_pair"}, ...}

and the reducer reduces every entry and sums them. ``reduction_type`` is ``"element"``,
``"pos_pair"``, ``"neg_pair"``, ``"triplet"`` or ``"already_reduced"`` (PML's type for a value
that is already a scalar: an embedding regularizer's penalty, or a zero when there is nothing to
learn from).

A loss that never holds all its losses at once (billions of triplets, a matrix read one block of
rows at a time) asks the reducer for a :class:`ReductionStream` (:meth:`BaseReducer.stream`),
adds each block to it and puts the stream in its loss dict; the reducer finishes it. Every
reducer written as *select, then divide* (:class:`SelectingReducer`: mean, sum, threshold,
average-non-zero, and any subclass that changes only ``select`` and ``divisor``) and
:class:`DivisorReducer` stream; any other reducer is given the losses whole.

Unlike PML, a reducer never returns NaN: an empty set of losses reduces to a zero that keeps the
graph connected (zero gradient).
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


def row_entry(losses: Tensor) -> LossInfo:
    """The loss-dict entry of ``(B,)`` per-row losses, row ``i`` indexed ``i`` (PML's
    ``"element"`` reduction)."""
    rows = torch.arange(len(losses), device=losses.device)
    return {"losses": losses, "indices": rows, "reduction_type": "element"}


def scalar_entry(value: Tensor | float) -> LossInfo:
    """A loss-dict entry for a value that is a scalar already (PML's ``"already_reduced"``): an
    embedding or weight regularizer's penalty, a single learnt parameter's penalty, or 0 when
    there is nothing to learn from. The reducer passes it through (summed)."""
    return {"losses": value, "indices": None, "reduction_type": "already_reduced"}


def zero_loss(embeddings: Tensor) -> Tensor:
    """A float32 scalar 0 connected to ``embeddings`` (its gradient is zero, never NaN)."""
    # one element is enough to connect the graph: no (B, D) product (nor copy) on every call;
    # multiplied by 0 before the cast, as a float64 beyond float32's range would become inf
    # (and inf * 0 NaN)
    return (embeddings.reshape(-1)[:1].sum() * 0).float()


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


class ReductionStream:
    """A loss reduced while it arrives in blocks: :meth:`add_losses` (or :meth:`add`) for each
    block, then :meth:`finish` for the scalar.

    The reductions that stream are the *linear* ones: ``Σ kept losses / divisor``, where each
    loss is kept or dropped on its own value (:meth:`keep`) and the divisor depends only on the
    counts (:meth:`divisor`). A loss whose blocks are computed without autograd (a closed-form
    gradient, for memory) builds its gradient from the ``keep`` masks that :meth:`add_losses`
    returns, and hands :meth:`carry` a scalar whose gradient is that of the kept sum; a block
    passed with its graph needs nothing of the kind.

    Shapes: a block of losses is any tensor, with an optional boolean mask of the same shape
    saying which entries are losses at all.
    """

    def __init__(self, like: Tensor) -> None:
        self.like = like  # (the embeddings: what a zero result stays connected to)
        self.total: Tensor | None = None
        self.n_kept: Tensor | int = 0
        self.n_losses: Tensor | int = 0
        self.gradient: Tensor | None = None

    def keep(self, losses: Tensor) -> Tensor | None:
        """Boolean mask of the losses of a block that count (same shape), or ``None`` when every
        loss counts. Must decide each loss on its own value (a block at a time)."""
        return None

    def divisor(self, n_kept: Tensor, n_losses: Tensor) -> Tensor:
        """What the sum of the kept losses is divided by, from how many were kept of how many."""
        raise NotImplementedError

    def add(self, kept_sum: Tensor, n_kept: Tensor | int, n_losses: Tensor | int) -> None:
        """Add what a block contributes: the sum of its kept losses, how many it kept, and how
        many losses it had."""
        self.total = kept_sum if self.total is None else self.total + kept_sum
        self.n_kept = self.n_kept + n_kept
        self.n_losses = self.n_losses + n_losses

    def add_losses(
        self, losses: Tensor, mask: Tensor | None = None, counts: Tensor | int = 1
    ) -> Tensor | None:
        """Add a block of losses (those where ``mask`` is True, all if ``None``), each counted
        ``counts`` times (a number, or a tensor of integers shaped like ``losses``); return the
        mask of the kept ones (``None``: all of them), with which a closed-form gradient is
        built."""
        keep = self.keep(losses)
        if mask is not None:
            keep = mask if keep is None else keep & mask
        # a masked sum rather than losses[keep]: no index list, and no scatter in a backward
        kept = losses if keep is None else torch.where(keep, losses, 0)
        if isinstance(counts, Tensor):
            kept_sum = (counts.to(losses.dtype) * kept).sum()
            n_kept: Tensor | int = counts.sum() if keep is None else (counts * keep).sum()
            n_losses: Tensor | int = counts.sum() if mask is None else (counts * mask).sum()
        else:
            kept_sum = kept.sum()
            n_kept = losses.numel() if keep is None else keep.sum()
            n_losses = losses.numel() if mask is None else mask.sum()
            if counts != 1:
                kept_sum, n_kept, n_losses = counts * kept_sum, counts * n_kept, counts * n_losses
        self.add(kept_sum, n_kept, n_losses)
        return keep

    def divide_by(self, divisor: Tensor) -> None:
        """The divisor the loss states for this sub-loss (PML's ``"divisor"`` entry): used by
        :class:`DivisorReducer`'s stream, ignored by the others (as their ``reduce`` ignores
        it)."""

    def carry(self, gradient: Tensor) -> None:
        """Give the result the gradient of ``gradient``, a scalar whose gradient is that of the
        sum of the kept losses (its value is not used): for blocks added without autograd."""
        self.gradient = gradient if self.gradient is None else self.gradient + gradient

    def finish(self) -> Tensor:
        """The reduced scalar: the kept sum over the divisor, with the gradient of the blocks'
        graphs and of :meth:`carry`. Zero, with a zero gradient, when nothing was kept."""
        device = self.like.device
        n_kept = torch.as_tensor(self.n_kept, device=device)
        if self.total is None or int(n_kept) == 0:
            return zero_loss(self.like) if self.gradient is None else self.gradient * 0
        divisor = self.divisor(n_kept, torch.as_tensor(self.n_losses, device=device))
        if float(divisor) == 0:
            return zero_loss(self.like) if self.gradient is None else self.gradient * 0
        divisor = divisor.to(self.total.dtype)
        value = self.total / divisor
        if self.gradient is not None:
            value = value + (self.gradient - self.gradient.detach()) / divisor
        return value


LossDict = dict[str, "LossInfo | ReductionStream"]
"""A loss's sub-losses by name: each a whole tensor of losses or a stream of blocks."""


class BaseReducer(nn.Module):
    """Reduce every entry of a loss dict and sum the results.

    An entry is a whole tensor of losses (a :class:`LossInfo`, reduced by :meth:`reduce`) or a
    :class:`ReductionStream` this reducer handed out (:meth:`stream`) and the loss fed block by
    block (reduced by its :meth:`~ReductionStream.finish`). A reducer that cannot reduce a
    stream of blocks returns ``None`` from :meth:`stream` (the default), and losses then give it
    their losses whole. So does a subclass that overrides ``forward``, ``reduce_info`` or
    ``reduce`` without defining ``stream``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that changes how whole tensors are reduced, and not how streams are, is
        # given whole tensors: a stream inherited from its parent would reduce by the parent's
        # rule, not by its own.
        reduces_its_own_way = any(
            name in cls.__dict__ for name in ("forward", "reduce_info", "reduce")
        )
        if reduces_its_own_way and "stream" not in cls.__dict__:
            cls.stream = BaseReducer.stream  # type: ignore[method-assign]

    def forward(self, loss_dict: LossDict, embeddings: Tensor, labels: Tensor | None = None) -> Any:
        parts = [self.reduce_entry(entry, embeddings) for entry in loss_dict.values()]
        return sum_reduced(parts, embeddings)

    def stream(self, name: str, like: Tensor) -> ReductionStream | None:
        """A :class:`ReductionStream` for the sub-loss ``name`` (``like``: the embeddings), or
        ``None`` when this reducer needs all the losses at once."""
        return None

    def reduce_entry(self, entry: LossInfo | ReductionStream, embeddings: Tensor) -> Tensor:
        if isinstance(entry, ReductionStream):
            return entry.finish()
        return self.reduce_info(entry, embeddings)

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


class SelectionStream(ReductionStream):
    """The :class:`ReductionStream` of a :class:`SelectingReducer`: its ``select`` and
    ``divisor``."""

    def __init__(self, reducer: SelectingReducer, like: Tensor) -> None:
        super().__init__(like)
        self.reducer = reducer

    def keep(self, losses: Tensor) -> Tensor | None:
        return self.reducer.select(losses)

    def divisor(self, n_kept: Tensor, n_losses: Tensor) -> Tensor:
        return self.reducer.divisor(n_kept, n_losses)


class SelectingReducer(BaseReducer):
    """A reducer of the form ``sum(losses[select(losses)]) / divisor(n_selected, n_total)``.

    ``select`` decides each loss on its own value, so the losses can be reduced a block at a
    time (:meth:`stream`): a subclass that only changes ``select`` and ``divisor`` reduces every
    loss's fast paths too. (A subclass that overrides ``reduce`` is given whole tensors, unless
    it also defines ``stream``.)
    """

    def select(self, losses: Tensor) -> Tensor | None:
        """Boolean mask of the losses that count (same shape as ``losses``); ``None``: all."""
        return None

    def divisor(self, n_selected: Tensor, n_total: Tensor) -> Tensor:
        """What the sum of the selected losses is divided by."""
        raise NotImplementedError

    def stream(self, name: str, like: Tensor) -> ReductionStream | None:
        return SelectionStream(self, like)

    def reduce(self, losses: Tensor, embeddings: Tensor) -> Tensor:
        stream = SelectionStream(self, embeddings)
        stream.add_losses(losses)
        return stream.finish()


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
        if self.low is None:
            assert self.high is not None  # (at least one bound, see __init__)
            return losses < self.high
        keep = losses > self.low
        return keep if self.high is None else keep.logical_and_(losses < self.high)

    def divisor(self, n_selected: Tensor, n_total: Tensor) -> Tensor:
        return n_selected

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


class AvgNonZeroReducer(ThresholdReducer):
    """The mean of the losses that are greater than zero (the 'active' pairs or triplets)."""

    def __init__(self) -> None:
        super().__init__(low=0)


class DivisorStream(ReductionStream):
    """The :class:`ReductionStream` of :class:`DivisorReducer`: every loss counts, and the sum
    is divided by the divisor the loss states (:meth:`divide_by`)."""

    def __init__(self, like: Tensor) -> None:
        super().__init__(like)
        self.stated: Tensor | None = None

    def divide_by(self, divisor: Tensor) -> None:
        self.stated = divisor

    def divisor(self, n_kept: Tensor, n_losses: Tensor) -> Tensor:
        if self.stated is None:
            raise ValueError("DivisorReducer needs the loss to state a divisor (divide_by)")
        return torch.as_tensor(self.stated, device=n_kept.device)


class DivisorReducer(BaseReducer):
    """``sum(losses) / divisor``, with the divisor carried by each loss-dict entry (PML's
    ``DivisorReducer``: the default of MarginLoss and ProxyAnchorLoss). A divisor of 0 gives a
    zero loss, never NaN."""

    def stream(self, name: str, like: Tensor) -> ReductionStream | None:
        return DivisorStream(like)

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

    def reducer_of(self, name: str) -> BaseReducer:
        """The reducer of the sub-loss ``name``."""
        reducer = self.reducers[name] if name in self.reducers else self.default_reducer
        assert isinstance(reducer, BaseReducer)
        return reducer

    def stream(self, name: str, like: Tensor) -> ReductionStream | None:
        return self.reducer_of(name).stream(name, like)

    def forward(self, loss_dict: LossDict, embeddings: Tensor, labels: Tensor | None = None) -> Any:
        parts = []
        for name, info in loss_dict.items():
            parts.append(self.reducer_of(name)({name: info}, embeddings, labels))
        return sum_reduced(parts, embeddings)
