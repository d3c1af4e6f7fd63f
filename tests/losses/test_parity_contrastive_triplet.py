"""ContrastiveLoss and TripletMarginLoss over the same cases: PML parity (distances, reducers,
miner tuples, reference sets), empty positives or negatives, bad input and random batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers

from deepmetric import distances, losses, pairwise, reducers
from tests.losses.contrastive_triplet_cases import _batch
from tests.parity import assert_same_loss, value_and_grad

CASES = [
    ("ContrastiveLoss", {}),
    ("ContrastiveLoss", {"pos_margin": 0.2, "neg_margin": 1.5}),
    ("TripletMarginLoss", {}),
    ("TripletMarginLoss", {"margin": 0.4}),
    ("TripletMarginLoss", {"margin": 0.3, "swap": True}),
    ("TripletMarginLoss", {"smooth_loss": True}),
]


@pytest.mark.parametrize(("name", "kwargs"), CASES)
@pytest.mark.parametrize("per_class", [2, 4])
def test_parity_with_pml(name: str, kwargs: dict, per_class: int) -> None:
    emb, labels = _batch(per_class=per_class)
    assert_same_loss(
        getattr(losses, name)(**kwargs), getattr(pml_losses, name)(**kwargs), emb, labels
    )


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_parity_with_cosine_similarity_and_float32(name: str, kwargs: dict) -> None:
    emb, labels = _batch(seed=3)
    margin_kwargs = dict(kwargs)
    if name == "ContrastiveLoss":  # similarities: the positive margin is the high one
        margin_kwargs = {"pos_margin": 0.9, "neg_margin": 0.2}
    ours = getattr(losses, name)(distance=distances.CosineSimilarity(), **margin_kwargs)
    theirs = getattr(pml_losses, name)(distance=pml_distances.CosineSimilarity(), **margin_kwargs)
    assert_same_loss(ours, theirs, emb, labels)
    assert_same_loss(ours, theirs, emb.float(), labels, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_parity_with_miner_tuples(name: str, kwargs: dict) -> None:
    emb, labels = _batch(seed=5)
    g = torch.Generator().manual_seed(0)
    a, p, n = pairwise.all_triplets(*pairwise.label_masks(labels, labels, same_source=True))
    pick = torch.randperm(len(a), generator=g)[:60]
    triplets = (a[pick], p[pick], n[pick])
    pos = torch.where(labels[:, None] == labels[None, :])
    keep = pos[0] != pos[1]
    a1, p1 = pos[0][keep][:20], pos[1][keep][:20]
    a2, n2 = torch.where(labels[:, None] != labels[None, :])
    pairs = (a1, p1, a2[::7], n2[::7])
    for tup in (triplets, pairs):
        ours, theirs = getattr(losses, name)(**kwargs), getattr(pml_losses, name)(**kwargs)
        assert_same_loss(ours, theirs, emb, labels, indices_tuple=tup)
        assert_same_loss(ours, theirs, emb, None, indices_tuple=tup)


@pytest.mark.parametrize(("name", "kwargs"), [c for c in CASES if not c[1].get("swap")])
def test_parity_with_ref_emb(name: str, kwargs: dict) -> None:
    emb, labels = _batch(n_classes=5, per_class=3, seed=7)
    ref, ref_labels = _batch(n_classes=5, per_class=4, seed=8)
    ours, theirs = getattr(losses, name)(**kwargs), getattr(pml_losses, name)(**kwargs)
    assert_same_loss(ours, theirs, emb, labels, ref_emb=ref, ref_labels=ref_labels)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (reducers.MeanReducer(), pml_reducers.MeanReducer()),
        (reducers.SumReducer(), pml_reducers.SumReducer()),
        (reducers.ThresholdReducer(low=0.02, high=0.3), pml_reducers.ThresholdReducer(0.02, 0.3)),
    ],
)
@pytest.mark.parametrize("name", ["ContrastiveLoss", "TripletMarginLoss"])
def test_parity_with_other_reducers(ours: reducers.BaseReducer, theirs, name: str) -> None:
    emb, labels = _batch(seed=9)
    assert_same_loss(
        getattr(losses, name)(reducer=ours), getattr(pml_losses, name)(reducer=theirs), emb, labels
    )


@pytest.mark.parametrize("name", ["ContrastiveLoss", "TripletMarginLoss"])
@pytest.mark.parametrize(
    "labels",
    [torch.zeros(6, dtype=torch.long), torch.arange(6), torch.tensor([0])],
    ids=["one-class", "all-distinct", "single"],
)
def test_no_positive_or_no_negative_gives_zero_loss_and_gradient(name: str, labels) -> None:
    emb = torch.randn(len(labels), 4, requires_grad=True)
    loss = getattr(losses, name)()(emb, labels)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    if name == "ContrastiveLoss" and len(labels) == 6:
        # its positive and negative terms are independent: a one-class batch still pulls its
        # positives together, an all-distinct batch still pushes negatives apart (as in PML)
        expected = pml_losses.ContrastiveLoss()(emb.detach(), labels)
        assert float(loss.detach()) == pytest.approx(float(expected))
    else:
        assert float(loss) == 0.0
        assert torch.all(emb.grad == 0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(4, 3), torch.tensor([0, 1, 0])), "3 entries but there are 4"),
        ((torch.randn(4), torch.tensor([0, 1, 0, 1])), "2-D"),
        ((torch.tensor([[float("nan")], [1.0]]), torch.tensor([0, 1])), "NaN"),
        ((torch.tensor([[float("inf")], [1.0]]), torch.tensor([0, 1])), "NaN or Inf"),
        ((torch.randn(2, 3), torch.tensor([0.0, 1.0])), "integer dtype"),
        ((torch.randn(2, 3), torch.tensor([[0], [1]])), "1-D"),
        ((torch.randn(2, 3), None), "labels are required"),
    ],
)
@pytest.mark.parametrize("name", ["ContrastiveLoss", "TripletMarginLoss"])
def test_bad_input_is_a_value_error(args, match: str, name: str) -> None:
    with pytest.raises(ValueError, match=match):
        getattr(losses, name)()(*args)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 64),
    n_classes=st.integers(1, 64),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    duplicates=st.booleans(),
    name=st.sampled_from(["ContrastiveLoss", "TripletMarginLoss"]),
    swap=st.booleans(),
)
def test_random_batches_give_finite_value_and_gradient(
    n: int, n_classes: int, scale: float, duplicates: bool, name: str, swap: bool
) -> None:
    g = torch.Generator().manual_seed(n * 131 + n_classes)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    emb = torch.randn(n, 8, generator=g) * scale
    if duplicates:
        emb[n // 2 :] = emb[: n - n // 2].clone()
    kwargs = {"swap": swap} if name == "TripletMarginLoss" else {}
    for distance in [distances.LpDistance(), distances.LpDistance(normalize_embeddings=False)]:
        value, grad = value_and_grad(
            getattr(losses, name)(distance=distance, **kwargs), emb, labels
        )
        assert torch.isfinite(torch.tensor(value)) and torch.isfinite(grad).all()
