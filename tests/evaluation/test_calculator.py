"""AccuracyCalculator (:mod:`deepmetric.evaluation.calculator`) against PML's: every mode, self
retrieval, separate references, per-class averages, custom label comparison, custom k-NN and
k-means, include/exclude, missing labels, blocked searches, clamped k, input types, bad
arguments."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import (
    AccuracyCalculator as PMLAccuracyCalculator,
)
from pytorch_metric_learning.utils.inference import FaissKNN
from torch import Tensor

from deepmetric import evaluation
from deepmetric.evaluation import AccuracyCalculator
from tests.evaluation.evaluation_cases import CPU, assert_metrics_equal, blocks_of, grid_data, ours

RETRIEVAL = [m for m in evaluation.DEFAULT_METRICS if m not in ("NMI", "AMI")]


def pml(**kwargs: Any) -> PMLAccuracyCalculator:
    return PMLAccuracyCalculator(device=CPU, **kwargs)


@pytest.mark.parametrize("engine", ["faiss", "torch"])
def test_every_mode_matches_pml_with_either_engine(engine: str) -> None:
    """Self-retrieval, references that include the queries, separate references."""
    x, y = grid_data(600, 30, seed=23)
    kwargs = {"k": "max_bin_count", "exclude": ("NMI", "AMI")}
    calc = ours(engine=engine, chunk_size=128, **kwargs)
    assert_metrics_equal(calc.get_accuracy(x, y), pml(**kwargs).get_accuracy(x, y))
    q, qy = x[:200], y[:200]
    expected = pml(**kwargs).get_accuracy(q, qy, x, y, ref_includes_query=True)
    assert_metrics_equal(calc.get_accuracy(q, qy, x, y, ref_includes_query=True), expected)
    expected = pml(**kwargs).get_accuracy(q, qy, x[200:], y[200:])
    assert_metrics_equal(calc.get_accuracy(q, qy, x[200:], y[200:]), expected)


# ------------------------------------------------------------------------------------------------
# values against PML
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [60, 400, 1000])
@pytest.mark.parametrize("k", ["max_bin_count", 5, None])
def test_self_retrieval_matches_pml(n: int, k: int | str | None) -> None:
    x, y = grid_data(n, max(3, n // 20), seed=n)
    expected = pml(k=k).get_accuracy(x, y)
    assert_metrics_equal(ours(k=k).get_accuracy(x, y), expected)
    # the same through an explicit reference that starts with the queries, with extra references
    extra_x, extra_y = grid_data(n // 3, max(3, n // 20), seed=n + 1)
    ref, ref_y = torch.cat([x, extra_x]), torch.cat([y, extra_y])
    expected = pml(k=k).get_accuracy(x, y, ref, ref_y, ref_includes_query=True)
    got = ours(k=k).get_accuracy(x, y, ref, ref_y, ref_includes_query=True)
    assert_metrics_equal(got, expected)


@pytest.mark.parametrize("n", [100, 1200])
@pytest.mark.parametrize("k", ["max_bin_count", 3, None])
def test_separate_reference_matches_pml(n: int, k: int | str | None) -> None:
    x, y = grid_data(n, 12, seed=7 + n)
    query, q_labels, ref, r_labels = x[: n // 3], y[: n // 3], x[n // 3 :], y[n // 3 :]
    q_labels = q_labels.clone()
    q_labels[:5] = 99  # labels absent from the reference: these queries are left out
    expected = pml(k=k).get_accuracy(query, q_labels, ref, r_labels)
    assert_metrics_equal(ours(k=k).get_accuracy(query, q_labels, ref, r_labels), expected)


@pytest.mark.parametrize("flag", ["avg_of_avgs", "return_per_class"])
def test_per_class_averages_match_pml(flag: str) -> None:
    x, y = grid_data(500, 9, seed=3)
    y[:4] = 50  # one class with 4 members, one lone query
    y[4] = 51
    kwargs = {flag: True, "k": "max_bin_count", "exclude": ("NMI", "AMI")}
    assert_metrics_equal(ours(**kwargs).get_accuracy(x, y), pml(**kwargs).get_accuracy(x, y))


def test_float32_continuous_data_matches_pml() -> None:
    torch.manual_seed(1)
    labels = torch.randint(0, 30, (2000,))
    x = torch.randn(30, 32)[labels] + 0.8 * torch.randn(2000, 32)
    for k in ("max_bin_count", None):
        # rounding may swap two nearly equidistant neighbours (faiss vs one matrix product)
        got, expected = ours(k=k).get_accuracy(x, labels), pml(k=k).get_accuracy(x, labels)
        assert_metrics_equal(got, expected, rtol=1e-5)


def test_custom_label_comparison_matches_pml() -> None:
    x, y = grid_data(300, 10, seed=5)

    def same_pair(a: Tensor, b: Tensor) -> Tensor:
        return torch.div(a, 2, rounding_mode="floor") == torch.div(b, 2, rounding_mode="floor")

    kwargs = {"exclude": ("NMI", "AMI"), "label_comparison_fn": same_pair}
    for k in ("max_bin_count", None):
        expected = pml(k=k, **kwargs).get_accuracy(x[:100], y[:100], x[100:], y[100:])
        got = ours(k=k, **kwargs).get_accuracy(x[:100], y[:100], x[100:], y[100:])
        assert_metrics_equal(got, expected)


def test_custom_knn_and_kmeans_functions_are_used() -> None:
    x, y = grid_data(300, 6, seed=11)
    with_faiss = ours(k="max_bin_count", knn_func=FaissKNN()).get_accuracy(x, y)
    assert_metrics_equal(with_faiss, pml(k="max_bin_count").get_accuracy(x, y))
    calls: list[int] = []

    def label_oracle(embeddings: Tensor, n_clusters: int) -> Tensor:
        calls.append(n_clusters)
        return y.clone()

    result = ours(include=("NMI", "AMI"), kmeans_func=label_oracle).get_accuracy(x, y)
    assert calls == [6]
    assert result == {"NMI": pytest.approx(1.0), "AMI": pytest.approx(1.0)}


def test_include_exclude_and_key_order_match_pml() -> None:
    x, y = grid_data(200, 5, seed=2)
    for include, exclude in (((), ()), (("r_precision", "NMI"), ()), ((), ("AMI", "NMI"))):
        theirs = pml(include=include, exclude=exclude).get_accuracy(x, y)
        got = ours(include=include, exclude=exclude).get_accuracy(x, y)
        assert list(got) == list(theirs)
        assert_metrics_equal(got, theirs)
    calc = ours()
    got = calc.get_accuracy(x, y, include=("precision_at_1", "AMI"))
    assert list(got) == ["AMI", "precision_at_1"]
    assert calc.get_curr_metrics() == ["AMI", "precision_at_1"]
    # mean_reciprocal_rank alone (PML 2.9.0 raises a KeyError here)
    only_mrr = ours(include=("mean_reciprocal_rank",)).get_accuracy(x, y)
    assert only_mrr["mean_reciprocal_rank"] == pytest.approx(
        pml().get_accuracy(x, y)["mean_reciprocal_rank"], rel=1e-6
    )


def test_no_query_label_in_reference_gives_nan_like_pml() -> None:
    x, y = grid_data(60, 3, seed=4)
    for flag in (False, True):
        kwargs = {"exclude": ("NMI", "AMI"), "return_per_class": flag}
        theirs = pml(**kwargs).get_accuracy(x[:20], y[:20] + 10, x[20:], y[20:])
        got = ours(**kwargs).get_accuracy(x[:20], y[:20] + 10, x[20:], y[20:])
        assert list(got) == list(theirs)
        for name in theirs:
            np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(theirs[name]))
            assert np.isnan(got[name]).all()


def test_blocked_and_whole_searches_agree_in_the_calculator() -> None:
    x, y = grid_data(900, 15, seed=13, spread=1)
    kwargs = {"k": "max_bin_count", "include": evaluation.KNN_METRICS}
    whole = ours(**kwargs).get_accuracy(x, y)
    with blocks_of(2000, 8):  # 8 queries × 250 references per block
        assert_metrics_equal(ours(**kwargs).get_accuracy(x, y), whole, rtol=1e-12)
        separate = ours(**kwargs).get_accuracy(x[:300], y[:300], x[300:], y[300:])
    expected = ours(**kwargs).get_accuracy(x[:300], y[:300], x[300:], y[300:])
    assert_metrics_equal(separate, expected, rtol=1e-12)


def test_k_larger_than_reference_is_clamped() -> None:
    x, y = grid_data(80, 4, seed=6)
    assert_metrics_equal(
        ours(k=1000, exclude=("NMI", "AMI")).get_accuracy(x, y),
        ours(k=None, exclude=("NMI", "AMI")).get_accuracy(x, y),
        rtol=1e-12,
    )


def test_numpy_and_float32_inputs() -> None:
    x, y = grid_data(200, 5, seed=8)
    expected = ours(k="max_bin_count").get_accuracy(x, y)
    assert_metrics_equal(ours(k="max_bin_count").get_accuracy(x.numpy(), y.numpy()), expected)
    assert_metrics_equal(ours(k="max_bin_count").get_accuracy(x.float(), y.int()), expected)


def test_invalid_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        AccuracyCalculator(include=("precision_at_2",))
    with pytest.raises(TypeError):
        AccuracyCalculator(include="NMI")
    with pytest.raises(ValueError):
        AccuracyCalculator(avg_of_avgs=True, return_per_class=True)
    with pytest.raises(ValueError):
        AccuracyCalculator(k="all")
    with pytest.raises(ValueError):
        AccuracyCalculator(engine="annoy")  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError):
        AccuracyCalculator(label_comparison_fn=torch.eq)  # with NMI/AMI, as in PML

    class CustomMetric(AccuracyCalculator):
        def calculate_fancy(self, **kwargs: Any) -> float:
            return 0.0

    with pytest.raises(NotImplementedError):
        CustomMetric()
