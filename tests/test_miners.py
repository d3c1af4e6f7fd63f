"""Miners: PML parity as sets, slow loop references, edge cases, label properties, the negative
cap, the distance-weighted sampler's distribution, a large batch, and miner -> loss parity."""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
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
    cap_negative_pairs,
    distance_weighted_negative_weights,
    triplets_in_margin_band,
)
from deepmetric.pairwise import label_masks
from tests.parity import as_set, pk_labels, value_and_grad

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


def _clustered(
    n_classes: int = 8, per_class: int = 4, dim: int = 16, seed: int = 0, spread: float = 0.8
) -> tuple[Tensor, Tensor]:
    """Float64 class centres plus noise: overlapping classes, so every miner has a real choice."""
    g = torch.Generator().manual_seed(seed)
    labels = pk_labels(n_classes, per_class)
    centers = torch.randn(n_classes, dim, generator=g, dtype=torch.float64)
    noise = torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return centers[labels] + spread * noise, labels


def _reference_set(query_seed: int, dim: int = 16) -> tuple[Tensor, Tensor]:
    """A reference set around the class centres of ``_clustered(seed=query_seed)``, plus two
    classes that no query has."""
    centers = torch.randn(
        8, dim, generator=torch.Generator().manual_seed(query_seed), dtype=torch.float64
    )
    g = torch.Generator().manual_seed(100 + query_seed)
    centers = torch.cat([centers, torch.randn(2, dim, generator=g, dtype=torch.float64)])
    ref_labels = torch.randint(0, 10, (21,), generator=g)
    ref = centers[ref_labels] + 0.8 * torch.randn(21, dim, generator=g, dtype=torch.float64)
    return ref, ref_labels


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


# -- slow loop references -------------------------------------------------------------------------


def _loop_distance(x: Tensor, y: Tensor) -> float:
    return float(torch.sqrt(((x / x.norm() - y / y.norm()) ** 2).sum()))


def test_semihard_triplets_match_loop() -> None:
    emb, labels = _clustered(n_classes=5, per_class=4, seed=1)
    margin = 0.3
    expected = set()
    for a, p, n in itertools.product(range(len(emb)), repeat=3):
        if a == p or labels[a] != labels[p] or labels[a] == labels[n]:
            continue
        gap = _loop_distance(emb[a], emb[n]) - _loop_distance(emb[a], emb[p])
        if 0 < gap <= margin:
            expected.add((a, p, n))
    got = TripletMarginMiner(margin, "semihard")(emb, labels)
    assert len(expected) > 0
    assert as_set(got) == expected and len(got[0]) == len(expected)
    # lexicographic order, like PML
    assert list(zip(*(t.tolist() for t in got), strict=True)) == sorted(expected)


def test_batch_hard_matches_loop() -> None:
    emb, labels = _clustered(n_classes=5, per_class=3, seed=2)
    labels[-1] = 99  # one anchor without any positive: no triplet for it
    expected = set()
    for a in range(len(emb)):
        pos = [j for j in range(len(emb)) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(len(emb)) if labels[j] != labels[a]]
        if pos and neg:
            p = max(pos, key=lambda j: _loop_distance(emb[a], emb[j]))
            n = min(neg, key=lambda j: _loop_distance(emb[a], emb[j]))
            expected.add((a, p, n))
    got = BatchHardMiner()(emb, labels)
    assert len(expected) == len(emb) - 1
    assert as_set(got) == expected and len(got[0]) == len(expected)


def test_chunked_enumeration_matches_one_block() -> None:
    emb, labels = _clustered(seed=3)
    dist = distances.LpDistance()
    mat = dist(emb)
    masks = label_masks(labels, labels, same_source=True)
    whole = triplets_in_margin_band(mat, *masks, low=0.0, high=0.3, distance=dist)
    tiny = triplets_in_margin_band(mat, *masks, low=0.0, high=0.3, distance=dist, max_elements=7)
    assert len(whole[0]) > 0
    for a, b in zip(whole, tiny, strict=True):
        assert torch.equal(a, b)


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


# -- the negative cap -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda cap: PairMarginMiner(0.3, 1.5, max_neg_per_pos=cap),
        lambda cap: PairMarginMiner(
            0.8, 0.0, max_neg_per_pos=cap, distance=distances.CosineSimilarity()
        ),
        lambda cap: MultiSimilarityMiner(0.5, max_neg_per_pos=cap),
        lambda cap: MultiSimilarityMiner(0.5, max_neg_per_pos=cap, distance=distances.LpDistance()),
        lambda cap: BatchEasyHardMiner("all", "all", max_neg_per_pos=cap),
        lambda cap: BatchEasyHardMiner("easy", "all", max_neg_per_pos=cap),
    ],
)
@pytest.mark.parametrize("cap", [1, 3])
def test_cap_keeps_exactly_the_hardest_negatives(make: Any, cap: int) -> None:
    emb, labels = _clustered(seed=5, per_class=3)
    uncapped, capped = make(None)(emb, labels), make(cap)(emb, labels)
    # positives untouched
    assert torch.equal(uncapped[0], capped[0]) and torch.equal(uncapped[1], capped[1])
    n_pos, n_neg = len(uncapped[0]), len(uncapped[2])
    n_keep = min(cap * n_pos, n_neg)
    assert n_neg > n_keep > 0  # the cap bites in this batch
    assert len(capped[2]) == len(capped[3]) == n_keep
    # independent distances: Euclidean or cosine of the normalised embeddings
    unit = F.normalize(emb, dim=1)
    inverted = make(None).distance.is_inverted
    pair_values = (
        (unit[uncapped[2]] * unit[uncapped[3]]).sum(1)
        if inverted
        else (unit[uncapped[2]] - unit[uncapped[3]]).norm(dim=1)
    )
    kept = set(zip(capped[2].tolist(), capped[3].tolist(), strict=True))
    assert kept <= set(zip(uncapped[2].tolist(), uncapped[3].tolist(), strict=True))
    # the kept values are the n_keep hardest values (ties may be broken either way)
    is_kept = torch.tensor(
        [pair in kept for pair in zip(uncapped[2].tolist(), uncapped[3].tolist(), strict=True)]
    )
    hardest = torch.sort(pair_values, descending=inverted).values[:n_keep]
    kept_values = torch.sort(pair_values[is_kept], descending=inverted).values
    torch.testing.assert_close(kept_values, hardest)


def test_cap_function_on_a_tiny_case() -> None:
    mat = torch.tensor([[0.0, 0.2, 0.9, 0.5, 0.7], [0.2, 0.0, 0.1, 0.4, 0.3]])
    a1, p = torch.tensor([0]), torch.tensor([1])
    a2 = torch.tensor([0, 0, 0, 1, 1, 1])
    n = torch.tensor([2, 3, 4, 2, 3, 4])
    # distances 0.9 0.5 0.7 0.1 0.4 0.3: the 3 closest are (1,2), (1,4), (1,3), in original order
    out = cap_negative_pairs(mat, (a1, p, a2, n), 3, is_inverted=False)
    assert out[2].tolist() == [1, 1, 1] and out[3].tolist() == [2, 3, 4]
    # a similarity keeps the largest: 0.9, 0.7, 0.5
    out = cap_negative_pairs(mat, (a1, p, a2, n), 3, is_inverted=True)
    assert out[2].tolist() == [0, 0, 0] and out[3].tolist() == [2, 3, 4]
    # a cap above the number of negatives, or None, changes nothing
    for cap in (6, None):
        out = cap_negative_pairs(mat, (a1, p, a2, n), cap, is_inverted=False)
        assert torch.equal(out[2], a2) and torch.equal(out[3], n)
    # no positive pair: no negative pair survives
    empty = torch.empty(0, dtype=torch.long)
    out = cap_negative_pairs(mat, (empty, empty, a2, n), 2, is_inverted=False)
    assert len(out[2]) == 0 and out[2].dtype == torch.int64


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_cap_rejects_bad_values(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_neg_per_pos"):
        PairMarginMiner(max_neg_per_pos=bad)
    with pytest.raises(ValueError, match="max_neg_per_pos"):
        MultiSimilarityMiner(max_neg_per_pos=bad)


# -- DistanceWeightedMiner ------------------------------------------------------------------------


def _expected_dwm_probs(
    emb: Tensor, labels: Tensor, cutoff: float, nonzero_loss_cutoff: float
) -> Tensor:
    """Loop: P(negative j | anchor i) ∝ 1/q(max(d, cutoff)) for negatives with d < nzc, where
    q(d) = d^(n-2) (1 - d²/4)^((n-3)/2)."""
    n_dim = emb.shape[1]
    unit = emb / emb.norm(dim=1, keepdim=True)
    probs = torch.zeros(len(emb), len(emb), dtype=torch.float64)
    for i in range(len(emb)):
        for j in range(len(emb)):
            d = max(float((unit[i] - unit[j]).norm()), cutoff)
            if labels[i] != labels[j] and d < nonzero_loss_cutoff:
                q = d ** (n_dim - 2) * (1 - d * d / 4) ** ((n_dim - 3) / 2)
                probs[i, j] = 1 / q
        if probs[i].sum() > 0:
            probs[i] /= probs[i].sum()
    return probs


def test_distance_weighted_miner_respects_the_weights() -> None:
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(16, 5, generator=g, dtype=torch.float64), pk_labels(4, 4)
    emb[4:6] = emb[0:2] + 0.1 * torch.randn(2, 5, generator=g, dtype=torch.float64)
    expected = _expected_dwm_probs(emb, labels, 0.5, 1.4)
    unit = F.normalize(emb, dim=1)
    dists = torch.cdist(unit, unit)
    assert bool(((dists >= 1.4) & (labels[:, None] != labels[None, :])).any())  # some excluded
    assert bool(((dists < 0.5) & (labels[:, None] != labels[None, :])).any())  # some clamped

    miner = DistanceWeightedMiner()
    torch.manual_seed(1234)
    neg_counts = torch.zeros(16, 16, dtype=torch.float64)
    pos_counts = torch.zeros(16, 16, dtype=torch.float64)
    calls = 600
    for _ in range(calls):
        a, p, n = miner(emb, labels)
        # as PML: each anchor gets as many triplets as its class has samples (4)
        assert torch.equal(torch.bincount(a, minlength=16), torch.full((16,), 4))
        neg_counts.index_put_((a, n), torch.ones(len(a), dtype=torch.float64), accumulate=True)
        pos_counts.index_put_((a, p), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    draws = calls * 4
    # never a negative at or beyond nonzero_loss_cutoff, never a zero-probability negative
    assert float(neg_counts[expected == 0].sum()) == 0
    assert float(neg_counts[dists >= 1.4].sum()) == 0
    # empirical frequencies within ~6 standard errors of the weights
    torch.testing.assert_close(neg_counts / draws, expected, rtol=0, atol=0.03)
    # positives uniform over the other three samples of the class
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(16, dtype=torch.bool)
    torch.testing.assert_close(pos_counts / draws, same.double() / 3, rtol=0, atol=0.04)


def test_distance_weighted_miner_matches_pml_structure() -> None:
    """Random, so not the same triplets; but the same anchors, each as many times, as PML."""
    emb, labels = _clustered(dim=6, seed=2)
    ref, ref_labels = _reference_set(2, dim=6)
    for args in ((emb, labels), (emb, labels, ref, ref_labels)):
        ours, theirs = DistanceWeightedMiner()(*args), pml_miners.DistanceWeightedMiner()(*args)
        assert Counter(ours[0].tolist()) == Counter(theirs[0].tolist())
        assert all(t.dtype == torch.int64 for t in ours)


def test_distance_weighted_miner_keeps_anchors_that_pml_underflows() -> None:
    """Deliberate deviation: weights are scaled per row, not by one batch-wide maximum, so in high
    dimension an anchor whose negatives are all far is not dropped by float32 underflow."""
    dim = 512
    basis = torch.eye(dim)

    def at(d: float, base: Tensor, other: Tensor) -> Tensor:  # unit vector at distance d
        c = 1 - d * d / 2
        return c * base + math.sqrt(1 - c * c) * other

    emb = torch.zeros(6, dim)
    emb[0], emb[1] = basis[0], at(0.1, basis[0], basis[1])
    emb[2] = at(0.5, basis[0], basis[2])
    emb[3] = at(0.05, emb[2], basis[3])
    emb[4] = at(1.35, basis[0], basis[4])  # class 2: every negative at ~1.35
    emb[5] = at(0.05, emb[4], basis[5])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    ours = DistanceWeightedMiner()(emb, labels)
    theirs = pml_miners.DistanceWeightedMiner()(emb, labels)
    assert set(ours[0].tolist()) == set(range(6))
    assert set(theirs[0].tolist()) == {0, 1, 2, 3}
    weights = distance_weighted_negative_weights(
        distances.LpDistance()(emb), labels[:, None] != labels[None, :], dim, 0.5, 1.4
    )
    assert torch.equal(weights.amax(dim=1), torch.ones(6))


def test_distance_weighted_miner_requires_unit_euclidean_distance() -> None:
    for bad in (
        distances.CosineSimilarity(),
        distances.LpDistance(power=2),
        distances.LpDistance(normalize_embeddings=False),
        distances.LpDistance(p=1),
    ):
        with pytest.raises(ValueError, match="LpDistance"):
            DistanceWeightedMiner(distance=bad)


# -- a large batch --------------------------------------------------------------------------------


def test_triplet_margin_miner_all_at_batch_2048() -> None:
    labels = pk_labels(512, 4)
    emb = torch.randn(2048, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    margin = 0.2
    start = time.perf_counter()
    a, p, n = TripletMarginMiner(margin, "all")(emb, labels)
    elapsed = time.perf_counter() - start
    # independent count: per positive pair, the negatives with d(a,n) <= d(a,p) + margin
    unit = F.normalize(emb, dim=1)
    dists = torch.cdist(unit, unit)
    neg = labels[:, None] != labels[None, :]
    sorted_neg = torch.sort(dists.masked_fill(~neg, math.inf), dim=1).values
    pa, pp = torch.where((labels[:, None] == labels[None, :]) & ~torch.eye(2048, dtype=torch.bool))
    bound = (dists[pa, pp] + margin).unsqueeze(1)
    expected = int(torch.searchsorted(sorted_neg[pa], bound, right=True).sum())
    assert len(a) == len(p) == len(n) == expected > 10_000_000
    pick = torch.randint(0, len(a), (10_000,), generator=torch.Generator().manual_seed(1))
    assert bool(
        (labels[a[pick]] == labels[p[pick]]).all() & (labels[a[pick]] != labels[n[pick]]).all()
    )
    assert bool((dists[a[pick], n[pick]] - dists[a[pick], p[pick]] <= margin + 1e-12).all())
    assert elapsed < 60  # about 1-2 s on 2 cores; the bound only catches a cube


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


# -- behaviour and bad input ----------------------------------------------------------------------


def test_output_is_detached_and_counts_are_recorded() -> None:
    emb, labels = _clustered(seed=8)
    emb.requires_grad_(True)
    miner = TripletMarginMiner(0.2, "semihard")
    a, p, n = miner(emb, labels)
    assert not a.requires_grad and miner.num_triplets == len(a) > 0
    pair_miner = PairMarginMiner(0.6, 1.1)
    a1, _, a2, _ = pair_miner(emb, labels)
    assert (pair_miner.num_pos_pairs, pair_miner.num_neg_pairs) == (len(a1), len(a2))
    assert emb.grad is None


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


def test_losses_never_import_the_miners() -> None:
    """The losses reach miners through :mod:`deepmetric.interfaces` only, so that the two
    packages do not import each other (a cycle breaks partial imports)."""
    import ast
    from pathlib import Path

    import deepmetric.losses

    offenders = []
    for path in Path(deepmetric.losses.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [f"{'.' * node.level}{node.module or ''}"]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name in ("..miners", "deepmetric.miners") for name in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
