"""Loss pairs (ours and PML's with the same weights), batches and references shared by the
classification and proxy loss tests."""

from __future__ import annotations

import math
from typing import Any

import torch
from pytorch_metric_learning import losses as pml_losses
from torch import Tensor

from deepmetric.losses import proxy, soft_triple, softmax_margin

MODULES = {
    "NormalizedSoftmaxLoss": softmax_margin,
    "LargeMarginSoftmaxLoss": softmax_margin,
    "SphereFaceLoss": softmax_margin,
    "CosFaceLoss": softmax_margin,
    "ArcFaceLoss": softmax_margin,
    "SubCenterArcFaceLoss": softmax_margin,
    "ProxyNCALoss": proxy,
    "ProxyAnchorLoss": proxy,
    "SoftTripleLoss": soft_triple,
}


N_CLASSES, DIM = 6, 8


def _make_pair(
    name: str, kwargs: dict[str, Any] | None = None, num_classes: int = N_CLASSES, dim: int = DIM
) -> tuple[Any, Any]:
    """(ours, PML's) with PML's state_dict loaded into ours with strict=True."""
    kwargs = dict(kwargs or {})
    ours_kwargs, pml_kwargs = dict(kwargs), dict(kwargs)
    if "_distance" in kwargs:
        ours_dist, pml_dist = kwargs["_distance"]
        ours_kwargs["distance"], pml_kwargs["distance"] = ours_dist(), pml_dist()
        del ours_kwargs["_distance"], pml_kwargs["_distance"]
    torch.manual_seed(0)
    theirs = getattr(pml_losses, name)(num_classes=num_classes, embedding_size=dim, **pml_kwargs)
    ours = getattr(MODULES[name], name)(num_classes=num_classes, embedding_size=dim, **ours_kwargs)
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, strict=True)
    return ours, theirs


def _batch(
    n: int = 16, num_classes: int = N_CLASSES, dim: int = DIM, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(n, dim, generator=gen, dtype=dtype) * 2
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return emb, labels


# -- loop and closed-form references --------------------------------------------------------------


def _cross_entropy(logits: list[float], target: int) -> float:
    top = max(logits)
    return -(logits[target] - top - math.log(sum(math.exp(v - top) for v in logits)))


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))
