"""ContrastiveLoss and TripletMarginLoss: PML parity, loop references, the streamed all-triplets
path, edge cases and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers

from deepmetric import distances, losses, miners, pairwise, reducers, regularizers
from tests.parity import assert_same_loss, pk_labels, value_and_grad

CASES = [
    ("ContrastiveLoss", {}),
    ("ContrastiveLoss", {"pos_margin": 0.2, "neg_margin": 1.5}),
    ("TripletMarginLoss", {}),
    ("TripletMarginLoss", {"margin": 0.4}),
    ("TripletMarginLoss", {"margin": 0.3, "swap": True}),
    ("TripletMarginLoss", {"smooth_loss": True}),
]


def _batch(n_classes: int = 8, per_class: int = 4, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_classes * per_class, dim, generator=g, dtype=torch.float64), pk_labels(
        n_classes, per_class
    )


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


def test_parity_with_embedding_regularizer() -> None:
    emb, labels = _batch(seed=11)
    emb = emb * 3
    ours = losses.TripletMarginLoss(
        embedding_regularizer=regularizers.LpRegularizer(), embedding_reg_weight=0.1
    )
    theirs = pml_losses.TripletMarginLoss(
        embedding_regularizer=pml_regularizers.LpRegularizer(), embedding_reg_weight=0.1
    )
    assert_same_loss(ours, theirs, emb, labels)


def _loop_triplet(emb, labels, margin, swap=False):
    d = torch.cdist(emb, emb)
    total, count = 0.0, 0
    for a, p, n in itertools.product(range(len(emb)), repeat=3):
        if a == p or labels[a] != labels[p] or labels[a] == labels[n]:
            continue
        an = min(d[a, n], d[p, n]) if swap else d[a, n]
        loss = max(0.0, float(d[a, p] - an + margin))
        if loss > 0:
            total, count = total + loss, count + 1
    return total / max(count, 1)


@pytest.mark.parametrize("swap", [False, True])
def test_triplet_against_loop(swap: bool) -> None:
    emb, labels = _batch(n_classes=4, per_class=3, dim=3, seed=13)
    loss = losses.TripletMarginLoss(
        margin=0.5, swap=swap, distance=distances.LpDistance(normalize_embeddings=False)
    )
    assert float(loss(emb, labels)) == pytest.approx(_loop_triplet(emb, labels, 0.5, swap))


def test_contrastive_against_loop() -> None:
    emb, labels = _batch(n_classes=3, per_class=3, dim=4, seed=17)
    d = torch.cdist(emb, emb)
    pos = [float(d[i, j]) for i in range(9) for j in range(9) if i != j and labels[i] == labels[j]]
    neg = [
        max(0.0, 1.5 - float(d[i, j])) for i in range(9) for j in range(9) if labels[i] != labels[j]
    ]
    neg_nonzero = [x for x in neg if x > 0]
    expected = sum(pos) / len(pos) + sum(neg_nonzero) / len(neg_nonzero)
    loss = losses.ContrastiveLoss(
        neg_margin=1.5, distance=distances.LpDistance(normalize_embeddings=False)
    )
    assert float(loss(emb, labels)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "reducer",
    [
        reducers.AvgNonZeroReducer(),
        reducers.MeanReducer(),
        reducers.SumReducer(),
        reducers.ThresholdReducer(0.01, 0.2),
    ],
)
@pytest.mark.parametrize("kwargs", [{}, {"swap": True}, {"smooth_loss": True}])
@pytest.mark.parametrize("use_ref", [False, True])
def test_streamed_path_equals_explicit_triplets(reducer, kwargs: dict, use_ref: bool) -> None:
    """The chunked closed-form gradient equals autograd through explicit triplets."""
    emb, labels = _batch(n_classes=6, per_class=4, seed=19)
    ref_kwargs = {}
    if use_ref:
        ref, ref_labels = _batch(n_classes=6, per_class=3, seed=20)
        ref_kwargs = {"ref_emb": ref, "ref_labels": ref_labels}
    streamed = losses.TripletMarginLoss(margin=0.2, reducer=reducer, **kwargs)

    class Explicit(reducers.ThresholdReducer):
        """The same rule, but with its own ``reduce`` so the loss takes the explicit path."""

        def reduce(self, losses_, embeddings):
            return reducer.reduce(losses_, embeddings)

    explicit = losses.TripletMarginLoss(margin=0.2, reducer=Explicit(low=0), **kwargs)
    v1, g1 = value_and_grad(streamed, emb, labels, **ref_kwargs)
    v2, g2 = value_and_grad(explicit, emb, labels, **ref_kwargs)
    assert v1 == pytest.approx(v2, rel=1e-10)
    torch.testing.assert_close(g1, g2)


def test_streamed_path_with_tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    emb, labels = _batch(seed=23)
    expected = value_and_grad(losses.TripletMarginLoss(margin=0.3), emb, labels)
    import deepmetric._pairs as pairs

    monkeypatch.setattr(pairs, "CHUNK_ELEMENTS", 1)
    original = pairs.positive_pair_chunks
    monkeypatch.setattr(
        pairwise.triplets, "positive_pair_chunks", lambda m, r, max_elements=1: original(m, r, 1)
    )
    got = value_and_grad(losses.TripletMarginLoss(margin=0.3), emb, labels)
    assert got[0] == pytest.approx(expected[0], rel=1e-12)
    torch.testing.assert_close(got[1], expected[1])


def test_do_nothing_reducer_returns_per_triplet_losses() -> None:
    emb, labels = _batch(n_classes=3, per_class=2, seed=29)
    out = losses.TripletMarginLoss(reducer=reducers.DoNothingReducer())(emb, labels)
    theirs = pml_losses.TripletMarginLoss(reducer=pml_reducers.DoNothingReducer())(emb, labels)
    torch.testing.assert_close(out["loss"]["losses"], theirs["loss"]["losses"])
    for ours_idx, their_idx in zip(out["loss"]["indices"], theirs["loss"]["indices"], strict=True):
        assert torch.equal(ours_idx, their_idx)


def test_triplets_per_anchor_samples_that_many() -> None:
    emb, labels = _batch(seed=31)
    loss = losses.TripletMarginLoss(
        margin=10.0, triplets_per_anchor=5, reducer=reducers.DoNothingReducer()
    )
    a, p, n = loss(emb, labels)["loss"]["indices"]
    assert len(a) == 5 * len(emb)
    assert torch.all(labels[a] == labels[p]) and torch.all(a != p)
    assert torch.all(labels[a] != labels[n])


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


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_any_integer_label_dtype(dtype: torch.dtype) -> None:
    emb, labels = _batch(seed=37)
    expected = float(losses.TripletMarginLoss()(emb, labels))
    assert float(losses.TripletMarginLoss()(emb, labels.to(dtype))) == pytest.approx(expected)


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


def test_bad_ref_and_indices_are_value_errors() -> None:
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    loss = losses.TripletMarginLoss()
    with pytest.raises(ValueError, match="dimension"):
        loss(emb, labels, ref_emb=torch.randn(4, 2), ref_labels=labels)
    with pytest.raises(ValueError, match="ref_labels are required"):
        loss(emb, labels, ref_emb=torch.randn(4, 3))
    with pytest.raises(ValueError, match="outside"):
        loss(emb, labels, indices_tuple=(torch.tensor([0]), torch.tensor([1]), torch.tensor([9])))
    with pytest.raises(ValueError, match="3 .* or 4"):
        loss(emb, labels, indices_tuple=(torch.tensor([0]), torch.tensor([1])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="device|on cuda|on cpu"):
        losses.TripletMarginLoss()(torch.randn(4, 3, device="cuda"), torch.tensor([0, 0, 1, 1]))


def test_half_precision_embeddings_train() -> None:
    emb, labels = _batch(seed=41)
    half = emb.to(torch.bfloat16).requires_grad_(True)
    loss = losses.TripletMarginLoss(margin=0.2)(half, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert half.grad is not None and torch.isfinite(half.grad.float()).all()
    assert float(loss) == pytest.approx(
        float(losses.TripletMarginLoss(margin=0.2)(half.detach().float(), labels))
    )


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


@pytest.mark.parametrize("reducer", ["avg-non-zero", "mean", "sum", "threshold"])
@pytest.mark.parametrize("smooth_loss", [False, True])
@pytest.mark.parametrize("cosine", [False, True])
def test_triplet_streams_a_miners_many_triplets_in_chunks(
    reducer: str, smooth_loss: bool, cosine: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many listed triplets (a repeated one among them), 7 at a time, against the per-triplet
    losses computed through autograd and reduced by hand."""
    from deepmetric.pairwise import triplets as triplet

    monkeypatch.setattr(triplet, "_TRIPLET_CHUNK", 7)
    emb, labels = _batch(n_classes=4, per_class=3, dim=5, seed=19)
    same = labels[:, None] == labels[None]
    self_pair = torch.eye(12, dtype=torch.bool)[..., None]
    a, p, n = torch.where(same[:, :, None] & ~same[:, None, :] & ~self_pair)
    a, p, n = (torch.cat([x, x[:1]]) for x in (a, p, n))
    distance = distances.CosineSimilarity() if cosine else distances.LpDistance()

    def per_triplet_losses(e: torch.Tensor) -> torch.Tensor:
        mat = distance(e)
        violation = (mat[a, n] - mat[a, p] if cosine else mat[a, p] - mat[a, n]) + 0.2
        return torch.nn.functional.softplus(violation) if smooth_loss else violation.relu()

    # the threshold keeps the middle half of the losses
    low, high = torch.quantile(per_triplet_losses(emb), torch.tensor([0.25, 0.75], dtype=emb.dtype))
    make_reducer = {
        "avg-non-zero": reducers.AvgNonZeroReducer,
        "mean": reducers.MeanReducer,
        "sum": reducers.SumReducer,
        "threshold": lambda: reducers.ThresholdReducer(low=float(low), high=float(high)),
    }[reducer]
    loss = losses.TripletMarginLoss(
        margin=0.2, smooth_loss=smooth_loss, distance=distance, reducer=make_reducer()
    )
    value, grad = value_and_grad(loss, emb, labels, (a, p, n))

    e = emb.clone().requires_grad_(True)
    per_triplet = per_triplet_losses(e)
    keep = {
        "avg-non-zero": per_triplet > 0,
        "mean": torch.ones_like(per_triplet, dtype=torch.bool),
        "sum": torch.ones_like(per_triplet, dtype=torch.bool),
        "threshold": (per_triplet > low) & (per_triplet < high),
    }[reducer]
    divisor = {"avg-non-zero": keep.sum(), "mean": len(a), "sum": 1, "threshold": keep.sum()}
    expected = per_triplet[keep].sum() / divisor[reducer]
    expected.backward()
    assert len(a) > 7 * 10  # many chunks
    if reducer == "threshold" or (reducer == "avg-non-zero" and not smooth_loss):
        assert 0 < int(keep.sum()) < len(a)  # the selection matters
    assert value == pytest.approx(float(expected), rel=1e-12)
    assert e.grad is not None
    torch.testing.assert_close(grad, e.grad, rtol=1e-9, atol=1e-12)


def test_a_reference_set_in_another_dtype_is_a_value_error() -> None:
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(
        ValueError, match="ref_emb is torch.float64 but embeddings are torch.float32"
    ):
        losses.TripletMarginLoss()(emb, labels, ref_emb=emb.double(), ref_labels=labels)


@settings(max_examples=80, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    exponent=st.integers(-30, 300),
    dim=st.sampled_from([2, 16, 128]),
    name=st.sampled_from(["ContrastiveLoss", "TripletMarginLoss", "MultiSimilarityLoss"]),
    miner=st.booleans(),
)
def test_any_dtype_and_scale_gives_a_finite_loss_or_a_value_error(
    dtype: torch.dtype, exponent: int, dim: int, name: str, miner: bool
) -> None:
    """Embeddings of every floating dtype at scales from 1e-30 to 1e300: either refused with a
    ValueError naming the problem, or a finite loss and gradient; a refusal happens exactly
    when the squared distances would overflow the dtype they are computed in."""
    g = torch.Generator().manual_seed(exponent * 7 + dim)
    raw = torch.randn(12, dim, generator=g, dtype=torch.float64) * 10.0**exponent
    labels = torch.arange(12) % 3
    if not torch.isfinite(raw.to(dtype)).all():
        return  # not representable in this dtype at all: nothing reaches the loss
    emb = raw.to(dtype).requires_grad_(True)
    computed = torch.float64 if dtype == torch.float64 else torch.float32
    largest = float(emb.detach().abs().max())
    limit = math.log(torch.finfo(computed).max)
    overflows = largest > 0 and 2 * math.log(largest) + math.log(4 * dim) >= limit
    distance = distances.LpDistance(normalize_embeddings=False)
    loss_fn = getattr(losses, name)(distance=distance)
    try:
        tuples = miners.MultiSimilarityMiner(distance=distance)(emb, labels) if miner else None
        value = loss_fn(emb, labels, tuples)
    except ValueError as error:
        assert overflows, f"refused without overflow: {error}"
        assert "overflow" in str(error)
        return
    assert not overflows
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(emb.grad.float()).all()
