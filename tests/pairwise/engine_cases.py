"""Distances the fast paths do not take (the same computation through the general path), batches,
and the losses compared on both paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deepmetric import distances, pairwise
from deepmetric.losses.circle import CircleLoss
from deepmetric.losses.contrastive import ContrastiveLoss
from deepmetric.losses.lifted import (
    GeneralizedLiftedStructureLoss,
)
from deepmetric.losses.multi_similarity import (
    MultiSimilarityLoss,
)
from deepmetric.losses.ranked_list import (
    RankedListLoss,
)
from tests.parity import pk_labels


# -- distances the fast path does not take: the same computation through the general path --------
class GeneralLp(distances.LpDistance):
    """:class:`LpDistance` under another name: losses and miners use their general path."""


class GeneralCosine(distances.CosineSimilarity):
    """:class:`CosineSimilarity` under another name (general path)."""


class GeneralDot(distances.DotProductSimilarity):
    """:class:`DotProductSimilarity` under another name (general path)."""


def general(distance: distances.BaseDistance) -> distances.BaseDistance:
    """The same distance, as a class the fast path does not take."""
    if isinstance(distance, distances.CosineSimilarity):
        return GeneralCosine(power=distance.power)
    if isinstance(distance, distances.DotProductSimilarity):
        return GeneralDot(normalize_embeddings=distance.normalize_embeddings, power=distance.power)
    assert isinstance(distance, distances.LpDistance)
    return GeneralLp(
        normalize_embeddings=distance.normalize_embeddings, p=distance.p, power=distance.power
    )


def _batch(n: int = 24, per_class: int = 3, dim: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = pk_labels(n // per_class, per_class)
    return emb, labels[torch.randperm(n, generator=g)]  # labels in no particular order


# -- 2. gradcheck of the custom Functions --------------------------------------------------------

KIND_DISTANCES = {
    "euclidean": lambda: distances.LpDistance(),
    "squared-euclidean": lambda: distances.LpDistance(power=2, normalize_embeddings=False),
    "inner-product": lambda: distances.DotProductSimilarity(normalize_embeddings=False),
}


# -- 3. the fast path against the general path ---------------------------------------------------

LOSSES: dict[str, Callable[..., Any]] = {
    "multi-similarity": lambda **o: MultiSimilarityLoss(alpha=2, beta=10, base=0.4, **o),
    "generalized-lifted": lambda **o: GeneralizedLiftedStructureLoss(neg_margin=0.9, **o),
    "circle": lambda **o: CircleLoss(m=0.3, gamma=32, **o),
    "ranked-list": lambda **o: RankedListLoss(margin=0.4, Tn=2.0, Tp=1.0, **o),
    "contrastive": lambda **o: ContrastiveLoss(**({"pos_margin": 0.3, "neg_margin": 1.1} | o)),
}


SIM_MARGINS = {"contrastive": {"pos_margin": 0.8, "neg_margin": 0.2}}


DISTANCES: dict[str, Callable[[], distances.BaseDistance]] = {
    "lp": lambda: distances.LpDistance(),
    "lp-squared": lambda: distances.LpDistance(power=2),
    "lp-raw": lambda: distances.LpDistance(normalize_embeddings=False),
    "cosine": lambda: distances.CosineSimilarity(),
    "dot-raw": lambda: distances.DotProductSimilarity(normalize_embeddings=False),
}


def _loss_pair(name: str, distance: str, **options: Any) -> tuple[Any, Any]:
    """The loss on the fast path, and the same loss on the general path."""
    if name == "circle" and distance.startswith("lp"):
        distance = "cosine"  # circle needs a similarity
    make_distance = DISTANCES[distance]
    margins = SIM_MARGINS.get(name, {}) if make_distance().is_inverted else {}
    fast = LOSSES[name](distance=make_distance(), **(margins | options))
    slow = LOSSES[name](distance=general(make_distance()), **(margins | options))
    assert pairwise.fused_matrix_kind(fast.distance) is not None
    assert pairwise.fused_matrix_kind(slow.distance) is None
    return fast, slow
