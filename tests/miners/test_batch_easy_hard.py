"""BatchHardMiner (:mod:`deepmetric.miners.batch_easy_hard`) against a loop."""

from __future__ import annotations

from deepmetric.miners import (
    BatchHardMiner,
)
from tests.miners.miner_cases import _clustered, _loop_distance
from tests.parity import as_set


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
