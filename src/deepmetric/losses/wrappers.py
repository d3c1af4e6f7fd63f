"""Losses made of other losses: a self-supervised pairing of two views, and a weighted sum of
several losses, each with its own miner (PML's ``SelfSupervisedLoss`` and ``MultipleLosses``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_embeddings
from ..interfaces import IndicesTuple, Miner

# PML's list, less the losses deepmetric does not have yet (AngularLoss, IntraPairVarianceLoss).
_SELF_SUPERVISED_LOSSES = (
    "CircleLoss",
    "ContrastiveLoss",
    "GeneralizedLiftedStructureLoss",
    "LiftedStructureLoss",
    "MultiSimilarityLoss",
    "NCALoss",
    "NTXentLoss",
    "SignalToNoiseRatioContrastiveLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "TupletMarginLoss",
)


class SelfSupervisedLoss(nn.Module):
    """A pair-based loss over two views of the same inputs, without labels: row ``i`` of
    ``embeddings`` and row ``i`` of ``ref_emb`` are a positive pair, every other row a negative.

    The set-up of SimCLR (Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive
    Learning of Visual Representations", 2020) for any loss of
    :data:`supported_losses`, as PML's ``SelfSupervisedLoss``: with ``symmetric=True`` (the
    default) both views are stacked into one batch of ``2N`` with labels ``0..N-1`` twice, so
    each view is an anchor; with ``symmetric=False`` the first view is the queries and the
    second the reference set.

    Shapes: ``embeddings`` ``(N, D)`` and ``ref_emb`` ``(N, D)`` -> scalar.
    """

    supported_losses = _SELF_SUPERVISED_LOSSES

    def __init__(self, loss: nn.Module, symmetric: bool = True) -> None:
        super().__init__()
        if type(loss).__name__ not in self.supported_losses:
            raise ValueError(
                f"SelfSupervisedLoss does not support {type(loss).__name__}; it supports "
                f"{', '.join(self.supported_losses)}"
            )
        self.loss = loss
        self.symmetric = symmetric

    def forward(self, embeddings: Tensor, ref_emb: Tensor) -> Tensor:
        """Two ``(N, D)`` views, row for row -> the wrapped loss."""
        check_embeddings(embeddings, "embeddings")
        check_embeddings(ref_emb, "ref_emb")
        if ref_emb.shape != embeddings.shape:
            raise ValueError(
                f"ref_emb must be a second view of embeddings, row for row: got shapes "
                f"{tuple(ref_emb.shape)} and {tuple(embeddings.shape)}"
            )
        labels = torch.arange(len(embeddings), device=embeddings.device)
        if self.symmetric:
            both = torch.cat([embeddings, ref_emb])
            result: Tensor = self.loss(both, torch.cat([labels, labels]))
            return result
        result = self.loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels.clone())
        return result


class MultipleLosses(nn.Module):
    """A weighted sum of losses, each optionally with its own miner, as PML's ``MultipleLosses``.

    ``losses`` is a list (or tuple) or a dict of losses. ``miners``, if given, has the same
    structure: a list of the same length (``None`` where a loss takes no miner) or a dict whose
    keys are some of the losses' keys. ``weights``, if given: a list of the same length or a
    dict with every key of the losses (default: 1 each). A loss with a miner gets that miner's
    tuple; the others get the ``indices_tuple`` passed in (which cannot be combined with
    miners).

    Shapes: embeddings ``(B, D)``, labels ``(B,)`` [, ``ref_emb`` ``(R, D)``, ``ref_labels``
    ``(R,)``] -> scalar.
    """

    def __init__(
        self,
        losses: Sequence[nn.Module] | Mapping[str, nn.Module],
        miners: Sequence[Miner | None] | Mapping[str, Miner] | None = None,
        weights: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if len(losses) == 0:
            raise ValueError("MultipleLosses needs at least one loss")
        is_dict = isinstance(losses, Mapping)
        keys: list[Any] = list(losses) if is_dict else list(range(len(losses)))
        self.losses: nn.ModuleDict | nn.ModuleList = (
            nn.ModuleDict(losses) if isinstance(losses, Mapping) else nn.ModuleList(losses)
        )
        self.miners: nn.ModuleDict | nn.ModuleList | None = None
        if miners is not None:
            _check_like_losses("miners", miners, keys, is_dict, every_key=False)
            given = miners.values() if isinstance(miners, Mapping) else miners
            for miner in given:
                if miner is not None and not isinstance(miner, nn.Module):
                    raise ValueError(f"a miner must be a module, got {type(miner).__name__}")
            self.miners = (
                nn.ModuleDict(dict(miners))  # type: ignore[arg-type]
                if isinstance(miners, Mapping)
                else nn.ModuleList(list(miners))  # type: ignore[arg-type]
            )
        if weights is None:
            weights = {key: 1.0 for key in keys} if is_dict else [1.0] * len(keys)
        _check_like_losses("weights", weights, keys, is_dict, every_key=True)
        self.weights = weights

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """The weighted sum of the losses on the same batch (see the class docstring)."""
        if self.miners is not None and indices_tuple is not None:
            raise ValueError("indices_tuple cannot be given to MultipleLosses built with miners")
        total = embeddings.new_zeros(())
        items = (
            self.losses.items()
            if isinstance(self.losses, nn.ModuleDict)
            else enumerate(self.losses)
        )
        for key, loss in items:
            miner = self._miner(key)
            tuple_ = (
                indices_tuple if miner is None else miner(embeddings, labels, ref_emb, ref_labels)
            )
            value = loss(embeddings, labels, tuple_, ref_emb, ref_labels)
            total = total + value * self.weights[key]  # type: ignore[index]
        return total

    def _miner(self, key: Any) -> Miner | None:
        if self.miners is None:
            return None
        if isinstance(self.miners, nn.ModuleDict):
            return self.miners[key] if key in self.miners else None  # type: ignore[return-value]
        return self.miners[key]


def _check_like_losses(
    name: str, value: Any, keys: list[Any], is_dict: bool, every_key: bool
) -> None:
    """``value`` (miners or weights) has the structure of the losses: a dict with their keys
    (all of them, or some), or a list or tuple of their length."""
    if is_dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a dict like the losses, got {type(value).__name__}")
        unknown = sorted(set(value) - set(keys))
        missing = sorted(set(keys) - set(value)) if every_key else []
        if unknown or missing:
            raise ValueError(
                f"{name} keys must match the losses' keys {sorted(keys)}: unknown {unknown}, "
                f"missing {missing}"
            )
        return
    if not isinstance(value, list | tuple):
        raise ValueError(
            f"{name} must be a list or tuple like the losses, got {type(value).__name__}"
        )
    if len(value) != len(keys):
        raise ValueError(f"{name} has {len(value)} entries but there are {len(keys)} losses")
