"""Retrieval metrics (:mod:`deepmetric.evaluation.metrics`) against a slow loop written here,
closed forms, hand-computed cases and hypothesis data."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from deepmetric import evaluation
from deepmetric.evaluation import metrics_from_ranks
from tests.evaluation.evaluation_cases import assert_metrics_equal, grid_data, ours


def loop_metrics(
    query: Tensor,
    query_labels: Tensor,
    reference: Tensor,
    reference_labels: Tensor,
    ref_includes_query: bool,
    k: int | str | None,
) -> dict[str, float]:
    """Every retrieval metric from its definition, one query at a time."""
    per_query: dict[str, list[float]] = {m: [] for m in evaluation.KNN_METRICS}
    q_list, r_labels = query_labels.tolist(), reference_labels.tolist()
    counts = {label: r_labels.count(label) for label in set(q_list)}
    max_bin = max(counts.values())
    self_count = int(ref_includes_query)
    if k == "max_bin_count":
        k = max_bin - self_count
    elif k is None:
        k = len(reference) - self_count
    assert isinstance(k, int)
    k = min(k, len(reference) - self_count)
    for i, label in enumerate(q_list):
        relevant = counts[label] - self_count
        if relevant <= 0:
            continue  # no other reference shares the label: left out
        dists = [float(((reference[j] - query[i]) ** 2).sum()) for j in range(len(reference))]
        order = sorted(range(len(reference)), key=lambda j: (dists[j], j))
        if ref_includes_query:
            order.remove(i)
        hit = [r_labels[j] == label for j in order]
        precision = [sum(hit[: p + 1]) / (p + 1) for p in range(len(hit))]
        cutoff = min(k, relevant)
        first = hit.index(True) + 1
        per_query["precision_at_1"].append(float(hit[0]))
        per_query["r_precision"].append(sum(hit[:cutoff]) / cutoff)
        per_query["mean_average_precision_at_r"].append(
            sum(precision[p] for p in range(cutoff) if hit[p]) / relevant
        )
        per_query["mean_average_precision"].append(
            sum(precision[p] for p in range(k) if hit[p]) / relevant
        )
        per_query["mean_reciprocal_rank"].append(1 / first if first <= k else 0.0)
        for rk in evaluation.RECALL_KS:
            per_query[f"recall_at_{rk}"].append(float(any(hit[:rk])))
    return {m: (sum(v) / len(v) if v else math.nan) for m, v in per_query.items()}


# ------------------------------------------------------------------------------------------------
# values against the loop, closed forms, and the two ranking engines
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", ["max_bin_count", 4, None])
@pytest.mark.parametrize("includes", [False, True])
def test_all_metrics_match_loop(k: int | str | None, includes: bool) -> None:
    x, y = grid_data(150, 7, dim=3, seed=9)
    query, q_labels = x[:60], y[:60]
    ref, r_labels = (x, y) if includes else (x[60:], y[60:])
    expected = loop_metrics(query, q_labels, ref, r_labels, includes, k)
    calc = ours(k=k, include=evaluation.KNN_METRICS)
    got = calc.get_accuracy(query, q_labels, ref, r_labels, ref_includes_query=includes)
    assert_metrics_equal(got, {m: expected[m] for m in got}, rtol=1e-12)


def test_perfect_retrieval_scores_one() -> None:
    labels = torch.arange(6).repeat_interleave(5)
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0)) * 0.01
    x = x + 100.0 * torch.eye(8)[labels]  # far-apart, tight clusters
    calc = ours(include=evaluation.ALL_METRICS, kmeans_func=lambda emb, n: labels.clone())
    result = calc.get_accuracy(x, labels)
    for name, value in result.items():
        assert value == pytest.approx(1.0), name


def test_hand_computed_one_dimensional_case() -> None:
    # references on a line; the query at 0 has label 1: order 0.9(b), 1.1(a), 2.0(a), 5.0(b)
    reference = torch.tensor([[1.1], [2.0], [0.9], [5.0]], dtype=torch.float64)
    ref_labels = torch.tensor([1, 1, 2, 2])
    query, q_labels = torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1])
    result = ours(include=evaluation.KNN_METRICS).get_accuracy(
        query, q_labels, reference, ref_labels
    )
    # ranks of the positives: 2 and 3; R = 2, k = 4
    assert result["precision_at_1"] == 0.0
    assert result["r_precision"] == pytest.approx(0.5)
    assert result["mean_average_precision_at_r"] == pytest.approx((1 / 2) / 2)
    assert result["mean_average_precision"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result["mean_reciprocal_rank"] == pytest.approx(0.5)
    assert [result[f"recall_at_{k}"] for k in (1, 2, 4, 8)] == [0.0, 1.0, 1.0, 1.0]


def test_metrics_from_ranks_closed_form() -> None:
    ranks = torch.tensor([[1.0, 2.0, math.inf], [3.0, 5.0, 6.0]])
    got = metrics_from_ranks(ranks, torch.tensor([2, 3]), k=5, recall_ks=(1, 4))
    assert got["precision_at_1"].tolist() == [1.0, 0.0]
    assert got["r_precision"].tolist() == pytest.approx([1.0, 1 / 3])
    assert got["mean_average_precision_at_r"].tolist() == pytest.approx([1.0, (1 / 3) / 3])
    assert got["mean_average_precision"].tolist() == pytest.approx([1.0, (1 / 3 + 2 / 5) / 3])
    assert got["mean_reciprocal_rank"].tolist() == pytest.approx([1.0, 1 / 3])
    assert got["recall_at_4"].tolist() == [1.0, 1.0]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 64),
    n_classes=st.integers(1, 64),
    log2_scale=st.sampled_from([-13, 0, 10]),
    k=st.sampled_from(["max_bin_count", None, 1, 3]),
    seed=st.integers(0, 2**16),
)
def test_metrics_hypothesis(
    n: int, n_classes: int, log2_scale: int, k: int | str | None, seed: int
) -> None:
    """One class, all classes distinct (every query lone: nan), duplicates, extreme scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (n, 2), generator=g).double() * 2.0**log2_scale
    y = torch.randint(0, n_classes, (n,), generator=g) if n_classes < n else torch.arange(n)
    expected = loop_metrics(x, y, x, y, True, k)
    got = ours(k=k, include=evaluation.KNN_METRICS).get_accuracy(x, y)
    assert_metrics_equal(got, expected, rtol=1e-12)
    if n_classes == 1 and n > 1:  # every neighbour is a positive
        assert got["precision_at_1"] == got["r_precision"] == got["recall_at_1"] == 1.0
