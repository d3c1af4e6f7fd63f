"""What every miner shares (:mod:`deepmetric.miners.base`): the cap on negatives per positive
pair, detached output and recorded counts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from deepmetric import distances
from deepmetric.miners import (
    BatchEasyHardMiner,
    MultiSimilarityMiner,
    PairMarginMiner,
    TripletMarginMiner,
    cap_negative_pairs,
)
from tests.miners.miner_cases import _clustered

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
