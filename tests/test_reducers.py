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


# -- streams: a loss reduced block by block ------------------------------------------------------


@pytest.mark.parametrize(
    "reducer",
    [
        reducers.MeanReducer(),
        reducers.SumReducer(),
        reducers.AvgNonZeroReducer(),
        reducers.ThresholdReducer(0.4, 3.0),
    ],
)
def test_a_stream_of_blocks_reduces_like_the_whole_tensor(reducer: reducers.BaseReducer) -> None:
    """Blocks with masks and integer counts, added to a stream, reduce to the value and gradient
    of the whole tensor of the losses they stand for (each masked entry once, each counted
    entry that many times)."""
    emb = torch.zeros(2, 2, dtype=torch.float64)
    losses = torch.rand(30, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4
    losses[::5] = 0.0
    losses.requires_grad_(True)
    mask = torch.rand(30, generator=torch.Generator().manual_seed(4)) < 0.6
    counts = torch.arange(30) % 3
    # the whole tensor: the first block's masked entries, then the second's repeated
    whole = torch.cat([losses[:15][mask[:15]], losses[15:].repeat_interleave(counts[15:])])
    expected = reducer(_dict(whole), emb)
    (expected_grad,) = torch.autograd.grad(expected, losses)

    stream = reducer.stream("loss", emb)
    assert stream is not None
    stream.add_losses(losses[:15], mask[:15])
    stream.add_losses(losses[15:], counts=counts[15:])
    got = reducer({"loss": stream}, emb)
    (got_grad,) = torch.autograd.grad(got, losses)
    assert float(got) == pytest.approx(float(expected), rel=1e-12)
    torch.testing.assert_close(got_grad, expected_grad)


def test_reducers_that_reduce_whole_tensors_give_no_stream() -> None:
    """A reducer with its own whole-tensor rule (one that overrides ``reduce``, or
    DoNothingReducer) is never handed a stream, whose rule would be its parent's."""

    class Median(reducers.MeanReducer):
        def reduce(self, losses: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
            return losses.median()

    emb = torch.zeros(1, 1)
    assert Median().stream("loss", emb) is None
    assert reducers.DoNothingReducer().stream("loss", emb) is None
    multi = reducers.MultipleReducers({"a": Median()}, default_reducer=reducers.SumReducer())
    assert multi.stream("a", emb) is None
    assert multi.stream("b", emb) is not None


class _AboveTenthOverCountPlusOne(reducers.SelectingReducer):
    """A custom reducer written against the public interface: the losses above 0.1, summed and
    divided by their number plus one."""

    def select(self, losses: torch.Tensor) -> torch.Tensor:
        return losses > 0.1

    def divisor(self, n_selected: torch.Tensor, n_total: torch.Tensor) -> torch.Tensor:
        return n_selected + 1


class _PMLAboveTenthOverCountPlusOne(pml_reducers.BaseReducer):
    """The same rule written as a PML reducer (for every reduction type)."""

    def element_reduction(self, losses, loss_indices, embeddings, labels):  # type: ignore[no-untyped-def]
        keep = losses > 0.1
        return losses[keep].sum() / (keep.sum() + 1)

    pos_pair_reduction = neg_pair_reduction = triplet_reduction = element_reduction


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("TripletMarginLoss", {"margin": 0.3}),
        ("TripletMarginLoss", {"margin": 0.3, "swap": True}),
        ("ContrastiveLoss", {"neg_margin": 1.3}),
        ("MarginLoss", {"margin": 0.3}),
    ],
)
def test_a_custom_reducer_on_the_streamed_paths_matches_pml(name: str, kwargs: dict) -> None:
    """A SelectingReducer subclass of the user's reduces the losses that the fast paths never
    list (all triplets streamed, the pair matrix read a block of rows at a time, triplets
    counted per pair) exactly as PML reduces the listed losses with the same rule."""
    from pytorch_metric_learning import losses as pml_losses

    from deepmetric import losses
    from tests.parity import assert_same_loss, pk_labels

    emb = torch.randn(24, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    labels = pk_labels(6, 4)
    ours = getattr(losses, name)(reducer=_AboveTenthOverCountPlusOne(), **kwargs)
    theirs = getattr(pml_losses, name)(reducer=_PMLAboveTenthOverCountPlusOne(), **kwargs)
    assert ours.reducer.stream("loss", emb) is not None  # (the streamed path is taken)
    assert_same_loss(ours, theirs, emb, labels, rtol=1e-10, atol=1e-12)


def test_a_custom_whole_tensor_reducer_matches_pml() -> None:
    """A reducer with its own ``reduce`` (no stream) gets every loss at once, as in PML."""
    from pytorch_metric_learning import losses as pml_losses

    from deepmetric import losses
    from tests.parity import assert_same_loss, pk_labels

    class Largest(reducers.BaseReducer):
        def reduce(self, losses_: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
            return losses_.max()

    class PMLLargest(pml_reducers.BaseReducer):
        def element_reduction(self, losses_, loss_indices, embeddings, labels):  # type: ignore[no-untyped-def]
            return losses_.max()

        pos_pair_reduction = neg_pair_reduction = triplet_reduction = element_reduction

    emb = torch.randn(20, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    labels = pk_labels(5, 4)
    for name in ("TripletMarginLoss", "ContrastiveLoss"):
        ours = getattr(losses, name)(reducer=Largest())
        theirs = getattr(pml_losses, name)(reducer=PMLLargest())
        assert_same_loss(ours, theirs, emb, labels, rtol=1e-10, atol=1e-12)
