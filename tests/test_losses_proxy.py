"""Classification and proxy losses (NormalizedSoftmax, LargeMarginSoftmax, SphereFace, CosFace,
ArcFace, SubCenterArcFace, ProxyNCA, ProxyAnchor): PML parity of value and gradients (embeddings
and weights) through a shared state_dict, loop and closed-form references, autocast, ArcFace at
theta = 0 and pi, bad labels, and hypothesis batches."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers
from torch import Tensor, nn

from deepmetric import distances, reducers, regularizers
from deepmetric.losses import proxy, softmax_margin

MODULES = {
    "NormalizedSoftmaxLoss": softmax_margin,
    "LargeMarginSoftmaxLoss": softmax_margin,
    "SphereFaceLoss": softmax_margin,
    "CosFaceLoss": softmax_margin,
    "ArcFaceLoss": softmax_margin,
    "SubCenterArcFaceLoss": softmax_margin,
    "ProxyNCALoss": proxy,
    "ProxyAnchorLoss": proxy,
}
NAMES = list(MODULES)
WEIGHT_NAME = {name: "proxies" if name.startswith("Proxy") else "W" for name in NAMES}

# one non-default set per loss; "_distance" is a (deepmetric, PML) pair of distance factories
NON_DEFAULT: dict[str, dict[str, Any]] = {
    "NormalizedSoftmaxLoss": {"temperature": 0.2},
    "LargeMarginSoftmaxLoss": {"margin": 3, "scale": 2.0},
    "SphereFaceLoss": {"margin": 2, "scale": 0.5},
    "CosFaceLoss": {"margin": 0.2, "scale": 30},
    "ArcFaceLoss": {"margin": 20, "scale": 30},
    "SubCenterArcFaceLoss": {"margin": 10, "scale": 16, "sub_centers": 2},
    "ProxyNCALoss": {
        "softmax_scale": 3,
        "_distance": (distances.CosineSimilarity, pml_distances.CosineSimilarity),
    },
    "ProxyAnchorLoss": {
        "margin": 0.2,
        "alpha": 16,
        "_distance": (lambda: distances.LpDistance(), pml_distances.LpDistance),
    },
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


def _value_and_grads(loss_fn: nn.Module, emb: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
    emb = emb.detach().clone().requires_grad_(True)
    weight = next(iter(loss_fn.parameters()))
    weight.grad = None
    value = loss_fn(emb, *args)
    value.backward()
    assert emb.grad is not None and weight.grad is not None
    return value.detach(), emb.grad, weight.grad


def _assert_parity(
    ours: nn.Module, theirs: nn.Module, emb: Tensor, *args: Any, rtol: float = 1e-5
) -> None:
    v1, ge1, gw1 = _value_and_grads(ours, emb, *args)
    v2, ge2, gw2 = _value_and_grads(theirs, emb, *args)
    assert torch.isfinite(v2), "the reference itself is not finite"
    assert abs(float(v1) - float(v2)) <= 1e-7 + rtol * abs(float(v2)), f"{v1} != PML {v2}"
    torch.testing.assert_close(ge1, ge2.to(ge1.dtype), rtol=rtol * 10, atol=1e-6)
    torch.testing.assert_close(gw1, gw2.to(gw1.dtype), rtol=rtol * 10, atol=1e-6)


# -- PML parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("non_default", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_parity_float64(name: str, non_default: bool) -> None:
    ours, theirs = _make_pair(name, NON_DEFAULT[name] if non_default else None)
    ours.double()
    theirs.double()
    _assert_parity(ours, theirs, *_batch())


@pytest.mark.parametrize("name", NAMES)
def test_parity_float32(name: str) -> None:
    ours, theirs = _make_pair(name)
    _assert_parity(ours, theirs, *_batch(dtype=torch.float32), rtol=2e-5)


@pytest.mark.parametrize(
    "name", ["LargeMarginSoftmaxLoss", "SphereFaceLoss", "CosFaceLoss", "ArcFaceLoss"]
)
def test_parity_over_the_whole_range_of_target_angles(name: str) -> None:
    """Target angles from 3° to 177°: every k of L-softmax's ψ and both ArcFace branches."""
    ours, theirs = _make_pair(name)
    ours.double()
    theirs.double()
    n = 24
    gen = torch.Generator().manual_seed(5)
    labels = torch.arange(n) % N_CLASSES
    w = F.normalize(theirs.W.detach()[:, labels].t(), dim=1)  # (n, D) unit class weights
    r = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    r = F.normalize(r - (r * w).sum(1, keepdim=True) * w, dim=1)  # orthogonal to w
    theta = torch.linspace(math.radians(3), math.radians(177), n, dtype=torch.float64)
    emb = (torch.cos(theta)[:, None] * w + torch.sin(theta)[:, None] * r) * 1.3
    _assert_parity(ours, theirs, emb, labels)


@pytest.mark.parametrize("name", NAMES)
def test_same_initial_weights_as_pml_for_the_same_seed(name: str) -> None:
    torch.manual_seed(3)
    theirs = getattr(pml_losses, name)(num_classes=N_CLASSES, embedding_size=DIM)
    torch.manual_seed(3)
    ours = getattr(MODULES[name], name)(num_classes=N_CLASSES, embedding_size=DIM)
    key = WEIGHT_NAME[name]
    assert list(ours.state_dict()) == [key]
    torch.testing.assert_close(ours.state_dict()[key], theirs.state_dict()[key], rtol=0, atol=0)
    assert [p is getattr(ours, key) for p in ours.parameters()] == [True]


@pytest.mark.parametrize("name", NAMES)
def test_float64_input_leaves_float32_weights_alone(name: str) -> None:
    """PML casts W in place to the input's dtype; ours computes in float64 and keeps W float32,
    and the result equals PML's (which upcasts W to float64)."""
    ours, theirs = _make_pair(name)
    _assert_parity(ours, theirs, *_batch())
    assert next(iter(ours.parameters())).dtype == torch.float32


@pytest.mark.parametrize("tuple_size", [3, 4])
@pytest.mark.parametrize("name", NAMES)
def test_parity_with_miner_tuple(name: str, tuple_size: int) -> None:
    ours, theirs = _make_pair(name)
    ours.double()
    theirs.double()
    emb, labels = _batch()
    if tuple_size == 3:
        indices: tuple[Tensor, ...] = (
            torch.tensor([0, 0, 3, 5]),
            torch.tensor([2, 2, 7, 1]),
            torch.tensor([4, 9, 9, 4]),
        )
    else:
        indices = (
            torch.tensor([1, 1, 6]),
            torch.tensor([2, 8, 2]),
            torch.tensor([1, 11]),
            torch.tensor([3, 3]),
        )
    _assert_parity(ours, theirs, emb, labels, indices)


@pytest.mark.parametrize("name", NAMES)
def test_parity_with_weight_regularizer(name: str) -> None:
    kwargs = {"weight_reg_weight": 0.3}
    torch.manual_seed(0)
    theirs = getattr(pml_losses, name)(
        num_classes=N_CLASSES,
        embedding_size=DIM,
        weight_regularizer=pml_regularizers.LpRegularizer(),
        **kwargs,
    )
    ours = getattr(MODULES[name], name)(
        num_classes=N_CLASSES,
        embedding_size=DIM,
        weight_regularizer=regularizers.LpRegularizer(),
        **kwargs,
    )
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.double()
    theirs.double()
    _assert_parity(ours, theirs, *_batch())


@pytest.mark.parametrize("name", NAMES)
def test_weight_init_func_is_applied_to_the_weight(name: str) -> None:
    def init(weight: Tensor) -> None:
        nn.init.uniform_(weight, -0.5, 0.5)

    torch.manual_seed(4)
    theirs = getattr(pml_losses, name)(
        num_classes=N_CLASSES, embedding_size=DIM, weight_init_func=init
    )
    torch.manual_seed(4)
    ours = getattr(MODULES[name], name)(
        num_classes=N_CLASSES, embedding_size=DIM, weight_init_func=init
    )
    key = WEIGHT_NAME[name]
    torch.testing.assert_close(ours.state_dict()[key], theirs.state_dict()[key], rtol=0, atol=0)
    assert float(getattr(ours, key).detach().abs().max()) <= 0.5
    # a plain in-place lambda works too (applied without autograd)
    const = getattr(MODULES[name], name)(
        num_classes=N_CLASSES, embedding_size=DIM, weight_init_func=lambda w: w.fill_(0.25)
    )
    assert bool((getattr(const, key) == 0.25).all())


@pytest.mark.parametrize(
    ("name", "ours_reducer", "pml_reducer"),
    [
        ("ProxyAnchorLoss", reducers.MeanReducer, pml_reducers.MeanReducer),
        ("ProxyAnchorLoss", reducers.SumReducer, pml_reducers.SumReducer),
        ("ArcFaceLoss", reducers.SumReducer, pml_reducers.SumReducer),
        ("ProxyNCALoss", reducers.AvgNonZeroReducer, pml_reducers.AvgNonZeroReducer),
    ],
)
def test_parity_with_other_reducer(
    name: str, ours_reducer: type[nn.Module], pml_reducer: type[nn.Module]
) -> None:
    torch.manual_seed(0)
    theirs = getattr(pml_losses, name)(
        num_classes=N_CLASSES, embedding_size=DIM, reducer=pml_reducer()
    )
    ours = getattr(MODULES[name], name)(
        num_classes=N_CLASSES, embedding_size=DIM, reducer=ours_reducer()
    )
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.double()
    theirs.double()
    _assert_parity(ours, theirs, *_batch())


@pytest.mark.parametrize("name", NAMES)
def test_get_logits_matches_pml(name: str) -> None:
    ours, theirs = _make_pair(name)
    emb, _ = _batch(dtype=torch.float32)
    torch.testing.assert_close(ours.get_logits(emb), theirs.get_logits(emb), rtol=1e-5, atol=1e-5)


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


# -- loop and closed-form references --------------------------------------------------------------


def _cross_entropy(logits: list[float], target: int) -> float:
    top = max(logits)
    return -(logits[target] - top - math.log(sum(math.exp(v - top) for v in logits)))


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


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


def test_cos_of_multiple_angle_is_cos_m_theta() -> None:
    theta = torch.linspace(0, math.pi, 50, dtype=torch.float64)
    for m in range(1, 7):
        got = softmax_margin.cos_of_multiple_angle(torch.cos(theta), m)
        torch.testing.assert_close(got, torch.cos(m * theta))


# -- robustness ---------------------------------------------------------------------------------


AUTOCAST = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param(
        "cuda",
        torch.float16,
        id="cuda-fp16",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


@pytest.mark.parametrize(("device", "half"), AUTOCAST)
@pytest.mark.parametrize("name", NAMES)
def test_autocast_stays_finite_and_weights_stay_float32(
    name: str, device: str, half: torch.dtype
) -> None:
    ours, _ = _make_pair(name)
    ours.to(device)
    weight = next(iter(ours.parameters()))
    torch.manual_seed(2)
    trunk = nn.Linear(12, DIM).to(device)
    x = torch.randn(16, 12, device=device)
    labels = _batch()[1].to(device)
    with torch.autocast(device, dtype=half):
        emb = trunk(x)
        assert emb.dtype == half
        value = ours(emb, labels)
    value.backward()
    assert value.dtype == torch.float32 and bool(torch.isfinite(value))
    assert weight.dtype == torch.float32
    assert weight.grad is not None and weight.grad.dtype == torch.float32
    assert bool(torch.isfinite(weight.grad).all())
    assert trunk.weight.grad is not None and bool(torch.isfinite(trunk.weight.grad).all())
    # same as the float32 loss on the bf16-rounded embeddings
    expected = ours(emb.detach().float(), labels)
    assert float(value) == pytest.approx(float(expected), rel=1e-6)


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
        target = softmax_margin.target_logits(cosine, labels)
        expected = math.cos(m) if sign > 0 else -1 - m * math.sin(m)
        got = ours.modify_cosine_of_target_classes(target)
        # a float32 cosine of 1 - 6e-8 is an angle of 3.5e-4: sin(m) * 3.5e-4 off cos(m)
        tol = 1e-3 if dtype == torch.float32 else 1e-7
        torch.testing.assert_close(got, torch.full_like(got, expected), rtol=0, atol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_bad_labels_are_value_errors(name: str) -> None:
    ours, _ = _make_pair(name)
    emb, labels = _batch()
    for bad in (N_CLASSES, -1):
        wrong = labels.clone()
        wrong[3] = bad
        with pytest.raises(ValueError, match=rf"label {bad}\b"):
            ours(emb, wrong)
    with pytest.raises(ValueError, match="labels are required"):
        ours(emb)
    with pytest.raises(ValueError, match="labels are required"):
        ours(emb, None, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        ours(emb, labels, None, emb.clone(), labels)


def test_bad_constructor_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="CosineSimilarity"):
        softmax_margin.ArcFaceLoss(3, 4, distance=distances.LpDistance())
    with pytest.raises(ValueError, match="margin"):
        softmax_margin.LargeMarginSoftmaxLoss(3, 4, margin=0)
    with pytest.raises(ValueError, match="num_classes"):
        proxy.ProxyAnchorLoss(0, 4)
    with pytest.raises(ValueError, match="sub_centers"):
        softmax_margin.SubCenterArcFaceLoss(3, 4, sub_centers=0)


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_is_a_zero_loss_with_zero_gradient(name: str) -> None:
    ours, _ = _make_pair(name)
    emb = torch.zeros(0, DIM, requires_grad=True)
    value = ours(emb, torch.zeros(0, dtype=torch.long))
    value.backward()
    assert float(value) == 0.0
    weight = next(iter(ours.parameters()))
    assert weight.grad is None or float(weight.grad.abs().sum()) == 0.0


_LOSSES = {name: getattr(MODULES[name], name)(num_classes=64, embedding_size=DIM) for name in NAMES}


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    n=st.integers(1, 64),
    labelling=st.sampled_from(["one_class", "distinct", "random"]),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    duplicates=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_batches_give_finite_values_and_gradients(
    name: str, n: int, labelling: str, scale: float, duplicates: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, DIM, generator=gen)
    if duplicates:
        emb = emb[torch.randint(0, max(1, n // 3), (n,), generator=gen)]
    emb = (emb * scale).requires_grad_(True)
    if labelling == "one_class":
        labels = torch.full((n,), 5)
    elif labelling == "distinct":
        labels = torch.randperm(64, generator=gen)[:n]
    else:
        labels = torch.randint(0, 4, (n,), generator=gen)
    loss_fn = _LOSSES[name]
    weight = next(iter(loss_fn.parameters()))
    weight.grad = None
    value = loss_fn(emb, labels)
    value.backward()
    assert bool(torch.isfinite(value)) and float(value) >= 0
    assert emb.grad is not None and bool(torch.isfinite(emb.grad).all())
    assert weight.grad is not None and bool(torch.isfinite(weight.grad).all())


def test_parameters_train_with_an_optimizer() -> None:
    torch.manual_seed(0)
    loss_fn = softmax_margin.CosFaceLoss(3, 4)
    emb = torch.randn(30, 4)
    labels = torch.arange(3).repeat(10)
    emb = emb + 3 * F.one_hot(labels, 4).float()
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.5)
    first = float(loss_fn(emb, labels))
    for _ in range(20):
        optimizer.zero_grad()
        loss_fn(emb, labels).backward()
        optimizer.step()
    assert float(loss_fn(emb, labels)) < first
