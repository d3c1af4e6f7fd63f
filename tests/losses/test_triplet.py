"""TripletMarginLoss (:mod:`deepmetric.losses.triplet`): a loop reference, the streamed
all-triplets path against explicit triplets, a miner's many triplets in chunks, per-triplet
losses, triplets_per_anchor, label dtypes, half precision and an embedding regularizer."""

from __future__ import annotations

import itertools

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers

from deepmetric import distances, losses, reducers, regularizers
from tests.losses.contrastive_triplet_cases import _batch
from tests.parity import assert_same_loss, value_and_grad


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
    import deepmetric.pairwise as pairs

    monkeypatch.setattr(pairs, "CHUNK_ELEMENTS", 1)
    original = pairs.positive_pair_chunks
    monkeypatch.setattr(
        pairs.triplets, "positive_pair_chunks", lambda m, r, max_elements=1: original(m, r, 1)
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


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_any_integer_label_dtype(dtype: torch.dtype) -> None:
    emb, labels = _batch(seed=37)
    expected = float(losses.TripletMarginLoss()(emb, labels))
    assert float(losses.TripletMarginLoss()(emb, labels.to(dtype))) == pytest.approx(expected)


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
