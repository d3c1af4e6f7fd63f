"""MultiSimilarityLoss, CircleLoss, MarginLoss and RankedListLoss over the same cases: PML parity
(value and gradient, other distances, miner tuples, reference sets, regularizers, reducers), loop
references, edge cases, bad arguments, random batches and a large batch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers
from torch import Tensor

from deepmetric import distances, reducers, regularizers
from deepmetric.losses.circle import CircleLoss
from deepmetric.losses.margin import DivisorReducer, MarginLoss
from deepmetric.losses.multi_similarity import MultiSimilarityLoss
from deepmetric.losses.ranked_list import RankedListLoss
from tests.losses.ms_circle_margin_ranked_cases import (
    OURS,
    _assert_matches_loop,
    _assert_parity,
    _batch,
    _euclid,
    _loop_ranked_list,
    _miner_tuples,
    _pair,
)
from tests.parity import pk_labels, value_and_grad

CASES: list[tuple[str, dict[str, Any]]] = [
    ("MultiSimilarityLoss", {}),
    ("MultiSimilarityLoss", {"alpha": 1, "beta": 20, "base": 0.3}),
    ("MultiSimilarityLoss", {"alpha": 5, "beta": 10, "base": 0.8}),
    ("CircleLoss", {}),
    ("CircleLoss", {"m": 0.25, "gamma": 256}),
    ("CircleLoss", {"m": 0.1, "gamma": 32}),
    ("MarginLoss", {}),
    ("MarginLoss", {"margin": 0.1, "beta": 0.9, "nu": 0.1, "learn_beta": True}),
    ("MarginLoss", {"margin": 0.3, "beta": 1.0, "nu": 0.05, "learn_beta": True, "num_classes": 8}),
    ("RankedListLoss", {"margin": 0.4, "Tn": 1}),
    ("RankedListLoss", {"margin": 0.2, "Tn": 2, "imbalance": 0.3, "Tp": 1}),
    ("RankedListLoss", {"margin": 0.8, "Tn": 0.5, "alpha": 1.1, "Tp": 3}),
]


def _ids(cases: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{name}-{kwargs}" for name, kwargs in cases]


# -- PML parity ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=_ids(CASES))
@pytest.mark.parametrize("per_class", [2, 4])
def test_parity_with_pml(name: str, kwargs: dict[str, Any], per_class: int) -> None:
    emb, labels = _batch(per_class=per_class, seed=per_class)
    _assert_parity(*_pair(name, kwargs), emb, labels)


@pytest.mark.parametrize("name", list(OURS))
def test_parity_in_float32(name: str) -> None:
    kwargs = dict(CASES[[c[0] for c in CASES].index(name) + 1][1])
    emb, labels = _batch(seed=1)
    _assert_parity(*_pair(name, kwargs), emb.float(), labels, rtol=1e-5, atol=1e-6)


OTHER_DISTANCES: list[tuple[str, dict[str, Any], Callable[[], tuple[Any, Any]], float]] = [
    ("MultiSimilarityLoss", {}, lambda: (distances.LpDistance(), pml_distances.LpDistance()), 1),
    (
        "MultiSimilarityLoss",
        {"beta": 10},
        lambda: (
            distances.DotProductSimilarity(normalize_embeddings=False),
            pml_distances.DotProductSimilarity(normalize_embeddings=False),
        ),
        0.2,
    ),
    (
        "CircleLoss",
        {},
        lambda: (distances.DotProductSimilarity(), pml_distances.CosineSimilarity()),
        1,
    ),
    (
        "CircleLoss",
        {"m": 0.3, "gamma": 64},
        lambda: (distances.CosineSimilarity(power=2), pml_distances.CosineSimilarity(power=2)),
        1,
    ),
    (
        "MarginLoss",
        {"beta": 0.4, "margin": 0.1, "learn_beta": True, "nu": 0.1, "num_classes": 8},
        lambda: (distances.CosineSimilarity(), pml_distances.CosineSimilarity()),
        1,
    ),
    (
        "MarginLoss",
        {"beta": 1.5},
        lambda: (distances.LpDistance(power=2), pml_distances.LpDistance(power=2)),
        1,
    ),
    (
        "RankedListLoss",
        {"margin": 0.3, "Tn": 2, "alpha": 0.5, "Tp": 1},
        lambda: (distances.CosineSimilarity(), pml_distances.CosineSimilarity()),
        1,
    ),
    (
        "RankedListLoss",
        {"margin": 1.0, "Tn": 1},
        lambda: (
            distances.LpDistance(normalize_embeddings=False),
            pml_distances.LpDistance(normalize_embeddings=False),
        ),
        0.3,
    ),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "make_distances", "scale"),
    OTHER_DISTANCES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(OTHER_DISTANCES)],
)
def test_parity_with_other_distances(
    name: str, kwargs: dict[str, Any], make_distances: Callable[[], tuple[Any, Any]], scale: float
) -> None:
    emb, labels = _batch(seed=3)
    _assert_parity(*_pair(name, kwargs, distance=make_distances()), emb * scale, labels)


PML_TUPLE_CASES = [c for c in CASES if c[0] != "RankedListLoss"]


@pytest.mark.parametrize(("name", "kwargs"), PML_TUPLE_CASES, ids=_ids(PML_TUPLE_CASES))
def test_parity_with_miner_tuples(name: str, kwargs: dict[str, Any]) -> None:
    emb, labels = _batch(seed=5)
    for tup in _miner_tuples(labels, seed=5):
        _assert_parity(*_pair(name, kwargs), emb, labels, indices_tuple=tup)
        if "num_classes" not in kwargs:  # the per-class beta is picked by the anchor's label
            _assert_parity(*_pair(name, kwargs), emb, None, indices_tuple=tup)


@pytest.mark.parametrize(("name", "kwargs"), PML_TUPLE_CASES, ids=_ids(PML_TUPLE_CASES))
def test_parity_with_ref_emb(name: str, kwargs: dict[str, Any]) -> None:
    emb, labels = _batch(n_classes=8, per_class=3, seed=7)
    ref, ref_labels = _batch(n_classes=8, per_class=4, seed=8)
    _assert_parity(*_pair(name, kwargs), emb, labels, ref_emb=ref, ref_labels=ref_labels)


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "CircleLoss", "RankedListLoss"])
def test_parity_with_embedding_regularizer(name: str) -> None:
    kwargs = dict(CASES[[c[0] for c in CASES].index(name)][1])
    emb, labels = _batch(seed=11)
    reg = (regularizers.LpRegularizer(), pml_regularizers.LpRegularizer())
    ours, theirs = _pair(name, kwargs, embedding_regularizer=reg)
    ours.embedding_reg_weight = theirs.embedding_reg_weight = 0.1
    _assert_parity(ours, theirs, emb * 3, labels)


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "CircleLoss", "RankedListLoss"])
def test_parity_with_sum_reducer(name: str) -> None:
    kwargs = dict(CASES[[c[0] for c in CASES].index(name)][1])
    emb, labels = _batch(seed=15)
    reducer = (reducers.SumReducer(), pml_reducers.SumReducer())
    _assert_parity(*_pair(name, kwargs, reducer=reducer), emb, labels)


# -- slow loop references ------------------------------------------------------------------------
def _cos(x: Tensor, y: Tensor) -> Tensor:
    return F.normalize(x, dim=0) @ F.normalize(y, dim=0)


def _loop_multi_similarity(q: Tensor, r: Tensor, is_pos: Any, is_neg: Any) -> Tensor:
    alpha, beta, base = 2.0, 50.0, 0.5
    total = q.new_zeros(())
    for i in range(len(q)):
        pos_sum, neg_sum = q.new_zeros(()), q.new_zeros(())
        for j in range(len(r)):
            if is_pos(i, j):
                pos_sum = pos_sum + torch.exp(-alpha * (_cos(q[i], r[j]) - base))
            if is_neg(i, j):
                neg_sum = neg_sum + torch.exp(beta * (_cos(q[i], r[j]) - base))
        total = total + torch.log(1 + pos_sum) / alpha + torch.log(1 + neg_sum) / beta
    return total / len(q)


def _loop_circle(q: Tensor, r: Tensor, is_pos: Any, is_neg: Any) -> Tensor:
    m, gamma = 0.4, 80.0
    row_losses = []
    for i in range(len(q)):
        pos, neg = [], []
        for j in range(len(r)):
            s = _cos(q[i], r[j])
            if is_pos(i, j):
                pos.append(-gamma * max(0.0, 1 + m - s.item()) * (s - (1 - m)))
            if is_neg(i, j):
                neg.append(gamma * max(0.0, s.item() + m) * (s - m))
        if pos and neg:
            row_losses.append(
                F.softplus(
                    torch.logsumexp(torch.stack(pos), 0) + torch.logsumexp(torch.stack(neg), 0)
                )
            )
    nonzero = [x for x in row_losses if x.item() > 0]
    return torch.stack(nonzero).mean()


def _loop_margin(q: Tensor, r: Tensor, is_pos: Any, is_neg: Any) -> Tensor:
    margin = 0.2
    beta = float(torch.tensor(1.2))  # as in PML, beta is stored as a float32 tensor
    total, active = q.new_zeros(()), 0
    for a in range(len(q)):
        for p in range(len(r)):
            for n in range(len(r)):
                if is_pos(a, p) and is_neg(a, n):
                    pos = F.relu(_euclid(q[a], r[p]) - beta + margin)
                    neg = F.relu(beta - _euclid(q[a], r[n]) + margin)
                    total = total + pos + neg
                    active += int(pos.item() > 0) + int(neg.item() > 0)
    return total / active


LOOPS: list[tuple[Callable[..., Tensor], Any]] = [
    (_loop_multi_similarity, lambda: MultiSimilarityLoss()),
    (_loop_circle, lambda: CircleLoss()),
    (_loop_margin, lambda: MarginLoss()),
    (_loop_ranked_list, lambda: RankedListLoss(margin=0.4, Tn=2, Tp=1)),
]


def _labels_rule(labels: Tensor, ref_labels: Tensor, same: bool) -> tuple[Any, Any]:
    def is_pos(i: int, j: int) -> bool:
        return bool(labels[i] == ref_labels[j]) and not (same and i == j)

    def is_neg(i: int, j: int) -> bool:
        return bool(labels[i] != ref_labels[j])

    return is_pos, is_neg


@pytest.mark.parametrize(("loop", "make_loss"), LOOPS, ids=[f[0].__name__ for f in LOOPS])
def test_against_loop_reference(loop: Callable[..., Tensor], make_loss: Any) -> None:
    emb, labels = _batch(n_classes=3, per_class=4, dim=5, seed=31)
    _assert_matches_loop(make_loss(), loop, emb, None, _labels_rule(labels, labels, True), labels)


@pytest.mark.parametrize(("loop", "make_loss"), LOOPS, ids=[f[0].__name__ for f in LOOPS])
def test_ref_emb_against_loop_reference(loop: Callable[..., Tensor], make_loss: Any) -> None:
    emb, labels = _batch(n_classes=3, per_class=3, dim=5, seed=37)
    ref, ref_labels = _batch(n_classes=3, per_class=2, dim=5, seed=38)
    rules = _labels_rule(labels, ref_labels, False)
    _assert_matches_loop(
        make_loss(), loop, emb, ref, rules, labels, ref_emb=ref, ref_labels=ref_labels
    )


# -- edge cases ----------------------------------------------------------------------------------
EDGE_LABELS = {
    "single": torch.tensor([0]),
    "one-class": torch.zeros(6, dtype=torch.long),
    "all-distinct": torch.arange(6),
    "one-positive-pair": torch.tensor([0, 0]),
}


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=_ids(CASES))
@pytest.mark.parametrize("case", list(EDGE_LABELS))
def test_edge_cases_are_finite_and_match_pml(name: str, kwargs: dict[str, Any], case: str) -> None:
    labels = EDGE_LABELS[case]
    emb = torch.randn(
        len(labels), 4, generator=torch.Generator().manual_seed(43), dtype=torch.float64
    )
    ours, theirs = _pair(name, kwargs)
    value, grad = value_and_grad(ours, emb, labels)
    assert math.isfinite(value) and torch.isfinite(grad).all()
    # No triplet / no query with both a positive and a negative: zero, with zero gradient. The
    # multi-similarity and ranked-list terms of a query are independent (as in PML): a one-class
    # batch still pulls positives together, an all-distinct batch still pushes negatives apart.
    structurally_zero = case == "single" or name in ("CircleLoss", "MarginLoss")
    if structurally_zero:
        assert value == 0.0 and torch.all(grad == 0)
    if not (case == "single" and name == "RankedListLoss"):  # PML: eye(1) breaks on a 0-d mat
        _assert_parity(ours, theirs, emb, labels)


@pytest.mark.parametrize("name", list(OURS))
def test_empty_miner_tuple_gives_zero(name: str) -> None:
    emb, labels = _batch(seed=47)
    empty = torch.empty(0, dtype=torch.long)
    kwargs = dict(CASES[[c[0] for c in CASES].index(name)][1])
    for tup in ((empty, empty, empty), (empty, empty, empty, empty)):
        value, grad = value_and_grad(OURS[name](**kwargs), emb, labels, indices_tuple=tup)
        assert value == 0.0 and torch.all(grad == 0)


# -- inputs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
@pytest.mark.parametrize(("name", "kwargs"), [CASES[0], CASES[3], CASES[8], CASES[9]])
def test_any_integer_label_dtype(dtype: torch.dtype, name: str, kwargs: dict[str, Any]) -> None:
    emb, labels = _batch(seed=53)
    expected = value_and_grad(OURS[name](**kwargs), emb, labels)
    got = value_and_grad(OURS[name](**kwargs), emb, labels.to(dtype))
    assert got[0] == expected[0]
    torch.testing.assert_close(got[1], expected[1])


def test_bad_arguments_are_value_errors() -> None:
    emb, labels = _batch(seed=59)
    with pytest.raises(ValueError, match="similarity"):
        CircleLoss(distance=distances.LpDistance())
    with pytest.raises(ValueError, match="imbalance"):
        RankedListLoss(margin=0.1, Tn=1, imbalance=1.5)
    with pytest.warns(UserWarning, match="Tp or Tn"):
        RankedListLoss(margin=0.1, Tn=10)
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        MarginLoss(triplets_per_anchor="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        MarginLoss(num_classes=-1)
    with pytest.raises(ValueError, match="non-zero"):
        MultiSimilarityLoss(alpha=0)
    with pytest.raises(ValueError, match=r"\[0, num_classes=4\)"):
        MarginLoss(learn_beta=True, num_classes=4)(emb, labels)
    tup = _miner_tuples(labels, seed=59)[0]
    with pytest.raises(ValueError, match="needs labels"):
        MarginLoss(num_classes=8)(emb, None, indices_tuple=tup)
    clash = (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([1, 9]))
    with pytest.raises(ValueError, match="both a positive and a negative"):
        MultiSimilarityLoss()(emb, labels, indices_tuple=clash)
    with pytest.raises(ValueError, match="labels are required"):
        RankedListLoss(margin=0.1, Tn=1)(emb)
    with pytest.raises(ValueError, match="'divisor'"):
        DivisorReducer()(
            {"x": {"losses": torch.ones(2), "indices": None, "reduction_type": "element"}}, emb
        )


# -- random batches ------------------------------------------------------------------------------
LOSS_FACTORIES: dict[str, Callable[[], Any]] = {
    "multi-similarity": lambda: MultiSimilarityLoss(),
    "multi-similarity-lp": lambda: MultiSimilarityLoss(distance=distances.LpDistance()),
    "circle": lambda: CircleLoss(),
    "margin": lambda: MarginLoss(),
    "margin-per-class": lambda: MarginLoss(learn_beta=True, nu=0.1, num_classes=64),
    "margin-threshold": lambda: MarginLoss(reducer=reducers.ThresholdReducer(0.1, 0.3)),
    "ranked-list": lambda: RankedListLoss(margin=0.4, Tn=2, Tp=1),
    "ranked-list-raw": lambda: RankedListLoss(
        margin=0.4, Tn=2, distance=distances.LpDistance(normalize_embeddings=False)
    ),
}


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 64),
    classes=st.sampled_from(["one", "distinct", "few"]),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    duplicates=st.booleans(),
    double=st.booleans(),
    name=st.sampled_from(list(LOSS_FACTORIES)),
    seed=st.integers(0, 2**16),
)
def test_random_batches_give_finite_value_and_gradient(
    n: int, classes: str, scale: float, duplicates: bool, double: bool, name: str, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    labels = {
        "one": torch.zeros(n, dtype=torch.long),
        "distinct": torch.arange(n),
        "few": torch.randint(0, 4, (n,), generator=g),
    }[classes]
    emb = torch.randn(n, 8, generator=g, dtype=torch.float64 if double else torch.float32) * scale
    if duplicates:
        emb[n // 2 :] = emb[: n - n // 2].clone()
    value, grad = value_and_grad(LOSS_FACTORIES[name](), emb, labels)
    assert math.isfinite(value) and torch.isfinite(grad).all()


# -- scale ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OURS))
def test_large_batch_runs_forward_and_backward(name: str) -> None:
    """B = 2048 with 4 per class (~25M triplets for MarginLoss): O(B·R), a few seconds."""
    kwargs = dict(CASES[[c[0] for c in CASES].index(name)][1])
    g = torch.Generator().manual_seed(61)
    emb = torch.randn(2048, 64, generator=g).requires_grad_(True)
    start = time.perf_counter()
    loss = OURS[name](**kwargs)(emb, pk_labels(512, 4))
    loss.backward()
    assert time.perf_counter() - start < 20
    assert torch.isfinite(loss) and emb.grad is not None and torch.isfinite(emb.grad).all()
