"""NCALoss: a loop over Goldberger et al.'s formula, PML parity (scales, distances, miner tuples,
reference sets, reducers, half precision), queries left out, and a batch too small to learn
from."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from torch import Tensor

from deepmetric import distances, reducers
from deepmetric.losses import NCALoss
from tests.losses.ms_circle_margin_ranked_cases import _batch, _miner_tuples
from tests.parity import assert_same_loss, value_and_grad


def _loop_nca(
    queries: Tensor,
    labels: Tensor,
    scale: float = 1.0,
    refs: Tensor | None = None,
    ref_labels: Tensor | None = None,
    own: list[int] | None = None,
) -> Tensor:
    """For each query, -log Σ_{j same label} p_ij with p_ij ∝ exp(-scale · |x_i - r_j|²) over
    the references (unit vectors; the queries themselves by default), query ``i`` leaving out
    reference ``own[i]`` (itself by default; -1 for none); the mean over the queries that have
    a reference of their label."""
    if refs is None or ref_labels is None:
        refs, ref_labels, own = queries, labels, list(range(len(queries)))
    own = own if own is not None else [-1] * len(queries)
    q, r = F.normalize(queries, dim=1), F.normalize(refs, dim=1)
    losses = []
    for i in range(len(q)):
        cols = [j for j in range(len(r)) if j != own[i]]
        if not any(ref_labels[j] == labels[i] for j in cols):
            continue
        logits = torch.stack([-scale * ((q[i] - r[j]) ** 2).sum() for j in cols])
        probs = torch.softmax(logits, dim=0)
        same = [probs[k] for k, j in enumerate(cols) if ref_labels[j] == labels[i]]
        losses.append(-torch.log(torch.stack(same).sum()))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("scale", [0.5, 1.0, 8.0])
def test_matches_a_loop_over_the_formula(scale: float) -> None:
    emb, _ = _batch(n_classes=4, per_class=3, dim=6, seed=4)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 7])  # the last query is left out
    loop = lambda e, y: _loop_nca(e, y, scale)  # noqa: E731
    assert_same_loss(NCALoss(softmax_scale=scale), loop, emb, labels, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 4.0, 32.0])
@pytest.mark.parametrize("per_class", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_with_pml(scale: float, per_class: int, dtype: torch.dtype) -> None:
    emb, labels = _batch(per_class=per_class, seed=per_class)
    tolerances = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    assert_same_loss(
        NCALoss(softmax_scale=scale),
        pml_losses.NCALoss(softmax_scale=scale),
        emb.to(dtype),
        labels,
        **tolerances,
    )


DISTANCES: list[tuple[Any, Any]] = [
    (distances.LpDistance(), pml_distances.LpDistance()),
    (distances.CosineSimilarity(), pml_distances.CosineSimilarity()),
    (distances.LpDistance(p=1, power=2), pml_distances.LpDistance(p=1, power=2)),
]


@pytest.mark.parametrize(("ours", "theirs"), DISTANCES, ids=["euclidean", "cosine", "l1-squared"])
def test_parity_with_other_distances(ours: Any, theirs: Any) -> None:
    emb, labels = _batch(seed=3)
    assert_same_loss(
        NCALoss(softmax_scale=3, distance=ours),
        pml_losses.NCALoss(softmax_scale=3, distance=theirs),
        emb,
        labels,
    )


def test_parity_with_miner_tuples_and_a_reference_set() -> None:
    emb, labels = _batch(seed=5)
    for tup in _miner_tuples(labels, seed=5):  # each query weighted by its appearances
        assert_same_loss(NCALoss(), pml_losses.NCALoss(), emb, labels, indices_tuple=tup)
    queries, query_labels = _batch(n_classes=8, per_class=3, seed=7)
    ref, ref_labels = _batch(n_classes=6, per_class=4, seed=8)  # classes 6, 7: no reference
    assert_same_loss(
        NCALoss(), pml_losses.NCALoss(), queries, query_labels, ref_emb=ref, ref_labels=ref_labels
    )
    anchors_only = (torch.tensor([0, 0, 5]), torch.tensor([1, 2, 3]), torch.tensor([9, 9, 9]))
    assert_same_loss(
        NCALoss(),
        pml_losses.NCALoss(),
        queries,
        query_labels,
        indices_tuple=anchors_only,
        ref_emb=ref,
        ref_labels=ref_labels,
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (reducers.SumReducer(), pml_reducers.SumReducer()),
        (reducers.AvgNonZeroReducer(), pml_reducers.AvgNonZeroReducer()),
    ],
    ids=["sum", "avg-non-zero"],
)
def test_parity_with_other_reducers(ours: Any, theirs: Any) -> None:
    emb, labels = _batch(seed=9)
    assert_same_loss(NCALoss(reducer=ours), pml_losses.NCALoss(reducer=theirs), emb, labels)


def test_an_underflowing_probability_leaves_its_query_out_as_in_pml() -> None:
    """At a large scale a query far from every sample of its label has probability exactly 0
    in PML's softmax: PML leaves it out, and so does deepmetric (no infinite loss)."""
    emb = torch.tensor(
        [[1.0, 0.0], [-1.0, 0.0], [0.99, 0.14], [0.98, 0.2], [-0.99, 0.14], [-0.98, 0.2]],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # the two 0s are far apart, each near a pair
    assert_same_loss(NCALoss(softmax_scale=400), pml_losses.NCALoss(softmax_scale=400), emb, labels)
    value, _ = value_and_grad(NCALoss(softmax_scale=400), emb, labels)
    assert 0 < value < float("inf")
    # every query left out: PML's mean of nothing is NaN, deepmetric's loss is 0
    crossed = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.9, 0.1], [-0.9, 0.1]])
    labels = torch.tensor([0, 0, 1, 1])  # each sample's neighbour has the other label
    value, grad = value_and_grad(NCALoss(softmax_scale=400), crossed, labels)
    theirs, _ = value_and_grad(pml_losses.NCALoss(softmax_scale=400), crossed, labels)
    assert value == 0.0 and torch.count_nonzero(grad) == 0 and theirs != theirs


def test_one_sample_or_no_pair_gives_zero_and_zero_gradient() -> None:
    emb, _ = _batch(n_classes=4, per_class=3, seed=2)
    for x, labels in ((emb[:1], torch.tensor([0])), (emb, torch.arange(12))):
        value, grad = value_and_grad(NCALoss(), x, labels)
        assert value == 0.0
        assert torch.count_nonzero(grad) == 0


def test_labels_are_required() -> None:
    emb, labels = _batch()
    tup = _miner_tuples(labels, seed=1)[0]
    with pytest.raises(ValueError, match="labels are required"):
        NCALoss()(emb, None, tup)


def test_in_a_cross_batch_memory_a_query_never_meets_its_own_copy() -> None:
    from deepmetric.losses import CrossBatchMemory

    g = torch.Generator().manual_seed(6)
    first, second = (torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    memory = CrossBatchMemory(NCALoss(), embedding_size=4, memory_size=16).double()
    # the first batch alone: the queue holds the batch, as NCALoss without a reference set
    torch.testing.assert_close(memory(first, labels), NCALoss()(first, labels))
    # the second: the queue holds both batches; each query leaves out its own new copy
    refs, ref_labels = torch.cat([first, second]), torch.cat([labels, labels])
    expected = _loop_nca(second, labels, 1.0, refs, ref_labels, own=list(range(8, 16)))
    torch.testing.assert_close(memory(second, labels), expected)
