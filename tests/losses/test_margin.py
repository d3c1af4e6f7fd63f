"""MarginLoss (:mod:`deepmetric.losses.margin`): parity of beta's gradient with other reducers,
the non-enumerating all-triplets path, per-triplet losses, triplets_per_anchor, beta as a
parameter, and a closed form."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers

import deepmetric.pairwise.triplets as margin_module
from deepmetric import distances, reducers
from deepmetric.losses.margin import DivisorReducer, MarginLoss
from tests.losses.ms_circle_margin_ranked_cases import (
    _assert_parity,
    _batch,
    _pair,
)


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


def test_margin_closed_form() -> None:
    # 1-D points (not normalised): anchors 0/1 of class 0 at 0 and 1, the negative at 3
    emb = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    loss = MarginLoss(
        margin=0.5, beta=1.0, distance=distances.LpDistance(normalize_embeddings=False)
    )
    # triplets (0,1,2): pos relu(1-1+0.5)=0.5, neg relu(1-3+0.5)=0; (1,0,2): 0.5 and relu(1-2+0.5)=0
    assert float(loss(emb, labels)) == pytest.approx((0.5 + 0.5) / 2)
