"""The blockwise fast paths of the matrix-based pair losses and miners against the general path (a
distance subclass, which the fast path does not take) over block sizes, reducers, reference sets,
miner tuples, distances, half precision, zero distances, ``no_grad`` and autocast; the blockwise
miners against the whole-matrix miners (same tuples, same order, same ties)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from deepmetric import distances, miners, pairwise, reducers
from deepmetric.pairwise import all_triplets, label_masks
from tests.pairwise.engine_cases import (
    DISTANCES,
    LOSSES,
    _batch,
    _loss_pair,
    general,
)
from tests.parity import value_and_grad


def _assert_same(fast: Any, slow: Any, emb: Tensor, *args: Any, **kwargs: Any) -> None:
    v1, g1 = value_and_grad(fast, emb, *args, **kwargs)
    v2, g2 = value_and_grad(slow, emb, *args, **kwargs)
    assert abs(v1 - v2) <= 1e-9 + 1e-9 * abs(v2), (v1, v2)
    # (near-)zero distances amplify rounding: a looser absolute tolerance
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("distance", list(DISTANCES))
@pytest.mark.parametrize("block_elements", [1, 50, 1 << 17])
def test_fast_path_matches_general_path(
    name: str, distance: str, block_elements: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pairwise.matrix, "BLOCK_ELEMENTS", block_elements)
    emb, labels = _batch(seed=6)
    ref, ref_labels = _batch(n=15, seed=7)
    fast, slow = _loss_pair(name, distance)
    _assert_same(fast, slow, emb, labels)
    _assert_same(fast, slow, emb, labels, ref_emb=ref, ref_labels=ref_labels)


def _miner_tuples(labels: Tensor) -> list[tuple[Tensor, ...]]:
    """A triplet tuple and a pair tuple (with a repeated pair), as miners give them."""
    pos_mask, neg_mask = label_masks(labels, labels, same_source=True)
    a1, p = torch.where(pos_mask)
    a2, n = torch.where(neg_mask)
    pairs = (a1[::2], p[::2], torch.cat([a2[::9], a2[:1]]), torch.cat([n[::9], n[:1]]))
    a, p, n = all_triplets(pos_mask, neg_mask)
    return [pairs, (a[::7], p[::7], n[::7])]


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "contrastive"])
@pytest.mark.parametrize("distance", ["lp", "cosine"])
def test_fast_path_matches_general_path_with_miner_tuples(
    name: str, distance: str, small_blocks: None
) -> None:
    emb, labels = _batch(seed=8)
    fast, slow = _loss_pair(name, distance)
    for tup in _miner_tuples(labels):
        _assert_same(fast, slow, emb, labels, indices_tuple=tup)


REDUCERS: dict[str, Callable[[], reducers.BaseReducer]] = {
    "mean": reducers.MeanReducer,
    "sum": reducers.SumReducer,
    "avg-non-zero": reducers.AvgNonZeroReducer,
    "threshold": lambda: reducers.ThresholdReducer(low=0.05, high=0.6),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reducer", list(REDUCERS))
def test_fast_path_matches_general_path_with_reducers(
    name: str, reducer: str, small_blocks: None
) -> None:
    emb, labels = _batch(seed=9)
    fast, slow = _loss_pair(name, "lp", reducer=REDUCERS[reducer]())
    _assert_same(fast, slow, emb, labels)


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "contrastive"])
def test_fast_path_per_row_losses_with_do_nothing_reducer(name: str) -> None:
    emb, labels = _batch(seed=10)
    fast, slow = _loss_pair(name, "lp", reducer=reducers.DoNothingReducer())
    ours, theirs = fast(emb, labels)["loss"], slow(emb, labels)["loss"]
    torch.testing.assert_close(ours["losses"], theirs["losses"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_fast_path_with_zero_distances_and_half_precision(name: str) -> None:
    emb, labels = _batch(seed=11)
    emb[5], labels[5] = emb[4], labels[4]  # a zero distance between positives
    if name != "ranked-list":  # (its negatives count only at d > 0: rounding would decide)
        emb[7] = emb[0]  # and between negatives
        assert labels[7] != labels[0]
    fast, slow = _loss_pair(name, "lp")
    _assert_same(fast, slow, emb, labels)
    v1, g1 = value_and_grad(fast, emb.half(), labels)
    v2, g2 = value_and_grad(slow, emb.half(), labels)
    assert g1.dtype == torch.float16 and bool(torch.isfinite(g1).all())
    assert abs(v1 - v2) <= 1e-5 * max(1.0, abs(v2))
    torch.testing.assert_close(g1.float(), g2.float(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(LOSSES))
def test_fast_path_without_gradients(name: str) -> None:
    emb, labels = _batch(seed=12)
    fast, slow = _loss_pair(name, "lp")
    with torch.no_grad():
        value = fast(emb, labels)
    assert not value.requires_grad
    assert float(value) == pytest.approx(float(slow(emb, labels)), rel=1e-9, abs=1e-12)


# -- 4. the blockwise miners against the whole-matrix miners ---------------------------------------

MINERS: dict[str, Callable[..., miners.BaseMiner]] = {
    "pair-margin": lambda d: miners.PairMarginMiner(pos_margin=4.0, neg_margin=6.0, distance=d),
    "pair-margin-capped": lambda d: miners.PairMarginMiner(
        pos_margin=4.0, neg_margin=6.0, max_neg_per_pos=2, distance=d
    ),
    "batch-hard": lambda d: miners.BatchHardMiner(distance=d),
    "batch-hard-ranges": lambda d: miners.BatchHardMiner(
        allowed_pos_range=(2.0, 7.0), allowed_neg_range=(3.0, 8.0), distance=d
    ),
}


@pytest.mark.parametrize("name", list(MINERS))
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("block_elements", [1, 60, 1 << 17])
def test_blockwise_miners_match_whole_matrix_miners(
    name: str, with_ref: bool, block_elements: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pairwise.matrix, "BLOCK_ELEMENTS", block_elements)
    # small integers: exact distances in both computations, and many exact ties
    g = torch.Generator().manual_seed(13)
    emb = torch.randint(-3, 4, (30, 5), generator=g).double()
    labels = torch.randint(0, 6, (30,), generator=g)
    ref = torch.randint(-3, 4, (17, 5), generator=g).double()
    ref_labels = torch.randint(0, 6, (17,), generator=g)
    args = (emb, labels, ref, ref_labels) if with_ref else (emb, labels)
    for make_distance in (
        lambda: distances.LpDistance(normalize_embeddings=False, power=2),
        lambda: distances.DotProductSimilarity(normalize_embeddings=False),
    ):
        fast, slow = MINERS[name](make_distance()), MINERS[name](general(make_distance()))
        ours, theirs = fast(*args), slow(*args)
        assert len(ours) == len(theirs)
        for mine, expected in zip(ours, theirs, strict=True):
            assert torch.equal(mine, expected)
        assert len(ours[0]) > 0


@pytest.mark.parametrize("name", list(MINERS))
def test_blockwise_miners_on_normalized_embeddings(name: str) -> None:
    emb, labels = _batch(n=40, per_class=4, dim=6, seed=14)
    margins = {"pos_margin": 0.9, "neg_margin": 1.3}
    make = (
        (lambda d: miners.PairMarginMiner(**margins, distance=d))
        if name.startswith("pair")
        else MINERS[name]
    )
    if name == "batch-hard-ranges":
        make = lambda d: miners.BatchHardMiner(  # noqa: E731
            allowed_pos_range=(0.4, 1.5), allowed_neg_range=(0.6, 1.6), distance=d
        )
    ours = make(distances.LpDistance())(emb, labels)
    theirs = make(general(distances.LpDistance()))(emb, labels)
    for mine, expected in zip(ours, theirs, strict=True):
        assert torch.equal(mine, expected)


@pytest.mark.parametrize("reducer", ["avg-non-zero", "mean", "threshold"])
@pytest.mark.parametrize(
    ("distance", "neg_margin", "kept"),
    [
        ("lp", 0.3, "none"),
        ("lp", 0.6, "few"),
        ("lp", 1.6, "many"),
        ("lp-squared", 0.36, "few"),
        ("lp-squared", 2.5, "many"),
        ("cosine", 0.7, "few"),
        ("cosine", -0.3, "many"),
    ],
)
def test_contrastive_with_none_few_or_many_kept_negatives(
    distance: str, neg_margin: float, kept: str, reducer: str
) -> None:
    # the gradient of the kept negatives: none, a list of a few, or a dense matrix product
    emb, labels = _batch(n=64, per_class=4, dim=32, seed=17)
    if kept == "few":  # three samples next to one of another class
        for i, j in ((0, 10), (20, 33), (41, 60)):
            emb[i] = emb[j] + 0.01 * emb[i]
            assert labels[i] != labels[j]
    fast, slow = _loss_pair(
        "contrastive", distance, neg_margin=neg_margin, reducer=REDUCERS[reducer]()
    )
    mat = fast.distance(emb)
    negatives = labels[:, None] != labels[None, :]
    inside = (mat > neg_margin) if fast.distance.is_inverted else (mat < neg_margin)
    n_kept = int((inside & negatives).sum())
    expected = {"none": n_kept == 0, "few": 0 < n_kept <= 64, "many": n_kept > 64}
    assert expected[kept], n_kept
    _assert_same(fast, slow, emb, labels)


@pytest.mark.parametrize("name", list(LOSSES))
def test_fast_path_under_autocast_computes_in_float32(name: str) -> None:
    emb, labels = _batch(seed=19)
    emb = emb.float()
    fast, slow = _loss_pair(name, "lp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v1, g1 = value_and_grad(fast, emb, labels)
    # (the reference outside autocast: the general path's backward would run in bfloat16)
    v2, g2 = value_and_grad(slow, emb, labels)
    assert v1 == pytest.approx(v2, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    miner = miners.BatchHardMiner()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mined = miner(emb, labels)
    expected = miners.BatchHardMiner(distance=general(distances.LpDistance()))(emb, labels)
    for ours, theirs in zip(mined, expected, strict=True):
        assert torch.equal(ours, theirs)
