"""DistanceWeightedMiner (:mod:`deepmetric.miners.distance_weighted`): the sampling distribution,
PML's structure, anchors PML underflows, and the distance it requires."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import miners as pml_miners
from torch import Tensor

from deepmetric import distances
from deepmetric.miners import (
    DistanceWeightedMiner,
    distance_weighted_negative_weights,
)
from tests.miners.miner_cases import _clustered, _reference_set
from tests.parity import pk_labels

# -- DistanceWeightedMiner ------------------------------------------------------------------------


def _expected_dwm_probs(
    emb: Tensor, labels: Tensor, cutoff: float, nonzero_loss_cutoff: float
) -> Tensor:
    """Loop: P(negative j | anchor i) ∝ 1/q(max(d, cutoff)) for negatives with d < nzc, where
    q(d) = d^(n-2) (1 - d²/4)^((n-3)/2)."""
    n_dim = emb.shape[1]
    unit = emb / emb.norm(dim=1, keepdim=True)
    probs = torch.zeros(len(emb), len(emb), dtype=torch.float64)
    for i in range(len(emb)):
        for j in range(len(emb)):
            d = max(float((unit[i] - unit[j]).norm()), cutoff)
            if labels[i] != labels[j] and d < nonzero_loss_cutoff:
                q = d ** (n_dim - 2) * (1 - d * d / 4) ** ((n_dim - 3) / 2)
                probs[i, j] = 1 / q
        if probs[i].sum() > 0:
            probs[i] /= probs[i].sum()
    return probs


def test_distance_weighted_miner_respects_the_weights() -> None:
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(16, 5, generator=g, dtype=torch.float64), pk_labels(4, 4)
    emb[4:6] = emb[0:2] + 0.1 * torch.randn(2, 5, generator=g, dtype=torch.float64)
    expected = _expected_dwm_probs(emb, labels, 0.5, 1.4)
    unit = F.normalize(emb, dim=1)
    dists = torch.cdist(unit, unit)
    assert bool(((dists >= 1.4) & (labels[:, None] != labels[None, :])).any())  # some excluded
    assert bool(((dists < 0.5) & (labels[:, None] != labels[None, :])).any())  # some clamped

    miner = DistanceWeightedMiner()
    torch.manual_seed(1234)
    neg_counts = torch.zeros(16, 16, dtype=torch.float64)
    pos_counts = torch.zeros(16, 16, dtype=torch.float64)
    calls = 600
    for _ in range(calls):
        a, p, n = miner(emb, labels)
        # as PML: each anchor gets as many triplets as its class has samples (4)
        assert torch.equal(torch.bincount(a, minlength=16), torch.full((16,), 4))
        neg_counts.index_put_((a, n), torch.ones(len(a), dtype=torch.float64), accumulate=True)
        pos_counts.index_put_((a, p), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    draws = calls * 4
    # never a negative at or beyond nonzero_loss_cutoff, never a zero-probability negative
    assert float(neg_counts[expected == 0].sum()) == 0
    assert float(neg_counts[dists >= 1.4].sum()) == 0
    # empirical frequencies within ~6 standard errors of the weights
    torch.testing.assert_close(neg_counts / draws, expected, rtol=0, atol=0.03)
    # positives uniform over the other three samples of the class
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(16, dtype=torch.bool)
    torch.testing.assert_close(pos_counts / draws, same.double() / 3, rtol=0, atol=0.04)


def test_distance_weighted_miner_matches_pml_structure() -> None:
    """Random, so not the same triplets; but the same anchors, each as many times, as PML."""
    emb, labels = _clustered(dim=6, seed=2)
    ref, ref_labels = _reference_set(2, dim=6)
    for args in ((emb, labels), (emb, labels, ref, ref_labels)):
        ours, theirs = DistanceWeightedMiner()(*args), pml_miners.DistanceWeightedMiner()(*args)
        assert Counter(ours[0].tolist()) == Counter(theirs[0].tolist())
        assert all(t.dtype == torch.int64 for t in ours)


def test_distance_weighted_miner_keeps_anchors_that_pml_underflows() -> None:
    """Deliberate deviation: weights are scaled per row, not by one batch-wide maximum, so in high
    dimension an anchor whose negatives are all far is not dropped by float32 underflow."""
    dim = 512
    basis = torch.eye(dim)

    def at(d: float, base: Tensor, other: Tensor) -> Tensor:  # unit vector at distance d
        c = 1 - d * d / 2
        return c * base + math.sqrt(1 - c * c) * other

    emb = torch.zeros(6, dim)
    emb[0], emb[1] = basis[0], at(0.1, basis[0], basis[1])
    emb[2] = at(0.5, basis[0], basis[2])
    emb[3] = at(0.05, emb[2], basis[3])
    emb[4] = at(1.35, basis[0], basis[4])  # class 2: every negative at ~1.35
    emb[5] = at(0.05, emb[4], basis[5])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    ours = DistanceWeightedMiner()(emb, labels)
    theirs = pml_miners.DistanceWeightedMiner()(emb, labels)
    assert set(ours[0].tolist()) == set(range(6))
    assert set(theirs[0].tolist()) == {0, 1, 2, 3}
    weights = distance_weighted_negative_weights(
        distances.LpDistance()(emb), labels[:, None] != labels[None, :], dim, 0.5, 1.4
    )
    assert torch.equal(weights.amax(dim=1), torch.ones(6))


def test_distance_weighted_miner_requires_unit_euclidean_distance() -> None:
    for bad in (
        distances.CosineSimilarity(),
        distances.LpDistance(power=2),
        distances.LpDistance(normalize_embeddings=False),
        distances.LpDistance(p=1),
    ):
        with pytest.raises(ValueError, match="LpDistance"):
            DistanceWeightedMiner(distance=bad)
