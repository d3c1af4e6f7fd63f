"""Classification and proxy losses (NormalizedSoftmax, LargeMarginSoftmax, SphereFace, CosFace,
ArcFace, SubCenterArcFace, ProxyNCA, ProxyAnchor) over the same cases: PML parity of value and
gradients (embeddings and weights) through a shared state_dict, initial weights, regularizers,
reducers, logits, autocast, bad labels and arguments, and hypothesis batches."""

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
from tests.losses.classification_cases import (
    DIM,
    MODULES,
    N_CLASSES,
    _batch,
    _make_pair,
)

NAMES = list(MODULES)


WEIGHT_NAME = {name: "proxies" if name.startswith("Proxy") else "W" for name in NAMES}
WEIGHT_NAME["SoftTripleLoss"] = "fc"


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
    "SoftTripleLoss": {"centers_per_class": 3, "la": 8, "gamma": 0.3, "margin": 0.2},
}


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


WEIGHT_REGULARIZERS = ["LpRegularizer", "RegularFaceRegularizer", "CenterInvariantRegularizer"]


@pytest.mark.parametrize("regularizer", WEIGHT_REGULARIZERS)
@pytest.mark.parametrize("name", NAMES)
def test_parity_with_weight_regularizer(name: str, regularizer: str) -> None:
    kwargs = {"weight_reg_weight": 0.3}
    torch.manual_seed(0)
    theirs = getattr(pml_losses, name)(
        num_classes=N_CLASSES,
        embedding_size=DIM,
        weight_regularizer=getattr(pml_regularizers, regularizer)(),
        **kwargs,
    )
    ours = getattr(MODULES[name], name)(
        num_classes=N_CLASSES,
        embedding_size=DIM,
        weight_regularizer=getattr(regularizers, regularizer)(),
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
