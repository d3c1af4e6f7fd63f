"""Reducers against direct computation and PML; never NaN on empty input."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import reducers as pml_reducers

from deepmetric import reducers


def _dict(losses: torch.Tensor, kind: str = "element") -> reducers.LossDict:
    indices = torch.arange(len(losses))
    return {"loss": {"losses": losses, "indices": indices, "reduction_type": kind}}


LOSSES = torch.tensor([0.0, 0.5, 2.0, 0.0, 3.5, 1.0], dtype=torch.float64)


@pytest.mark.parametrize(
    ("ours", "theirs", "expected"),
    [
        (reducers.MeanReducer(), pml_reducers.MeanReducer(), 7.0 / 6),
        (reducers.SumReducer(), pml_reducers.SumReducer(), 7.0),
        (reducers.AvgNonZeroReducer(), pml_reducers.AvgNonZeroReducer(), 7.0 / 4),
        (reducers.ThresholdReducer(low=0.6), pml_reducers.ThresholdReducer(low=0.6), 6.5 / 3),
        (reducers.ThresholdReducer(high=2.0), pml_reducers.ThresholdReducer(high=2.0), 1.5 / 4),
        (reducers.ThresholdReducer(0.1, 3.0), pml_reducers.ThresholdReducer(0.1, 3.0), 3.5 / 3),
    ],
)
def test_reducers_match_closed_form_and_pml(
    ours: reducers.BaseReducer, theirs: torch.nn.Module, expected: float
) -> None:
    emb = torch.zeros(6, 2, dtype=torch.float64)
    value = ours(_dict(LOSSES), emb, None)
    assert float(value) == pytest.approx(expected)
    assert float(value) == pytest.approx(float(theirs(_dict(LOSSES), emb, None)))


@pytest.mark.parametrize(
    "reducer",
    [
        reducers.MeanReducer(),
        reducers.SumReducer(),
        reducers.AvgNonZeroReducer(),
        reducers.ThresholdReducer(low=10.0),
    ],
)
def test_empty_or_all_filtered_is_zero_with_zero_gradient(reducer: reducers.BaseReducer) -> None:
    emb = torch.randn(4, 3, requires_grad=True)
    for losses in [emb.sum() * torch.zeros(0), (emb * 0).sum(dim=1)]:
        value = reducer(_dict(losses), emb, None)
        value.backward()
        assert float(value) == 0.0
        assert emb.grad is not None and torch.all(emb.grad == 0)
        emb.grad = None


def test_already_reduced_and_multiple_terms_are_summed() -> None:
    emb = torch.zeros(3, 2)
    loss_dict: reducers.LossDict = {
        "a": {"losses": torch.tensor([1.0, 3.0]), "indices": None, "reduction_type": "pos_pair"},
        "b": {"losses": torch.tensor(5.0), "indices": None, "reduction_type": "already_reduced"},
        "c": {"losses": 0.0, "indices": None, "reduction_type": "already_reduced"},
    }
    assert float(reducers.MeanReducer()(loss_dict, emb)) == 7.0
    multi = reducers.MultipleReducers({"a": reducers.SumReducer()})
    assert float(multi(loss_dict, emb)) == 9.0
    assert reducers.DoNothingReducer()(loss_dict, emb) is loss_dict


def test_threshold_reducer_needs_a_bound() -> None:
    with pytest.raises(ValueError, match="low or high"):
        reducers.ThresholdReducer()
