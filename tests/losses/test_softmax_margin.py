"""The softmax-margin losses (:mod:`deepmetric.losses.softmax_margin`): loop and closed-form
references, cos(m theta), ArcFace at theta = 0 and pi, SubCenterArcFace's outliers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from deepmetric import functional
from deepmetric.losses import softmax_margin
from tests.losses.classification_cases import (
    _batch,
    _cross_entropy,
    _dot,
    _make_pair,
    _unit,
)


def test_subcenter_get_outliers_matches_pml() -> None:
    ours, theirs = _make_pair("SubCenterArcFaceLoss", {"sub_centers": 3}, num_classes=4)
    emb, labels = _batch(n=40, num_classes=3, dtype=torch.float32)  # class 3 is absent
    out1, centers1 = ours.get_outliers(emb, labels, threshold=80)
    out2, centers2 = theirs.get_outliers(emb, labels, threshold=80)
    assert out1.tolist() == out2.long().tolist()
    assert len(out1) > 0
    torch.testing.assert_close(centers1[:, :3], centers2[:, :3])
    assert bool((centers1[:, 3] == 0).all())
    only = ours.get_outliers(emb, labels, threshold=80, return_dominant_centers=False)
    assert isinstance(only, Tensor) and only.tolist() == out1.tolist()


def test_normalized_softmax_matches_a_loop() -> None:
    loss_fn = softmax_margin.NormalizedSoftmaxLoss(4, 5, temperature=0.3).double()
    emb, labels = _batch(n=7, num_classes=4, dim=5)
    columns = [_unit(loss_fn.W[:, j].tolist()) for j in range(4)]
    expected = 0.0
    for x, y in zip(emb.tolist(), labels.tolist(), strict=True):
        logits = [_dot(_unit(x), w) / 0.3 for w in columns]
        expected += _cross_entropy(logits, y) / 7
    assert float(loss_fn(emb, labels)) == pytest.approx(expected, rel=1e-10)


def test_large_margin_matches_a_loop_with_cos_m_theta() -> None:
    """cos(m θ) straight from the angle (not the Chebyshev polynomial), ψ from the paper."""
    m, scale = 3, 1.5
    loss_fn = softmax_margin.LargeMarginSoftmaxLoss(4, 5, margin=m, scale=scale).double()
    emb, labels = _batch(n=9, num_classes=4, dim=5)
    expected = 0.0
    for x, y in zip(emb.tolist(), labels.tolist(), strict=True):
        logits = []
        for j in range(4):
            w = loss_fn.W[:, j].tolist()
            norms = math.sqrt(_dot(x, x)) * math.sqrt(_dot(w, w))
            cos = _dot(_unit(x), _unit(w))
            if j == y:
                theta = math.acos(cos)
                k = math.floor(theta * m / math.pi)
                cos = (-1) ** k * math.cos(m * theta) - 2 * k
            logits.append(cos * norms * scale)
        expected += _cross_entropy(logits, y) / 9
    assert float(loss_fn(emb, labels)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("theta_deg", [0.0, 10.0, 60.0, 140.0, 165.0, 180.0])
def test_arcface_closed_form_one_sample_two_classes(theta_deg: float) -> None:
    """One 2-D sample at angle θ from its class's weight, the other class at 90°."""
    margin_deg, scale = 28.6, 64.0
    loss_fn = softmax_margin.ArcFaceLoss(2, 2).double()
    with torch.no_grad():
        loss_fn.W.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # class 0 along x, class 1 along y
    theta = math.radians(theta_deg)
    emb = torch.tensor([[math.cos(theta), -math.sin(theta)]], dtype=torch.float64) * 3
    labels = torch.tensor([0])
    m = math.radians(margin_deg)
    target = math.cos(theta + m) if theta <= math.pi - m else math.cos(theta) - m * math.sin(m)
    other = -math.sin(theta)  # cosine to class 1
    expected = _cross_entropy([target * scale, other * scale], 0)
    emb.requires_grad_(True)
    value = loss_fn(emb, labels)
    value.backward()
    assert float(value) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert emb.grad is not None and bool(torch.isfinite(emb.grad).all())


def test_cos_of_multiple_angle_is_cos_m_theta() -> None:
    theta = torch.linspace(0, math.pi, 50, dtype=torch.float64)
    for m in range(1, 7):
        got = functional.cos_of_multiple_angle(torch.cos(theta), m)
        torch.testing.assert_close(got, torch.cos(m * theta))


@pytest.mark.parametrize("name", ["ArcFaceLoss", "SubCenterArcFaceLoss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sign", [1.0, -1.0])  # theta = 0 and theta = pi
def test_arcface_at_theta_zero_and_pi_is_finite(name: str, dtype: torch.dtype, sign: float) -> None:
    ours, _ = _make_pair(name)
    ours.to(dtype)
    labels = torch.tensor([0, 3, 5, 3])
    centers = getattr(ours, "sub_centers", 1)
    columns = ours.W.detach()[:, labels * centers]  # (D, B): the (first) center of each class
    emb = (sign * columns.t() * 1.7).requires_grad_(True)
    value = ours(emb, labels)
    value.backward()
    assert bool(torch.isfinite(value))
    assert emb.grad is not None and bool(torch.isfinite(emb.grad).all())
    assert ours.W.grad is not None and bool(torch.isfinite(ours.W.grad).all())
    if name == "ArcFaceLoss":
        # the target logit is exactly cos(0 + m) or cos(π) - m sin m
        m = ours.margin
        cosine = ours.get_cosine(emb.detach())
        target = functional.target_logits(cosine, labels)
        expected = math.cos(m) if sign > 0 else -1 - m * math.sin(m)
        got = ours.modify_cosine_of_target_classes(target)
        # a float32 cosine of 1 - 6e-8 is an angle of 3.5e-4: sin(m) * 3.5e-4 off cos(m)
        tol = 1e-3 if dtype == torch.float32 else 1e-7
        torch.testing.assert_close(got, torch.full_like(got, expected), rtol=0, atol=tol)
