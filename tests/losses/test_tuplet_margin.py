"""TupletMarginLoss: a loop over Yu & Tao's formula, PML parity (margins and scales, float32,
miner tuples with repeated negatives, reference sets, reducers), identical embeddings, and bad
arguments."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from torch import Tensor

from deepmetric import distances, reducers
from deepmetric.losses import TupletMarginLoss
from tests.losses.ms_circle_margin_ranked_cases import _batch, _miner_tuples
from tests.parity import assert_same_loss, value_and_grad


def _loop_tuplet(emb: Tensor, labels: Tensor, margin_deg: float, scale: float) -> Tensor:
    """For each positive pair (i, j), i != j: log(1 + Σ_n exp(s (cos θ_in - cos(θ_ij - m)))),
    n over the other labels; the mean over the positive pairs."""
    unit = F.normalize(emb, dim=1)
    m = math.radians(margin_deg)
    losses = []
    for i in range(len(emb)):
        for j in range(len(emb)):
            if i == j or labels[i] != labels[j]:
                continue
            pos = torch.cos(torch.acos(unit[i] @ unit[j]) - m)
            terms = [
                scale * (unit[i] @ unit[n] - pos) for n in range(len(emb)) if labels[n] != labels[i]
            ]
            losses.append(torch.logsumexp(torch.stack([pos.new_zeros(()), *terms]), dim=0))
    return torch.stack(losses).mean()


@pytest.mark.parametrize(("margin", "scale"), [(5.73, 64.0), (10.0, 16.0), (0.0, 4.0)])
def test_matches_a_loop_over_the_formula(margin: float, scale: float) -> None:
    emb, labels = _batch(n_classes=4, per_class=3, dim=6, seed=4)
    loop = lambda e, y: _loop_tuplet(e, y, margin, scale)  # noqa: E731
    ours = TupletMarginLoss(margin=margin, scale=scale)
    assert_same_loss(ours, loop, emb, labels, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{}, {"margin": 12.0, "scale": 30.0}])
@pytest.mark.parametrize("per_class", [2, 4])
def test_parity_with_pml(kwargs: dict[str, float], per_class: int) -> None:
    emb, labels = _batch(per_class=per_class, seed=per_class)
    ours, theirs = TupletMarginLoss(**kwargs), pml_losses.TupletMarginLoss(**kwargs)
    assert_same_loss(ours, theirs, emb, labels)
    assert_same_loss(ours, theirs, emb.float(), labels, rtol=1e-5, atol=1e-6)


def test_parity_with_miner_tuples_and_a_reference_set() -> None:
    emb, labels = _batch(seed=5)
    for tup in _miner_tuples(labels, seed=5):  # triplets repeat their negative pairs
        for given in (labels, None):
            assert_same_loss(
                TupletMarginLoss(), pml_losses.TupletMarginLoss(), emb, given, indices_tuple=tup
            )
    ref, ref_labels = _batch(n_classes=8, per_class=3, seed=8)
    assert_same_loss(
        TupletMarginLoss(), pml_losses.TupletMarginLoss(), emb, labels, ref_emb=ref,
        ref_labels=ref_labels,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (reducers.SumReducer(), pml_reducers.SumReducer()),
        (reducers.AvgNonZeroReducer(), pml_reducers.AvgNonZeroReducer()),
    ],
    ids=["sum", "avg-non-zero"],
)
def test_parity_with_other_reducers(ours: Any, theirs: Any) -> None:
    emb, labels = _batch(seed=9)
    assert_same_loss(
        TupletMarginLoss(reducer=ours), pml_losses.TupletMarginLoss(reducer=theirs), emb, labels
    )


def test_identical_positives_give_a_finite_gradient() -> None:
    """Two equal embeddings whose cosine rounds above 1 in float32: PML's acos gives NaN, the
    clamped cosine a finite loss and gradient."""
    emb = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    emb[1] = emb[0]
    labels = torch.arange(8).repeat_interleave(4)
    assert float(distances.CosineSimilarity()(emb)[0, 1]) > 1  # the case is hit
    _, theirs = value_and_grad(pml_losses.TupletMarginLoss(), emb, labels)
    assert bool(theirs.isnan().any())
    value, grad = value_and_grad(TupletMarginLoss(), emb, labels)
    assert math.isfinite(value) and bool(torch.isfinite(grad).all())


def test_takes_only_the_cosine_similarity() -> None:
    with pytest.raises(ValueError, match="needs a CosineSimilarity, got LpDistance"):
        TupletMarginLoss(distance=distances.LpDistance())
