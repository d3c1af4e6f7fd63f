"""MultiSimilarityLoss, CircleLoss, MarginLoss and RankedListLoss: PML parity (value and
gradient, and MarginLoss's beta gradient), loop references, miner tuples, reference sets, the
non-enumerating all-triplets path of MarginLoss, edge cases, random batches and a large batch."""

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
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers
from torch import Tensor

import deepmetric.pairwise.triplets as margin_module
from deepmetric import distances, reducers, regularizers
from deepmetric.losses.circle import CircleLoss
from deepmetric.losses.margin import DivisorReducer, MarginLoss
from deepmetric.losses.multi_similarity import MultiSimilarityLoss
from deepmetric.losses.ranked_list import RankedListLoss
from deepmetric.pairwise import all_triplets, label_masks
from tests.parity import assert_same_loss, pk_labels, value_and_grad

OURS: dict[str, type] = {
    "MultiSimilarityLoss": MultiSimilarityLoss,
    "CircleLoss": CircleLoss,
    "MarginLoss": MarginLoss,
    "RankedListLoss": RankedListLoss,
}

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


def _batch(
    n_classes: int = 8, per_class: int = 4, dim: int = 16, seed: int = 0
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_classes * per_class, dim, generator=g, dtype=torch.float64)
    return emb, pk_labels(n_classes, per_class)


def _pair(name: str, kwargs: dict[str, Any], **options: Any) -> tuple[Any, Any]:
    """Our loss and PML's, with the same arguments; ``options`` maps an option name to an
    ``(ours, theirs)`` pair (distance, reducer, ...)."""
    ours = OURS[name](**kwargs, **{k: v[0] for k, v in options.items()})
    theirs = getattr(pml_losses, name)(**kwargs, **{k: v[1] for k, v in options.items()})
    return ours, theirs


def _assert_parity(ours: Any, theirs: Any, emb: Tensor, *args: Any, **kwargs: Any) -> None:
    """Same value and embedding gradient as PML; for a learnable beta, the same beta gradient."""
    assert_same_loss(ours, theirs, emb, *args, **kwargs)
    if isinstance(ours, MarginLoss) and ours.learn_beta:
        # no triplet: PML's beta is not in the graph (no gradient); ours may have a zero one
        ours_grad = ours.beta.grad if ours.beta.grad is not None else torch.zeros_like(ours.beta)
        theirs_grad = (
            theirs.beta.grad if theirs.beta.grad is not None else torch.zeros_like(ours.beta)
        )
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-7)


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


def _miner_tuples(labels: Tensor, seed: int) -> list[tuple[Tensor, ...]]:
    """A random subset of the true triplets, and some positive and negative pairs."""
    g = torch.Generator().manual_seed(seed)
    a, p, n = all_triplets(*label_masks(labels, labels, same_source=True))
    pick = torch.randperm(len(a), generator=g)[:60]
    pos_mask, neg_mask = label_masks(labels, labels, same_source=True)
    a1, p1 = torch.where(pos_mask)
    a2, n2 = torch.where(neg_mask)
    keep_pos = torch.randperm(len(a1), generator=g)[:25]
    keep_neg = torch.randperm(len(a2), generator=g)[:70]
    return [(a[pick], p[pick], n[pick]), (a1[keep_pos], p1[keep_pos], a2[keep_neg], n2[keep_neg])]


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


@pytest.mark.parametrize(
    "make_reducers",
    [
        lambda: (reducers.MeanReducer(), pml_reducers.MeanReducer()),
        lambda: (reducers.SumReducer(), pml_reducers.SumReducer()),
        lambda: (reducers.AvgNonZeroReducer(), pml_reducers.AvgNonZeroReducer()),
        lambda: (reducers.ThresholdReducer(0.05, 0.5), pml_reducers.ThresholdReducer(0.05, 0.5)),
        lambda: (reducers.ThresholdReducer(high=0.3), pml_reducers.ThresholdReducer(high=0.3)),
        lambda: (reducers.ThresholdReducer(low=0.25), pml_reducers.ThresholdReducer(low=0.25)),
        lambda: (
            reducers.MultipleReducers({"margin_loss": reducers.AvgNonZeroReducer()}),
            pml_reducers.MultipleReducers({"margin_loss": pml_reducers.AvgNonZeroReducer()}),
        ),
    ],
    ids=["mean", "sum", "avg-non-zero", "threshold", "below", "above", "multiple"],
)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"learn_beta": True, "nu": 0.2}, {"learn_beta": True, "nu": 0.2, "num_classes": 8}],
    ids=["fixed", "learn", "per-class"],
)
def test_margin_parity_with_other_reducers(
    make_reducers: Callable[[], tuple[Any, Any]], kwargs: dict[str, Any]
) -> None:
    emb, labels = _batch(seed=13)
    _assert_parity(*_pair("MarginLoss", kwargs, reducer=make_reducers()), emb, labels)
    ref, ref_labels = _batch(seed=14)
    _assert_parity(
        *_pair("MarginLoss", kwargs, reducer=make_reducers()),
        emb,
        labels,
        ref_emb=ref,
        ref_labels=ref_labels,
    )


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "CircleLoss", "RankedListLoss"])
def test_parity_with_sum_reducer(name: str) -> None:
    kwargs = dict(CASES[[c[0] for c in CASES].index(name)][1])
    emb, labels = _batch(seed=15)
    reducer = (reducers.SumReducer(), pml_reducers.SumReducer())
    _assert_parity(*_pair(name, kwargs, reducer=reducer), emb, labels)


# -- MarginLoss: the all-triplets path, DoNothingReducer, random triplets -------------------------
@pytest.mark.parametrize(
    "reducer",
    [
        DivisorReducer(),
        reducers.MeanReducer(),
        reducers.AvgNonZeroReducer(),
        reducers.ThresholdReducer(0.1, 0.4),
    ],
    ids=["divisor", "mean", "avg-non-zero", "threshold"],
)
def test_margin_never_enumerates_all_triplets(
    reducer: reducers.BaseReducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    emb, labels = _batch(seed=17)
    kwargs = {"learn_beta": True, "nu": 0.1, "num_classes": 8}
    theirs = pml_losses.MarginLoss(**kwargs, reducer=_pml_reducer(reducer))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the triplets were enumerated")

    monkeypatch.setattr(margin_module, "all_triplets", refuse)
    _assert_parity(MarginLoss(**kwargs, reducer=reducer), theirs, emb, labels)


def _pml_reducer(reducer: reducers.BaseReducer) -> Any:
    if isinstance(reducer, DivisorReducer):
        return pml_reducers.DivisorReducer()
    if isinstance(reducer, reducers.ThresholdReducer):
        return pml_reducers.ThresholdReducer(low=reducer.low, high=reducer.high)
    return getattr(pml_reducers, type(reducer).__name__)()


def test_margin_do_nothing_reducer_returns_pml_loss_dict() -> None:
    emb, labels = _batch(n_classes=3, per_class=3, seed=19)
    kwargs = {"learn_beta": True, "nu": 0.1, "num_classes": 3}
    ours = MarginLoss(**kwargs, reducer=reducers.DoNothingReducer())(emb, labels)
    theirs = pml_losses.MarginLoss(**kwargs, reducer=pml_reducers.DoNothingReducer())(emb, labels)
    assert set(ours) == set(theirs) == {"margin_loss", "beta_reg_loss"}
    for name in ours:
        torch.testing.assert_close(ours[name]["losses"], theirs[name]["losses"])
        assert ours[name]["reduction_type"] == theirs[name]["reduction_type"]
        assert int(ours[name]["divisor"]) == int(theirs[name]["divisor"])
    for mine, pml in zip(
        ours["margin_loss"]["indices"], theirs["margin_loss"]["indices"], strict=True
    ):
        assert torch.equal(mine, pml)


def test_margin_integer_triplets_per_anchor() -> None:
    emb, labels = _batch(seed=23)
    loss = MarginLoss(triplets_per_anchor=5, reducer=reducers.DoNothingReducer())
    info = loss(emb, labels)["margin_loss"]
    a, p, n = info["indices"]
    assert len(a) == 5 * len(emb)
    assert torch.all(labels[a] == labels[p]) and torch.all(a != p)
    assert torch.all(labels[a] != labels[n])
    d = torch.cdist(F.normalize(emb), F.normalize(emb))
    expected = F.relu(d[a, p] - 1.2 + 0.2) + F.relu(1.2 - d[a, n] + 0.2)
    torch.testing.assert_close(info["losses"], expected)
    value = MarginLoss(triplets_per_anchor=5)(emb, labels)
    assert torch.isfinite(value) and float(value) > 0


def test_margin_beta_is_a_parameter_only_when_learned() -> None:
    assert [n for n, _ in MarginLoss().named_parameters()] == []
    assert "beta" not in MarginLoss().state_dict()
    learned = MarginLoss(learn_beta=True, num_classes=5, beta=0.7)
    assert isinstance(learned.beta, torch.nn.Parameter) and learned.beta.shape == (5,)
    torch.testing.assert_close(learned.beta.detach(), torch.full((5,), 0.7))
    assert MarginLoss(learn_beta=True, num_classes=0).beta.shape == (1,)


def test_margin_per_class_beta_trains() -> None:
    emb, labels = _batch(n_classes=4, per_class=4, seed=29)
    loss = MarginLoss(learn_beta=True, nu=0.1, num_classes=4)
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    before = loss.beta.detach().clone()
    value = loss(emb, labels)
    value.backward()
    opt.step()
    assert loss.beta.grad is not None and torch.all(loss.beta.grad != 0)
    assert not torch.equal(before, loss.beta.detach())


# -- slow loop references ------------------------------------------------------------------------
def _cos(x: Tensor, y: Tensor) -> Tensor:
    return F.normalize(x, dim=0) @ F.normalize(y, dim=0)


def _euclid(x: Tensor, y: Tensor) -> Tensor:
    return torch.sqrt(((F.normalize(x, dim=0) - F.normalize(y, dim=0)) ** 2).sum())


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


def _loop_ranked_list(q: Tensor, r: Tensor, is_pos: Any, is_neg: Any) -> Tensor:
    margin, alpha, tp, tn, imbalance = 0.4, 1.2, 1.0, 2.0, 0.5
    total = q.new_zeros(())
    for i in range(len(q)):
        wp_sum, wn_sum = q.new_zeros(()) + 1e-5 * len(r), q.new_zeros(()) + 1e-5 * len(r)
        lp, ln = q.new_zeros(()), q.new_zeros(())
        for j in range(len(r)):
            d = _euclid(q[i], r[j])
            if is_pos(i, j) and d.item() > alpha - margin:
                w = torch.exp(tp * (d - (alpha - margin)))
                wp_sum, lp = wp_sum + w, lp + w * (d - (alpha - margin))
            if is_neg(i, j) and 0 < d.item() < alpha:
                w = torch.exp(tn * (alpha - d))
                wn_sum, ln = wn_sum + w, ln + w * (alpha - d)
        total = total + (1 - imbalance) * lp / wp_sum + imbalance * ln / wn_sum
    return total / len(q)


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


def _assert_matches_loop(
    loss: Any,
    loop: Callable[..., Tensor],
    q: Tensor,
    r: Tensor | None,
    rules: tuple[Any, Any],
    *args: Any,
    **kwargs: Any,
) -> None:
    value, grad = value_and_grad(loss, q, *args, **kwargs)
    q_ref = q.detach().clone().requires_grad_(True)
    expected = loop(q_ref, q_ref if r is None else r, *rules)
    expected.backward()
    assert value == pytest.approx(float(expected.detach()), rel=1e-9)
    torch.testing.assert_close(grad, q_ref.grad, rtol=1e-7, atol=1e-9)


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


def _pairs_rule(rows: Tensor, cols: Tensor) -> Callable[[int, int], bool]:
    pairs = set(zip(rows.tolist(), cols.tolist(), strict=True))
    return lambda i, j: (i, j) in pairs


def test_ranked_list_miner_pairs_against_loop_reference() -> None:
    """PML refuses a miner's tuple here; the pairs restrict the positive and negative sets."""
    emb, labels = _batch(n_classes=3, per_class=4, dim=5, seed=41)
    triplets, pairs = _miner_tuples(labels, seed=41)
    for tup in (triplets, pairs):
        a1, p, a2, n = tup if len(tup) == 4 else (tup[0], tup[1], tup[0], tup[2])
        rules = (_pairs_rule(a1, p), _pairs_rule(a2, n))
        loss = RankedListLoss(margin=0.4, Tn=2, Tp=1)
        _assert_matches_loop(loss, _loop_ranked_list, emb, None, rules, labels, indices_tuple=tup)
        _assert_matches_loop(loss, _loop_ranked_list, emb, None, rules, None, indices_tuple=tup)


# -- closed-form tiny cases ----------------------------------------------------------------------
def test_multi_similarity_closed_form() -> None:
    # unit vectors at known angles: s(0,1) = cos 60° = 0.5 (positive), s(0,2) = cos 90° = 0
    emb = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    loss = MultiSimilarityLoss(alpha=2, beta=10, base=0.5)(emb, labels)
    s12 = math.sqrt(3) / 2
    row0 = math.log(1 + 1) / 2 + math.log(1 + math.exp(10 * (0 - 0.5))) / 10
    row1 = math.log(1 + 1) / 2 + math.log(1 + math.exp(10 * (s12 - 0.5))) / 10
    row2 = math.log(1 + math.exp(10 * (0 - 0.5)) + math.exp(10 * (s12 - 0.5))) / 10  # no positive
    assert float(loss) == pytest.approx((row0 + row1 + row2) / 3, rel=1e-12)


def test_margin_closed_form() -> None:
    # 1-D points (not normalised): anchors 0/1 of class 0 at 0 and 1, the negative at 3
    emb = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    loss = MarginLoss(
        margin=0.5, beta=1.0, distance=distances.LpDistance(normalize_embeddings=False)
    )
    # triplets (0,1,2): pos relu(1-1+0.5)=0.5, neg relu(1-3+0.5)=0; (1,0,2): 0.5 and relu(1-2+0.5)=0
    assert float(loss(emb, labels)) == pytest.approx((0.5 + 0.5) / 2)


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
