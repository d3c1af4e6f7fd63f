"""Regularizers: each against a loop over its formula and against PML (values and gradients),
inside a loss, and bad arguments."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import regularizers as pml_regularizers
from torch import Tensor

from deepmetric import distances, losses, regularizers
from tests.parity import assert_same_loss


def _vectors(n: int = 12, dim: int = 5, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * 1.5


def _loop_regular_face(w: Tensor) -> Tensor:
    unit = F.normalize(w, dim=1)
    per_class = []
    for i in range(len(w)):
        sims = [unit[i] @ unit[j] for j in range(len(w)) if j != i]
        per_class.append(max(sims, key=float))
    return torch.stack(per_class).mean()


def _loop_sparse_centers(w: Tensor, num_classes: int, k: int) -> Tensor:
    unit = F.normalize(w, dim=1)
    terms = [
        torch.sqrt(2 - 2 * (unit[c * k + a] @ unit[c * k + b]))
        for c in range(num_classes)
        for a in range(k)
        for b in range(a + 1, k)
    ]
    return torch.stack(terms).sum() / (2 * len(terms))


LOOPS: dict[str, tuple[Any, Any]] = {
    "zero-mean": (regularizers.ZeroMeanRegularizer(), lambda w: w.sum(dim=1).abs().mean()),
    "lp": (regularizers.LpRegularizer(p=1, power=2), lambda w: (w.abs().sum(dim=1) ** 2).mean()),
    "center-invariant": (
        regularizers.CenterInvariantRegularizer(),
        lambda w: (((w**2).sum(1) - (w**2).sum(1).mean()) ** 2 / 4).mean(),
    ),
    "regular-face": (regularizers.RegularFaceRegularizer(), _loop_regular_face),
    "sparse-centers": (
        regularizers.SparseCentersRegularizer(num_classes=4, centers_per_class=3),
        lambda w: _loop_sparse_centers(w, 4, 3),
    ),
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_matches_a_loop_over_its_formula(name: str) -> None:
    ours, loop = LOOPS[name]
    assert_same_loss(ours, loop, _vectors(), rtol=1e-10, atol=1e-12)


PML: dict[str, tuple[Any, Any]] = {
    "zero-mean": (regularizers.ZeroMeanRegularizer(), pml_regularizers.ZeroMeanRegularizer()),
    "lp": (regularizers.LpRegularizer(power=3), pml_regularizers.LpRegularizer(power=3)),
    "center-invariant": (
        regularizers.CenterInvariantRegularizer(),
        pml_regularizers.CenterInvariantRegularizer(),
    ),
    "center-invariant-l1": (
        regularizers.CenterInvariantRegularizer(
            distance=distances.LpDistance(p=1, normalize_embeddings=False)
        ),
        pml_regularizers.CenterInvariantRegularizer(
            distance=__import__("pytorch_metric_learning.distances").distances.LpDistance(
                p=1, normalize_embeddings=False
            )
        ),
    ),
    "regular-face": (
        regularizers.RegularFaceRegularizer(),
        pml_regularizers.RegularFaceRegularizer(),
    ),
    "sparse-centers": (
        regularizers.SparseCentersRegularizer(num_classes=4, centers_per_class=3),
        pml_regularizers.SparseCentersRegularizer(num_classes=4, centers_per_class=3),
    ),
}


@pytest.mark.parametrize("name", list(PML))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_pml(name: str, dtype: torch.dtype) -> None:
    ours, theirs = PML[name]
    tolerances = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    assert_same_loss(ours, theirs, _vectors(seed=3).to(dtype), **tolerances)


def test_sparse_centers_as_a_weight_regularizer() -> None:
    """On a classification loss's weights: the loss plus the weighted penalty of its weights."""
    loss = losses.NormalizedSoftmaxLoss(
        num_classes=12,
        embedding_size=5,
        weight_regularizer=regularizers.SparseCentersRegularizer(4, 3),
        weight_reg_weight=0.5,
    ).double()
    plain = losses.NormalizedSoftmaxLoss(num_classes=12, embedding_size=5).double()
    plain.load_state_dict(loss.state_dict())
    emb, labels = _vectors(8, seed=4), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    expected = plain(emb, labels) + 0.5 * _loop_sparse_centers(loss.W.t(), 4, 3)
    torch.testing.assert_close(loss(emb, labels), expected)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="needs a similarity"):
        regularizers.RegularFaceRegularizer(distance=distances.LpDistance())
    with pytest.raises(ValueError, match=r"needs LpDistance\(power=1, normalize_embeddings=False"):
        regularizers.CenterInvariantRegularizer(distance=distances.LpDistance())
    with pytest.raises(ValueError, match="centers_per_class must be an int above 1, got 1"):
        regularizers.SparseCentersRegularizer(num_classes=3, centers_per_class=1)
    with pytest.raises(ValueError, match="needs a CosineSimilarity"):
        regularizers.SparseCentersRegularizer(3, 2, distance=distances.LpDistance())
    with pytest.raises(ValueError, match=r"expects 3 x 2 = 6 centres, got 5"):
        regularizers.SparseCentersRegularizer(3, 2)(_vectors(5))
    with pytest.raises(ValueError, match="NaN"):
        regularizers.ZeroMeanRegularizer()(torch.full((2, 3), math.nan))
