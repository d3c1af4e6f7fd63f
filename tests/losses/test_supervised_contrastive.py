"""SupConLoss: a loop over the paper's formula, PML parity (distances, miner tuples, reference
sets, reducers, a batch of several row blocks), edge cases and bad arguments."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from torch import Tensor

from deepmetric import distances, reducers
from deepmetric.losses import SupConLoss
from tests.losses.ms_circle_margin_ranked_cases import _batch, _miner_tuples
from tests.parity import assert_same_loss, pk_labels, value_and_grad


def _loop_supcon(emb: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Khosla et al.'s L_out, sample by sample: for each anchor with positives, the mean over its
    positives of -log(exp(z_ap) / Σ_{j ≠ a} exp(z_aj)); averaged over the anchors whose loss is
    not zero (PML's default reducer)."""
    unit = F.normalize(emb, dim=1)
    losses = []
    for a in range(len(emb)):
        others = [j for j in range(len(emb)) if j != a]
        positives = [j for j in others if labels[j] == labels[a]]
        if not positives:
            continue
        logits = torch.stack([unit[a] @ unit[j] for j in others]) / temperature
        log_denominator = torch.logsumexp(logits, dim=0)
        terms = [unit[a] @ unit[p] / temperature - log_denominator for p in positives]
        losses.append(-torch.stack(terms).mean())
    nonzero = [loss for loss in losses if loss > 0]
    return torch.stack(nonzero).mean()


@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5, 1.0])
def test_matches_a_loop_over_the_papers_formula(temperature: float) -> None:
    emb, _ = _batch(n_classes=5, per_class=3, dim=6, seed=11)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4])
    labels[-1] = 9  # a sample with no positive: no loss of its own, a negative for the others
    loop = lambda e, y: _loop_supcon(e, y, temperature)  # noqa: E731
    assert_same_loss(SupConLoss(temperature=temperature), loop, emb, labels, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("per_class", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_with_pml(temperature: float, per_class: int, dtype: torch.dtype) -> None:
    emb, labels = _batch(per_class=per_class, seed=per_class)
    tolerances = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    assert_same_loss(
        SupConLoss(temperature=temperature),
        pml_losses.SupConLoss(temperature=temperature),
        emb.to(dtype),
        labels,
        **tolerances,
    )


DISTANCES: list[tuple[Any, Any, float]] = [
    (distances.LpDistance(), pml_distances.LpDistance(), 1.0),
    (distances.LpDistance(power=2), pml_distances.LpDistance(power=2), 1.0),
    (distances.LpDistance(p=1), pml_distances.LpDistance(p=1), 1.0),  # not fused: whole matrix
    (
        distances.DotProductSimilarity(normalize_embeddings=False),
        pml_distances.DotProductSimilarity(normalize_embeddings=False),
        0.3,
    ),
]


@pytest.mark.parametrize(("ours", "theirs", "scale"), DISTANCES, ids=lambda x: repr(x)[:40])
def test_parity_with_other_distances(ours: Any, theirs: Any, scale: float) -> None:
    emb, labels = _batch(seed=3)
    assert_same_loss(
        SupConLoss(temperature=0.5, distance=ours),
        pml_losses.SupConLoss(temperature=0.5, distance=theirs),
        emb * scale,
        labels,
    )


def test_parity_with_miner_tuples_with_and_without_labels() -> None:
    emb, labels = _batch(seed=5)
    for tup in _miner_tuples(labels, seed=5):
        for given_labels in (labels, None):
            assert_same_loss(
                SupConLoss(), pml_losses.SupConLoss(), emb, given_labels, indices_tuple=tup
            )


def test_parity_with_a_reference_set() -> None:
    emb, labels = _batch(n_classes=8, per_class=3, seed=7)
    ref, ref_labels = _batch(n_classes=8, per_class=4, seed=8)
    assert_same_loss(
        SupConLoss(), pml_losses.SupConLoss(), emb, labels, ref_emb=ref, ref_labels=ref_labels
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (reducers.MeanReducer(), pml_reducers.MeanReducer()),
        (reducers.SumReducer(), pml_reducers.SumReducer()),
        (reducers.ThresholdReducer(low=1.0), pml_reducers.ThresholdReducer(low=1.0)),
    ],
    ids=["mean", "sum", "threshold"],
)
def test_parity_with_other_reducers(ours: Any, theirs: Any) -> None:
    emb, labels = _batch(seed=9)
    labels[0] = 99  # a zero loss, which the mean counts and AvgNonZero would not
    assert_same_loss(SupConLoss(reducer=ours), pml_losses.SupConLoss(reducer=theirs), emb, labels)


def test_parity_over_several_row_blocks() -> None:
    """B = 768 in float32 fills several of the engine's row blocks."""
    g = torch.Generator().manual_seed(13)
    emb = torch.randn(768, 32, generator=g)
    labels = pk_labels(192, 4)[torch.randperm(768, generator=g)]
    assert_same_loss(SupConLoss(), pml_losses.SupConLoss(), emb, labels, rtol=1e-5, atol=1e-6)


def test_no_pair_to_learn_from_gives_zero_and_zero_gradient() -> None:
    emb, _ = _batch(n_classes=4, per_class=3, seed=2)
    for labels in (torch.zeros(12, dtype=torch.long), torch.arange(12)):  # no negative / positive
        value, grad = value_and_grad(SupConLoss(), emb, labels)
        expected, _ = value_and_grad(pml_losses.SupConLoss(), emb, labels)
        assert value == expected == 0.0
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan")])
def test_refuses_a_temperature_that_is_not_positive(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be positive"):
        SupConLoss(temperature=temperature)
