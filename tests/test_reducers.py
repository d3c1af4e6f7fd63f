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


def test_result_stays_connected_and_in_float32() -> None:
    """Losses that do not depend on the embeddings (constants, a detached value) still give a
    result connected to them, with a zero gradient; half-precision losses sum in float32."""
    emb = torch.randn(5, 3, requires_grad=True)
    constant: reducers.LossDict = {
        "a": {"losses": torch.tensor([1.0, 2.0]), "indices": None, "reduction_type": "element"},
        "b": {"losses": 0.0, "indices": None, "reduction_type": "already_reduced"},
    }
    for reducer in (reducers.MeanReducer(), reducers.MultipleReducers({})):
        value = reducer(constant, emb)
        assert value.requires_grad and float(value) == 1.5
        value.backward()
        assert emb.grad is not None and torch.all(emb.grad == 0)
        emb.grad = None
    half = (emb.half() * 2).sum(dim=1)
    value = reducers.SumReducer()(_dict(half), emb)
    assert value.dtype == torch.float32
    value.backward()
    assert emb.grad is not None and torch.allclose(emb.grad, torch.full_like(emb, 2.0))
    assert reducers.MeanReducer()({}, emb).requires_grad


def test_a_connected_loss_is_returned_without_an_extra_graph_branch() -> None:
    """When the losses already depend on the embeddings, the reducer adds no zero term of its
    own: the result's graph reaches the embeddings only through the losses (a zero term's
    backward would fill and add a whole (B, D) gradient for nothing)."""
    emb = torch.randn(6, 4, requires_grad=True)
    value = reducers.MeanReducer()(_dict(emb.pow(2).sum(dim=1)), emb)

    def reaches_leaf_directly(fn: object, seen: set[int]) -> int:
        if fn is None or id(fn) in seen:
            return 0
        seen.add(id(fn))
        paths = 0
        for nxt, _ in fn.next_functions:  # type: ignore[attr-defined]
            if type(nxt).__name__ == "AccumulateGrad":
                paths += 1
            else:
                paths += reaches_leaf_directly(nxt, seen)
        return paths

    assert reaches_leaf_directly(value.grad_fn, set()) == 1
    value.backward()
    assert torch.allclose(emb.grad, 2 * emb.detach() / 6)
