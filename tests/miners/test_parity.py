"""Every miner over the same cases: PML parity as sets (distances, reference sets, float32), edge
cases, label properties, miner -> loss parity, recorded counts, bad arguments and input."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import Tensor

from deepmetric import distances
from deepmetric.losses.contrastive import ContrastiveLoss
from deepmetric.losses.triplet import TripletMarginLoss
from deepmetric.miners import (
    BatchEasyHardMiner,
    BatchHardMiner,
    DistanceWeightedMiner,
    MultiSimilarityMiner,
    PairMarginMiner,
    TripletMarginMiner,
)
from tests.miners.miner_cases import _clustered, _reference_set
from tests.parity import as_set, value_and_grad

MINERS: dict[str, type[torch.nn.Module]] = {
    "TripletMarginMiner": TripletMarginMiner,
    "BatchHardMiner": BatchHardMiner,
    "BatchEasyHardMiner": BatchEasyHardMiner,
    "MultiSimilarityMiner": MultiSimilarityMiner,
    "PairMarginMiner": PairMarginMiner,
    "DistanceWeightedMiner": DistanceWeightedMiner,
}


# every valid (pos_strategy, neg_strategy) of BatchEasyHardMiner
STRATEGY_PAIRS = [
    (ps, ns)
    for ps, ns in itertools.product(["easy", "hard", "semihard", "all"], repeat=2)
    if not (ps == ns == "semihard") and {ps, ns} != {"all", "semihard"}
]


# (miner name, kwargs) for the miner's default distance (LpDistance; CosineSimilarity for MS)
DEFAULT_DISTANCE_CASES: list[tuple[str, dict[str, Any]]] = [
    *[("TripletMarginMiner", {"type_of_triplets": t}) for t in ["all", "hard", "semihard", "easy"]],
    ("TripletMarginMiner", {"margin": 0.5, "type_of_triplets": "semihard"}),
    ("TripletMarginMiner", {"margin": -0.05, "type_of_triplets": "hard"}),
    ("BatchHardMiner", {}),
    ("BatchHardMiner", {"allowed_pos_range": (0.3, 1.0), "allowed_neg_range": (0.6, 1.4)}),
    *[
        ("BatchEasyHardMiner", {"pos_strategy": ps, "neg_strategy": ns})
        for ps, ns in STRATEGY_PAIRS
    ],
    *[
        (
            "BatchEasyHardMiner",
            {
                "pos_strategy": ps,
                "neg_strategy": ns,
                "allowed_pos_range": (0.3, 1.0),
                "allowed_neg_range": (0.6, 1.4),
            },
        )
        for ps, ns in STRATEGY_PAIRS
    ],
    ("MultiSimilarityMiner", {}),
    ("MultiSimilarityMiner", {"epsilon": 0.3}),
    ("PairMarginMiner", {}),
    ("PairMarginMiner", {"pos_margin": 0.6, "neg_margin": 1.1}),
]


# the same miners with the other kind of distance (similarity margins where they matter)
OTHER_DISTANCE_CASES: list[tuple[str, dict[str, Any]]] = [
    *[("TripletMarginMiner", {"type_of_triplets": t}) for t in ["all", "hard", "semihard", "easy"]],
    ("BatchHardMiner", {}),
    ("BatchHardMiner", {"allowed_pos_range": (0.2, 0.9), "allowed_neg_range": (-0.2, 0.6)}),
    *[
        ("BatchEasyHardMiner", {"pos_strategy": ps, "neg_strategy": ns})
        for ps, ns in STRATEGY_PAIRS
    ],
    ("BatchEasyHardMiner", {"allowed_pos_range": (0.2, 0.9), "allowed_neg_range": (-0.2, 0.6)}),
    ("MultiSimilarityMiner", {}),
    ("MultiSimilarityMiner", {"epsilon": 0.3}),
    ("PairMarginMiner", {"pos_margin": 0.7, "neg_margin": 0.3}),
]


def _other_distance(name: str, pml: bool) -> Any:
    """CosineSimilarity, except for MultiSimilarityMiner whose default it already is."""
    module = pml_distances if pml else distances
    return module.LpDistance() if name == "MultiSimilarityMiner" else module.CosineSimilarity()


def _as_sets(indices: tuple[Tensor, ...]) -> tuple[set[tuple[int, ...]], ...]:
    """Triplets as one set; pairs as (positive pairs, negative pairs)."""
    if len(indices) == 3:
        return (as_set(indices),)
    return as_set(indices[:2]), as_set(indices[2:])


def _assert_same_output(ours: tuple[Tensor, ...], theirs: tuple[Tensor, ...]) -> None:
    assert len(ours) == len(theirs)
    for t in ours:
        assert t.dtype == torch.int64 and t.ndim == 1
    assert [len(t) for t in ours] == [len(t) for t in theirs]  # no duplicates, none missing
    assert _as_sets(ours) == _as_sets(theirs)


def _pair_miner(name: str, kwargs: dict[str, Any], other: bool) -> tuple[Any, Any]:
    ours_kwargs, pml_kwargs = dict(kwargs), dict(kwargs)
    if other:
        ours_kwargs["distance"] = _other_distance(name, pml=False)
        pml_kwargs["distance"] = _other_distance(name, pml=True)
    return MINERS[name](**ours_kwargs), getattr(pml_miners, name)(**pml_kwargs)


# -- parity with PML ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs"), DEFAULT_DISTANCE_CASES)
def test_parity_with_pml_default_distance(name: str, kwargs: dict[str, Any]) -> None:
    ours, theirs = _pair_miner(name, kwargs, other=False)
    total = 0
    for seed in range(3):
        emb, labels = _clustered(seed=seed)
        out = ours(emb, labels)
        _assert_same_output(out, theirs(emb, labels))
        total += sum(len(t) for t in out)
    assert total > 0  # the comparison is not between two empty outputs


@pytest.mark.parametrize(("name", "kwargs"), OTHER_DISTANCE_CASES)
def test_parity_with_pml_other_distance(name: str, kwargs: dict[str, Any]) -> None:
    ours, theirs = _pair_miner(name, kwargs, other=True)
    total = 0
    for seed in range(3):
        emb, labels = _clustered(seed=seed, per_class=3 + seed)
        out = ours(emb, labels)
        _assert_same_output(out, theirs(emb, labels))
        total += sum(len(t) for t in out)
    assert total > 0


@pytest.mark.parametrize(
    ("name", "kwargs", "other"),
    [(n, k, False) for n, k in DEFAULT_DISTANCE_CASES[::3]]
    + [(n, k, True) for n, k in OTHER_DISTANCE_CASES[::3]],
)
def test_parity_with_pml_ref_emb(name: str, kwargs: dict[str, Any], other: bool) -> None:
    ours, theirs = _pair_miner(name, kwargs, other)
    emb, labels = _clustered(seed=4)
    ref, ref_labels = _reference_set(4)
    out = ours(emb, labels, ref, ref_labels)
    _assert_same_output(out, theirs(emb, labels, ref, ref_labels))
    assert sum(len(t) for t in out) > 0
    assert int(out[0].max()) < len(emb) and int(out[1].max()) < len(ref)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("TripletMarginMiner", {"type_of_triplets": "semihard"}),
        ("BatchHardMiner", {}),
        ("BatchEasyHardMiner", {}),
        ("MultiSimilarityMiner", {}),
        ("PairMarginMiner", {"pos_margin": 0.6, "neg_margin": 1.1}),
    ],
)
def test_parity_with_pml_float32(name: str, kwargs: dict[str, Any]) -> None:
    ours, theirs = _pair_miner(name, kwargs, other=False)
    emb, labels = _clustered(seed=7)
    _assert_same_output(ours(emb.float(), labels), theirs(emb.float(), labels))


# -- edge cases -----------------------------------------------------------------------------------

EDGE_BATCHES = {
    "one class": (torch.randn(6, 4, dtype=torch.float64), torch.zeros(6, dtype=torch.long)),
    "all distinct": (torch.randn(6, 4, dtype=torch.float64), torch.arange(6)),
    "single sample": (torch.randn(1, 4, dtype=torch.float64), torch.zeros(1, dtype=torch.long)),
}


EDGE_MINERS: list[tuple[str, dict[str, Any]]] = [
    ("TripletMarginMiner", {}),
    ("TripletMarginMiner", {"type_of_triplets": "easy"}),
    ("BatchHardMiner", {}),
    ("BatchEasyHardMiner", {}),
    ("BatchEasyHardMiner", {"pos_strategy": "all", "neg_strategy": "all"}),
    ("MultiSimilarityMiner", {}),
    ("PairMarginMiner", {}),
    ("DistanceWeightedMiner", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), EDGE_MINERS)
@pytest.mark.parametrize("batch", list(EDGE_BATCHES))
def test_edge_cases_match_pml_without_error(name: str, kwargs: dict[str, Any], batch: str) -> None:
    emb, labels = EDGE_BATCHES[batch]
    ours, theirs = _pair_miner(name, kwargs, other=False)
    out = ours(emb, labels)
    _assert_same_output(out, theirs(emb, labels))
    if len(out) == 3 or batch == "single sample":
        # no triplet can exist; a pair miner may still return one kind of pair (as PML)
        assert all(len(t) == 0 for t in out)
    if len(out) == 4 and batch == "one class":
        assert len(out[2]) == 0
    if len(out) == 4 and batch == "all distinct":
        assert len(out[0]) == 0


@pytest.mark.parametrize(("name", "kwargs"), EDGE_MINERS)
def test_empty_batch_gives_empty_int64(name: str, kwargs: dict[str, Any]) -> None:
    out = MINERS[name](**kwargs)(torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    assert len(out) in (3, 4)
    assert all(t.dtype == torch.int64 and len(t) == 0 for t in out)


# -- properties on generated batches --------------------------------------------------------------

PROPERTY_MINERS = [
    TripletMarginMiner(0.2, "all"),
    TripletMarginMiner(0.2, "semihard", distance=distances.CosineSimilarity()),
    TripletMarginMiner(0.1, "easy"),
    BatchHardMiner(),
    BatchEasyHardMiner(),
    BatchEasyHardMiner("semihard", "hard", distance=distances.CosineSimilarity()),
    BatchEasyHardMiner("all", "easy", max_neg_per_pos=2),
    MultiSimilarityMiner(),
    MultiSimilarityMiner(max_neg_per_pos=1, distance=distances.LpDistance()),
    PairMarginMiner(0.3, 1.2),
    PairMarginMiner(0.5, 0.2, max_neg_per_pos=3, distance=distances.CosineSimilarity()),
    DistanceWeightedMiner(),
]


@st.composite
def _batches(draw: st.DrawFn) -> tuple[Tensor, Tensor, bool]:
    n = draw(st.integers(1, 64))
    n_labels = draw(st.integers(1, max(1, n)))
    dim = draw(st.integers(1, 8))
    scale = draw(st.sampled_from([1e-4, 1.0, 1e3]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g, dtype=torch.float64) * scale
    if draw(st.booleans()) and n > 1:  # duplicate embeddings
        emb[n // 2 :] = emb[: n - n // 2].clone()
    labels = torch.randint(0, n_labels, (n,), generator=g)
    return emb, labels, draw(st.booleans())


@settings(max_examples=40, deadline=None)
@given(_batches())
def test_positives_share_the_label_and_negatives_do_not(batch: tuple[Tensor, Tensor, bool]) -> None:
    emb, labels, with_ref = batch
    ref, ref_labels = (emb.flip(0) * 1.5, labels.flip(0)) if with_ref else (None, None)
    r_labels = labels if ref_labels is None else ref_labels
    for miner in PROPERTY_MINERS:
        out = miner(emb, labels, ref, ref_labels)
        assert all(t.dtype == torch.int64 for t in out)
        a1, p, a2, n = out if len(out) == 4 else (out[0], out[1], out[0], out[2])
        assert len(a1) == len(p) and len(a2) == len(n)
        assert bool((labels[a1] == r_labels[p]).all())
        assert bool((labels[a2] != r_labels[n]).all())
        if not with_ref:
            assert bool((a1 != p).all())  # never a sample paired with itself


# -- miner output feeds the losses ----------------------------------------------------------------

LOSS_CASES = [
    ("TripletMarginMiner", {"type_of_triplets": "semihard"}, "TripletMarginLoss", {"margin": 0.2}),
    ("TripletMarginMiner", {"type_of_triplets": "all"}, "ContrastiveLoss", {}),
    ("BatchHardMiner", {}, "TripletMarginLoss", {"margin": 0.3}),
    ("BatchEasyHardMiner", {}, "TripletMarginLoss", {}),
    ("BatchEasyHardMiner", {"pos_strategy": "all", "neg_strategy": "hard"}, "ContrastiveLoss", {}),
    ("MultiSimilarityMiner", {}, "ContrastiveLoss", {"pos_margin": 0.1, "neg_margin": 1.2}),
    ("MultiSimilarityMiner", {}, "TripletMarginLoss", {}),
    ("PairMarginMiner", {"pos_margin": 0.6, "neg_margin": 1.1}, "ContrastiveLoss", {}),
]


OUR_LOSSES: dict[str, Any] = {
    "TripletMarginLoss": TripletMarginLoss,
    "ContrastiveLoss": ContrastiveLoss,
}


@pytest.mark.parametrize(("miner", "miner_kwargs", "loss", "loss_kwargs"), LOSS_CASES)
def test_miner_output_feeds_losses_like_pml(
    miner: str, miner_kwargs: dict[str, Any], loss: str, loss_kwargs: dict[str, Any]
) -> None:
    emb, labels = _clustered(seed=6)
    our_miner, pml_miner = _pair_miner(miner, miner_kwargs, other=False)
    our_tuple, pml_tuple = our_miner(emb, labels), pml_miner(emb, labels)
    our_loss, pml_loss = OUR_LOSSES[loss](**loss_kwargs), getattr(pml_losses, loss)(**loss_kwargs)
    v1, g1 = value_and_grad(lambda e: our_loss(e, labels, our_tuple), emb)
    v2, g2 = value_and_grad(lambda e: pml_loss(e, labels, pml_tuple), emb)
    assert v2 != 0
    assert abs(v1 - v2) <= 1e-7 + 1e-5 * abs(v2), f"loss {v1} != PML {v2}"
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="type_of_triplets"):
        TripletMarginMiner(type_of_triplets="hardest")
    with pytest.raises(ValueError, match="pos_strategy"):
        BatchEasyHardMiner(pos_strategy="medium")
    with pytest.raises(ValueError, match="neg_strategy"):
        BatchEasyHardMiner(neg_strategy="medium")
    with pytest.raises(ValueError, match="both"):
        BatchEasyHardMiner("semihard", "semihard")
    with pytest.raises(ValueError, match="combination"):
        BatchEasyHardMiner("all", "semihard")
    with pytest.raises(ValueError, match="combination"):
        BatchEasyHardMiner("semihard", "all")
    with pytest.raises(ValueError, match="allowed_pos_range"):
        BatchHardMiner(allowed_pos_range=(0.1,))  # type: ignore[arg-type]
    assert BatchEasyHardMiner.HARD == "hard" and BatchEasyHardMiner.ALL == "all"
    assert BatchEasyHardMiner.all_batch_mining_strategies == ["hard", "semihard", "easy", "all"]


def test_bad_input_raises_value_error() -> None:
    miner = TripletMarginMiner()
    emb, labels = _clustered(seed=9)
    with pytest.raises(ValueError, match="labels"):
        miner(emb, None)
    with pytest.raises(ValueError, match="entries"):
        miner(emb, labels[:-1])
    with pytest.raises(ValueError, match="integer"):
        miner(emb, labels.float())
    with pytest.raises(ValueError, match="NaN"):
        miner(emb * math.nan, labels)
    with pytest.raises(ValueError, match="ref_labels"):
        miner(emb, labels, None, labels)
    with pytest.raises(ValueError, match="ref_labels"):
        miner(emb, labels, emb, None)
    with pytest.raises(ValueError, match="2-D"):
        miner(emb[0], labels[:1])
