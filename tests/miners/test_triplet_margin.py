"""TripletMarginMiner (:mod:`deepmetric.miners.triplet_margin`): semihard triplets against a loop,
chunked enumeration, a batch of 2048."""

from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F

from deepmetric import distances
from deepmetric.miners import (
    TripletMarginMiner,
    triplets_in_margin_band,
)
from deepmetric.pairwise import label_masks
from tests.miners.miner_cases import _clustered, _loop_distance
from tests.parity import as_set, pk_labels


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
