"""LiftedStructureLoss, GeneralizedLiftedStructureLoss, NPairsLoss and NTXentLoss over the same
cases: parity with pytorch-metric-learning 2.9.0 (value and gradient), edge cases, bad labels,
random batches and a large batch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import pytorch_metric_learning.reducers as pml_reducers
import pytorch_metric_learning.regularizers as pml_regularizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from deepmetric import distances, reducers, regularizers
from deepmetric.losses.base import BaseMetricLossFunction
from deepmetric.losses.lifted import GeneralizedLiftedStructureLoss, LiftedStructureLoss
from deepmetric.losses.npairs import NPairsLoss
from deepmetric.losses.ntxent import NTXentLoss
from tests.losses.lifted_npairs_ntxent_cases import grads_wrt_both, shuffled_batch
from tests.parity import assert_same_loss, pk_labels, value_and_grad

LossPair = tuple[Callable[[], torch.nn.Module], Callable[[], torch.nn.Module]]


# (ours, PML) constructors: defaults, then non-default arguments and distances
CASES: dict[str, LossPair] = {
    "lifted-default": (LiftedStructureLoss, pml_losses.LiftedStructureLoss),
    "lifted-margins": (
        lambda: LiftedStructureLoss(neg_margin=0.7, pos_margin=0.2),
        lambda: pml_losses.LiftedStructureLoss(neg_margin=0.7, pos_margin=0.2),
    ),
    "lifted-cosine": (
        lambda: LiftedStructureLoss(
            neg_margin=0.3, pos_margin=0.9, distance=distances.CosineSimilarity()
        ),
        lambda: pml_losses.LiftedStructureLoss(
            neg_margin=0.3, pos_margin=0.9, distance=pml_distances.CosineSimilarity()
        ),
    ),
    "glifted-default": (GeneralizedLiftedStructureLoss, pml_losses.GeneralizedLiftedStructureLoss),
    "glifted-margins-squared": (
        lambda: GeneralizedLiftedStructureLoss(
            neg_margin=2.0, pos_margin=0.5, distance=distances.LpDistance(power=2)
        ),
        lambda: pml_losses.GeneralizedLiftedStructureLoss(
            neg_margin=2.0, pos_margin=0.5, distance=pml_distances.LpDistance(power=2)
        ),
    ),
    "glifted-cosine": (
        lambda: GeneralizedLiftedStructureLoss(
            neg_margin=0.2, pos_margin=0.8, distance=distances.CosineSimilarity()
        ),
        lambda: pml_losses.GeneralizedLiftedStructureLoss(
            neg_margin=0.2, pos_margin=0.8, distance=pml_distances.CosineSimilarity()
        ),
    ),
    "npairs-default": (NPairsLoss, pml_losses.NPairsLoss),
    "npairs-cosine": (
        lambda: NPairsLoss(distance=distances.CosineSimilarity()),
        lambda: pml_losses.NPairsLoss(distance=pml_distances.CosineSimilarity()),
    ),
    "npairs-euclidean": (
        lambda: NPairsLoss(distance=distances.LpDistance()),
        lambda: pml_losses.NPairsLoss(distance=pml_distances.LpDistance()),
    ),
    "ntxent-default": (NTXentLoss, pml_losses.NTXentLoss),
    "ntxent-temperature": (
        lambda: NTXentLoss(temperature=0.5),
        lambda: pml_losses.NTXentLoss(temperature=0.5),
    ),
    "ntxent-euclidean": (
        lambda: NTXentLoss(temperature=0.2, distance=distances.LpDistance()),
        lambda: pml_losses.NTXentLoss(temperature=0.2, distance=pml_distances.LpDistance()),
    ),
}


PAIR_BASED = [name for name in CASES if not name.startswith("npairs")]


DEFAULTS = [name for name in CASES if name.endswith("-default")]


def random_pairs(labels: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A miner-style (a1, p, a2, n) tuple with repeated pairs and anchors lacking negatives."""
    g = torch.Generator().manual_seed(seed)
    b = len(labels)
    a1, p = torch.randint(0, b, (n,), generator=g), torch.randint(0, b, (n,), generator=g)
    a2, neg = torch.randint(0, b, (n,), generator=g), torch.randint(0, b // 2, (n,), generator=g)
    keep_pos = (labels[a1] == labels[p]) & (a1 != p)
    keep_neg = labels[a2] != labels[neg]
    a1, p = a1[keep_pos], p[keep_pos]
    a2, neg = a2[keep_neg], neg[keep_neg]
    # repeat some pairs, as a miner's triplets (converted to pairs) do
    return (
        torch.cat([a1, a1[:3]]),
        torch.cat([p, p[:3]]),
        torch.cat([a2, a2[:5]]),
        torch.cat([neg, neg[:5]]),
    )


def random_triplets(labels: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(labels)
    a, p, neg = (torch.randint(0, b, (n,), generator=g) for _ in range(3))
    keep = (labels[a] == labels[p]) & (labels[a] != labels[neg]) & (a != p)
    return a[keep], p[keep], neg[keep]


# ---------------------------------------------------------------------------------------------
# parity with PML
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_parity_all_pairs(name: str) -> None:
    ours, theirs = CASES[name]
    emb, labels = shuffled_batch()
    assert_same_loss(ours(), theirs(), emb, labels)


@pytest.mark.parametrize("name", DEFAULTS)
def test_parity_float32_uneven_classes(name: str) -> None:
    ours, theirs = CASES[name]
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 5, (40,), generator=g)
    emb = torch.randn(40, 16, generator=g)
    assert_same_loss(ours(), theirs(), emb, labels, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [1, 2])
def test_parity_miner_pairs(name: str, seed: int) -> None:
    ours, theirs = CASES[name]
    emb, labels = shuffled_batch(seed=seed)
    tup = random_pairs(labels, 80, seed)
    assert_same_loss(ours(), theirs(), emb, labels, tup)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_miner_triplets(name: str) -> None:
    ours, theirs = CASES[name]
    emb, labels = shuffled_batch(seed=4)
    tup = random_triplets(labels, 120, seed=4)
    assert len(tup[0]) > 2
    assert_same_loss(ours(), theirs(), emb, labels, tup)


@pytest.mark.parametrize("name", DEFAULTS)
def test_parity_hand_built_tuples(name: str) -> None:
    ours, theirs = CASES[name]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pairs = (
        torch.tensor([0, 1, 2, 0]),
        torch.tensor([1, 0, 3, 1]),  # (0, 1) twice
        torch.tensor([0, 0, 2, 4, 0]),
        torch.tensor([2, 4, 5, 3, 2]),  # (0, 2) twice
    )
    triplets = (torch.tensor([0, 0, 3, 4]), torch.tensor([1, 1, 2, 5]), torch.tensor([2, 5, 0, 1]))
    assert_same_loss(ours(), theirs(), emb, labels, pairs)
    assert_same_loss(ours(), theirs(), emb, labels, triplets)


@pytest.mark.parametrize("name", DEFAULTS)
def test_parity_real_miner(name: str) -> None:
    ours, theirs = CASES[name]
    emb, labels = shuffled_batch(seed=6)
    tup = pml_miners.TripletMarginMiner(margin=0.3)(emb, labels)
    assert len(tup[0]) > 1
    assert_same_loss(ours(), theirs(), emb, labels, tup)


@pytest.mark.parametrize("name", [n for n in PAIR_BASED if n.endswith("-default")])
def test_parity_indices_tuple_without_labels(name: str) -> None:
    ours, theirs = CASES[name]
    emb, labels = shuffled_batch(seed=7)
    tup = random_pairs(labels, 80, 7)
    assert_same_loss(ours(), theirs(), emb, None, tup)


@pytest.mark.parametrize("name", PAIR_BASED)
@pytest.mark.parametrize("n_ref", [15, 33])
def test_parity_ref_emb(name: str, n_ref: int) -> None:
    ours, theirs = CASES[name]
    emb, labels = shuffled_batch(seed=8)
    g = torch.Generator().manual_seed(9)
    ref = torch.randn(n_ref, emb.shape[1], generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, 6, (n_ref,), generator=g)
    v1, ge1, gr1 = grads_wrt_both(ours(), emb, labels, ref, ref_labels)
    v2, ge2, gr2 = grads_wrt_both(theirs(), emb, labels, ref, ref_labels)
    assert v1 == pytest.approx(v2, rel=1e-5)
    torch.testing.assert_close(ge1, ge2)
    torch.testing.assert_close(gr1, gr2)


@pytest.mark.parametrize("name", [n for n in PAIR_BASED if n.endswith("-default")])
def test_parity_ref_emb_with_miner(name: str) -> None:
    ours, theirs = CASES[name]
    emb, labels = shuffled_batch(seed=10)
    ref = torch.randn(30, emb.shape[1], generator=torch.Generator().manual_seed(11)).double()
    ref_labels = torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(12))
    a, p, n = (
        torch.randint(0, 24, (60,)),
        torch.randint(0, 30, (60,)),
        torch.randint(0, 30, (60,)),
    )
    keep = (labels[a] == ref_labels[p]) & (labels[a] != ref_labels[n])
    tup = (a[keep], p[keep], n[keep])
    assert_same_loss(ours(), theirs(), emb, labels, tup, ref_emb=ref, ref_labels=ref_labels)


@pytest.mark.parametrize(
    ("ours_reducer", "pml_reducer"),
    [
        (reducers.SumReducer, pml_reducers.SumReducer),
        (reducers.AvgNonZeroReducer, pml_reducers.AvgNonZeroReducer),
        (
            lambda: reducers.ThresholdReducer(low=0.5),
            lambda: pml_reducers.ThresholdReducer(low=0.5),
        ),
    ],
)
@pytest.mark.parametrize("name", DEFAULTS)
def test_parity_reducers(name: str, ours_reducer: Callable[[], Any], pml_reducer: Any) -> None:
    ours, theirs = CASES[name]
    emb, labels = shuffled_batch(seed=13)
    ours_cls, theirs_cls = type(ours()), type(theirs())
    assert_same_loss(
        ours_cls(reducer=ours_reducer()), theirs_cls(reducer=pml_reducer()), emb, labels
    )


@pytest.mark.parametrize("name", DEFAULTS)
def test_parity_embedding_regularizer(name: str) -> None:
    ours, theirs = CASES[name]
    emb, labels = shuffled_batch(seed=14)
    ours_loss = type(ours())(
        embedding_regularizer=regularizers.LpRegularizer(), embedding_reg_weight=0.3
    )
    pml_loss = type(theirs())(
        embedding_regularizer=pml_regularizers.LpRegularizer(), embedding_reg_weight=0.3
    )
    assert_same_loss(ours_loss, pml_loss, emb, labels)


def test_defaults_match_pml() -> None:
    for name in DEFAULTS:
        ours, theirs = CASES[name][0](), CASES[name][1]()
        assert type(ours.distance).__name__ == type(theirs.distance).__name__, name
        assert type(ours.reducer).__name__ == type(theirs.reducer).__name__, name
        for attr in ("neg_margin", "pos_margin", "temperature"):
            assert getattr(ours, attr, None) == getattr(theirs, attr, None), (name, attr)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
@pytest.mark.parametrize("name", DEFAULTS)
def test_label_dtypes(name: str, dtype: torch.dtype) -> None:
    loss = CASES[name][0]()
    emb, labels = shuffled_batch(seed=15)
    expected = float(loss(emb, labels))
    assert float(loss(emb, labels.to(dtype))) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------


ALL_OURS: list[Callable[[], BaseMetricLossFunction]] = [
    LiftedStructureLoss,
    GeneralizedLiftedStructureLoss,
    NPairsLoss,
    NTXentLoss,
]


def assert_finite_zero(loss_fn: torch.nn.Module, emb: Tensor, *args: Any, **kwargs: Any) -> None:
    value, grad = value_and_grad(loss_fn, emb, *args, **kwargs)
    assert value == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("make_loss", ALL_OURS)
def test_edge_cases_give_zero(make_loss: Callable[[], BaseMetricLossFunction]) -> None:
    emb = torch.randn(6, 4, dtype=torch.float64)
    loss = make_loss()
    assert_finite_zero(loss, emb[:1], torch.tensor([3]))  # single sample
    assert_finite_zero(loss, emb[:0], torch.zeros(0, dtype=torch.long))  # empty batch
    empty = torch.zeros(0, dtype=torch.long)
    assert_finite_zero(loss, emb, torch.zeros(6, dtype=torch.long), (empty, empty, empty))


@pytest.mark.parametrize("make_loss", [LiftedStructureLoss, NPairsLoss, NTXentLoss])
def test_no_positives_or_no_negatives_give_zero(
    make_loss: Callable[[], BaseMetricLossFunction],
) -> None:
    emb = torch.randn(6, 4, dtype=torch.float64)
    assert_finite_zero(make_loss(), emb, torch.arange(6))  # no positives
    assert_finite_zero(make_loss(), emb, torch.zeros(6, dtype=torch.long))  # no negatives


@pytest.mark.parametrize("labels", [torch.arange(24), torch.zeros(24, dtype=torch.long)])
@pytest.mark.parametrize("name", DEFAULTS)
def test_no_positives_or_no_negatives_match_pml(name: str, labels: Tensor) -> None:
    """PML's generalised lifted loss is *not* zero here: each sample's negatives alone still
    push (or its positives alone still pull); the others are zero. Either way, as PML."""
    ours, theirs = CASES[name]
    emb, _ = shuffled_batch(seed=30)
    assert_same_loss(ours(), theirs(), emb, labels)
    if not name.startswith("glifted"):
        assert_finite_zero(ours(), emb, labels)


@pytest.mark.parametrize("name", DEFAULTS)
def test_one_positive_and_one_negative_pair_matches_pml(name: str) -> None:
    ours, theirs = CASES[name]
    emb = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    tup = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    assert_same_loss(ours(), theirs(), emb, labels, tup)


def test_bad_labels_raise() -> None:
    with pytest.raises(ValueError, match="integer"):
        LiftedStructureLoss()(torch.randn(4, 3), torch.tensor([0.0, 0.0, 1.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# random batches: always a finite value and a finite gradient
# ---------------------------------------------------------------------------------------------


HYPOTHESIS_LOSSES: list[Callable[[], BaseMetricLossFunction]] = [
    LiftedStructureLoss,
    lambda: LiftedStructureLoss(distance=distances.LpDistance(normalize_embeddings=False)),
    lambda: LiftedStructureLoss(
        distance=distances.DotProductSimilarity(normalize_embeddings=False)
    ),
    GeneralizedLiftedStructureLoss,
    lambda: GeneralizedLiftedStructureLoss(
        distance=distances.LpDistance(normalize_embeddings=False)
    ),
    NPairsLoss,
    lambda: NPairsLoss(distance=distances.LpDistance(normalize_embeddings=False)),
    NTXentLoss,
    lambda: NTXentLoss(
        distance=distances.DotProductSimilarity(normalize_embeddings=False), temperature=0.05
    ),
    lambda: NTXentLoss(distance=distances.LpDistance(normalize_embeddings=False)),
]


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 64),
    label_kind=st.sampled_from(["one-class", "distinct", "few", "many"]),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    duplicates=st.booleans(),
    loss_index=st.integers(0, len(HYPOTHESIS_LOSSES) - 1),
    float32=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_batches_finite(
    n: int,
    label_kind: str,
    scale: float,
    duplicates: bool,
    loss_index: int,
    float32: bool,
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if float32 else torch.float64
    emb = torch.randn(n, 6, generator=g, dtype=dtype) * scale
    if duplicates:
        emb[n // 2 :] = emb[: n - n // 2].clone()
    labels = {
        "one-class": torch.zeros(n, dtype=torch.long),
        "distinct": torch.arange(n),
        "few": torch.randint(0, 3, (n,), generator=g),
        "many": torch.randint(0, max(1, n // 2), (n,), generator=g),
    }[label_kind]
    value, grad = value_and_grad(HYPOTHESIS_LOSSES[loss_index](), emb, labels)
    assert math.isfinite(value)
    assert value >= 0.0
    assert bool(torch.isfinite(grad).all())


# ---------------------------------------------------------------------------------------------
# a large batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_loss", ALL_OURS)
def test_batch_2048_runs(make_loss: Callable[[], BaseMetricLossFunction]) -> None:
    g = torch.Generator().manual_seed(40)
    emb = torch.randn(2048, 64, generator=g).requires_grad_(True)
    labels = pk_labels(512, 4)
    start = time.perf_counter()
    loss = make_loss()(emb, labels)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    assert emb.grad is not None and bool(torch.isfinite(emb.grad).all())
    assert time.perf_counter() - start < 30
