"""ProxyNCALoss and ProxyAnchorLoss (:mod:`deepmetric.losses.proxy`) against loops written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric.losses import proxy
from tests.losses.classification_cases import (
    _batch,
    _cross_entropy,
    _dot,
    _make_pair,
    _unit,
)


def test_proxy_nca_and_proxy_anchor_match_loops() -> None:
    emb, labels = _batch(n=10, num_classes=4, dim=5)
    nca = proxy.ProxyNCALoss(4, 5, softmax_scale=2.0).double()
    anchor = proxy.ProxyAnchorLoss(4, 5, margin=0.1, alpha=8.0).double()
    xs = [_unit(x) for x in emb.tolist()]
    ys = labels.tolist()
    nca_proxies = [_unit(p) for p in nca.proxies.tolist()]
    expected_nca = 0.0
    for x, y in zip(xs, ys, strict=True):
        logits = [-2.0 * sum((a - b) ** 2 for a, b in zip(x, p, strict=True)) for p in nca_proxies]
        expected_nca += _cross_entropy(logits, y) / len(xs)
    assert float(nca(emb, labels)) == pytest.approx(expected_nca, rel=1e-9)

    anchor_proxies = [_unit(p) for p in anchor.proxies.tolist()]
    pos_total, neg_total = 0.0, 0.0
    for j, p in enumerate(anchor_proxies):
        sims = [_dot(x, p) for x in xs]
        pos = sum(math.exp(-8.0 * (s - 0.1)) for s, y in zip(sims, ys, strict=True) if y == j)
        neg = sum(math.exp(8.0 * (s + 0.1)) for s, y in zip(sims, ys, strict=True) if y != j)
        pos_total += math.log1p(pos)
        neg_total += math.log1p(neg)
    expected_anchor = pos_total / len(set(ys)) + neg_total / 4
    assert float(anchor(emb, labels)) == pytest.approx(expected_anchor, rel=1e-9)


def test_proxy_nca_keeps_samples_whose_probability_underflows() -> None:
    """Deliberate deviation: PML drops a sample whose class probability underflows to 0 (here
    every loss becomes 0); ours keeps its large, finite cross-entropy."""
    ours, theirs = _make_pair("ProxyNCALoss", {"softmax_scale": 200.0}, num_classes=3, dim=4)
    emb, labels = _batch(n=6, num_classes=3, dim=4, dtype=torch.float32)
    emb[0] = -theirs.proxies.detach()[labels[0]]  # as far from its proxy as it gets
    value = ours(emb, labels)
    logits = -200.0 * torch.cdist(F.normalize(emb), F.normalize(ours.proxies.detach())) ** 2
    expected = F.cross_entropy(logits, labels)
    assert float(value) == pytest.approx(float(expected), rel=1e-4)
    assert float(value) > 100 and float(theirs(emb, labels)) < float(value)
