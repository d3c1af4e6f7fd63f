"""Ranks of the same-label neighbours (:mod:`deepmetric.evaluation.ranks`): counting and top-k
engines agree."""

from __future__ import annotations

from typing import Any

import pytest

from deepmetric import evaluation
from tests.evaluation.evaluation_cases import assert_metrics_equal, grid_data, ours


@pytest.mark.parametrize("k", ["max_bin_count", 6, None])
def test_counting_engine_equals_topk_engine(k: int | str | None, monkeypatch: Any) -> None:
    x, y = grid_data(700, 8, dim=3, seed=12, spread=1)  # heavy ties
    kwargs = {"k": k, "include": evaluation.KNN_METRICS, "chunk_size": 97}
    topk = ours(**kwargs).get_accuracy(x, y)
    separate = ours(**kwargs).get_accuracy(x[:200], y[:200], x[200:], y[200:])
    by_parity = {**kwargs, "label_comparison_fn": lambda a, b: a % 2 == b % 2}
    custom = ours(**by_parity).get_accuracy(x[:200], y[:200], x, y, ref_includes_query=True)
    monkeypatch.setattr(evaluation.ranks, "TOPK_MAX_K", 0)
    monkeypatch.setattr(evaluation.ranks, "TOPK_MAX_FRACTION", 0.0)
    assert_metrics_equal(ours(**kwargs).get_accuracy(x, y), topk, rtol=1e-12)
    counted = ours(**kwargs).get_accuracy(x[:200], y[:200], x[200:], y[200:])
    assert_metrics_equal(counted, separate, rtol=1e-12)
    counted = ours(**by_parity).get_accuracy(x[:200], y[:200], x, y, ref_includes_query=True)
    assert_metrics_equal(counted, custom, rtol=1e-12)
