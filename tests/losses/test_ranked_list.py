"""RankedListLoss (:mod:`deepmetric.losses.ranked_list`) on a miner's pairs against a loop."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from deepmetric.losses.ranked_list import RankedListLoss
from tests.losses.ms_circle_margin_ranked_cases import (
    _assert_matches_loop,
    _batch,
    _loop_ranked_list,
    _miner_tuples,
)


def _pairs_rule(rows: Tensor, cols: Tensor) -> Callable[[int, int], bool]:
    pairs = set(zip(rows.tolist(), cols.tolist(), strict=True))
    return lambda i, j: (i, j) in pairs


def test_ranked_list_miner_pairs_against_loop_reference() -> None:
    """PML refuses a miner's tuple here; the pairs restrict the positive and negative sets."""
    emb, labels = _batch(n_classes=3, per_class=4, dim=5, seed=41)
    triplets, pairs = _miner_tuples(labels, seed=41)
    for tup in (triplets, pairs):
        a1, p, a2, n = tup if len(tup) == 4 else (tup[0], tup[1], tup[0], tup[2])
        rules = (_pairs_rule(a1, p), _pairs_rule(a2, n))
        loss = RankedListLoss(margin=0.4, Tn=2, Tp=1)
        _assert_matches_loop(loss, _loop_ranked_list, emb, None, rules, labels, indices_tuple=tup)
        _assert_matches_loop(loss, _loop_ranked_list, emb, None, rules, None, indices_tuple=tup)
