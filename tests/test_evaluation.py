"""Retrieval and clustering metrics: against PML's AccuracyCalculator, a slow loop written
here, closed-form cases, and the streamed top-k against a full sort (ties included).

Most data lie on an integer grid (scaled by powers of two): every squared distance is then exact
in float32, so rankings, ties included, are the same for every method and chunk size."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.utils.accuracy_calculator import (
    AccuracyCalculator as PMLAccuracyCalculator,
)
from pytorch_metric_learning.utils.inference import FaissKNN
from torch import Tensor

from deepmetric import evaluation
from deepmetric.evaluation import AccuracyCalculator, knn, metrics_from_ranks, nearest_neighbors

CPU = torch.device("cpu")
RETRIEVAL = [m for m in evaluation.DEFAULT_METRICS if m not in ("NMI", "AMI")]


def grid_data(
    n: int, n_classes: int, dim: int = 4, seed: int = 0, spread: int = 2
) -> tuple[Tensor, Tensor]:
    """Integer-valued clustered embeddings (float64) and their labels: many exact ties."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    centers = torch.randint(-6, 7, (n_classes, dim), generator=g)
    noise = torch.randint(-spread, spread + 1, (n, dim), generator=g)
    return (centers[labels] + noise).double(), labels


# ------------------------------------------------------------------------------------------------
# slow, obvious reference implementations
# ------------------------------------------------------------------------------------------------
def full_sort_knn(
    query: Tensor, reference: Tensor, k: int, ref_includes_query: bool
) -> tuple[Tensor, Tensor]:
    """Exact squared distances (float64), query itself removed, stable sort: ties by index."""
    dist = ((query.double()[:, None, :] - reference.double()[None, :, :]) ** 2).sum(-1)
    if ref_includes_query:
        idx = torch.arange(len(query))
        dist[idx, idx] = math.inf
    order = torch.argsort(dist, dim=1, stable=True)[:, :k]
    return dist.gather(1, order), order


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


def assert_metrics_equal(
    ours: dict[str, Any], expected: dict[str, Any], rtol: float = 1e-10
) -> None:
    assert set(ours) == set(expected), (set(ours), set(expected))
    for name, value in expected.items():
        got, want = np.asarray(ours[name], dtype=float), np.asarray(value, dtype=float)
        tol = 1e-6 if name == "mean_reciprocal_rank" else rtol  # PML: MRR in float32
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)


def pml(**kwargs: Any) -> PMLAccuracyCalculator:
    return PMLAccuracyCalculator(device=CPU, **kwargs)


def ours(**kwargs: Any) -> AccuracyCalculator:
    return AccuracyCalculator(device=CPU, **kwargs)


# ------------------------------------------------------------------------------------------------
# exact nearest neighbours
# ------------------------------------------------------------------------------------------------
#: (distances per block, least queries per block) of the torch engine: 1 × 1 blocks, a few
#: queries × 16 references (several reference blocks merged), and the default (one block).
BLOCKS = [(1, 1), (64, 4), (600, 8), (evaluation.BLOCK_ENTRIES, 256)]


@contextmanager
def blocks_of(entries: int, min_queries: int) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation.neighbors, "BLOCK_ENTRIES", entries)
        patch.setattr(evaluation.neighbors, "_MIN_BLOCK_QUERIES", min_queries)
        yield


@pytest.mark.parametrize("blocks", BLOCKS)
def test_knn_equals_full_sort_with_ties(blocks: tuple[int, int]) -> None:
    n = 40 if blocks[0] == 1 else 300
    x, _ = grid_data(n, 5, dim=3, spread=1)  # few distinct points: ties and duplicates
    for k in (1, 7, n - 1):
        with blocks_of(*blocks):
            dist, idx = knn(x, k)
        want_dist, want_idx = full_sort_knn(x, x, k, ref_includes_query=True)
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(dist.double(), want_dist)


@pytest.mark.parametrize("engine", ["faiss", "torch"])
@pytest.mark.parametrize("blocks", BLOCKS[1:])
def test_knn_separate_and_including_references(blocks: tuple[int, int], engine: str) -> None:
    x, _ = grid_data(100, 4, dim=2, seed=1, spread=1)
    query, extra = x[:30], x[30:]
    for reference, includes in ((extra, False), (x, True)):
        for k in (1, 5, len(reference) - int(includes)):
            with blocks_of(*blocks):
                dist, idx = knn(query, k, reference, includes, engine=engine)
            want_dist, want_idx = full_sort_knn(query, reference, k, includes)
            assert torch.equal(idx, want_idx)
            torch.testing.assert_close(dist.double(), want_dist)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30),
    m=st.integers(1, 30),
    levels=st.integers(1, 5),
    data=st.data(),
)
def test_smallest_per_row_equals_a_stable_sort(
    n: int, m: int, levels: int, data: st.DataObject
) -> None:
    """The k smallest of each row, ties (few levels: many) to the smaller column."""
    k = data.draw(st.integers(1, m))
    seed = data.draw(st.integers(0, 2**16))
    scores = torch.randint(0, levels, (n, m), generator=torch.Generator().manual_seed(seed))
    values, columns = evaluation.neighbors.smallest_per_row(scores.float(), k)
    want_values, want_columns = scores.float().sort(dim=1, stable=True)
    assert torch.equal(columns, want_columns[:, :k])
    assert torch.equal(values, want_values[:, :k])


@pytest.mark.parametrize("n_extra", [0, 37])
def test_topk_keys_decode_to_the_full_sort(n_extra: int) -> None:
    x, _ = grid_data(260 + n_extra, 9, dim=3, seed=21, spread=1)
    query = x[:260]
    for reference, includes in ((x, True), (x[100:], False)):
        k = 13
        keys = torch.empty(260, k, dtype=torch.int64)
        for ids, block_keys in evaluation.topk_key_chunks(
            query.float(), reference.float(), k, includes
        ):
            keys[ids] = block_keys
        want_dist, want_idx = full_sort_knn(query, reference, k, includes)
        assert torch.equal(keys & 0xFFFFFFFF, want_idx)
        assert torch.equal((keys >> 32).int().view(torch.float32).double(), want_dist)


@pytest.mark.parametrize("engine", ["faiss", "torch"])
def test_knn_random_float32_matches_sort_and_pml_faiss(engine: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(700, 16)
    with blocks_of(4096, 64):  # 64 queries × 64 references per block
        dist, idx = knn(x, 10, engine=engine)
    _, want_idx = full_sort_knn(x, x, 10, True)
    assert torch.equal(idx, want_idx)
    faiss_dist, faiss_idx = FaissKNN()(x, 10, x, True)
    assert torch.equal(idx, faiss_idx)
    torch.testing.assert_close(dist, faiss_dist, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    n_query=st.integers(1, 64),
    n_extra=st.integers(0, 20),
    dim=st.integers(1, 4),
    levels=st.integers(1, 4),
    log2_scale=st.sampled_from([-13, 0, 10]),
    blocks=st.sampled_from(BLOCKS),
    includes=st.booleans(),
    engine=st.sampled_from(["faiss", "torch"]),
    data=st.data(),
)
def test_knn_hypothesis(
    n_query: int,
    n_extra: int,
    dim: int,
    levels: int,
    log2_scale: int,
    blocks: tuple[int, int],
    includes: bool,
    engine: str,
    data: st.DataObject,
) -> None:
    """Duplicates, one point, extreme scales (2**-13 ~ 1e-4, 2**10 ~ 1e3): always the sort."""
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    n_ref = n_query + n_extra if includes else max(1, n_extra)
    reference = torch.randint(0, levels, (n_ref, dim), generator=g).float() * 2.0**log2_scale
    other = torch.randint(0, levels, (n_query, dim), generator=g).float() * 2.0**log2_scale
    query = reference[:n_query] if includes else other
    available = n_ref - int(includes)
    if available < 1:
        return
    k = data.draw(st.integers(1, available))
    with blocks_of(*blocks):
        dist, idx = knn(query, k, reference, includes, engine=engine)
    want_dist, want_idx = full_sort_knn(query, reference, k, includes)
    assert torch.equal(idx, want_idx)
    assert torch.isfinite(dist).all()
    torch.testing.assert_close(dist.double(), want_dist)


@pytest.mark.parametrize("engine", ["faiss", "torch"])
def test_identical_points_exclude_only_the_query_itself(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every point the same: each query's neighbours are all the others by index, itself left
    out even where more than k + 1 duplicates rank before it (the faiss engine then searches
    k + 1 without finding it). Small blocks and results: many of them."""
    monkeypatch.setattr(evaluation.neighbors, "FAISS_RESULT_BYTES", 12 * 8)
    x = torch.ones(50, 3)
    for k in (1, 6, 49):
        with blocks_of(64, 4):
            dist, idx = nearest_neighbors(x, x, k, exclude_self=True, engine=engine)
        others = torch.arange(50).repeat(50, 1)
        want = others[others != torch.arange(50).unsqueeze(1)].view(50, 49)[:, :k]
        assert torch.equal(idx, want)
        assert torch.equal(dist, torch.zeros(50, k))


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("blocks", BLOCKS[1:])
def test_inner_product_neighbours_equal_a_stable_sort(
    exclude_self: bool, blocks: tuple[int, int]
) -> None:
    """Largest inner product first, ties by the smaller index (integer data: exact ties). The
    faiss engine does not rank inner products (its ties follow no rule)."""
    x, _ = grid_data(120, 4, dim=3, seed=17, spread=1)
    query = x[:40]
    reference = x if exclude_self else x[40:]
    scores = query @ reference.T
    if exclude_self:
        scores[torch.arange(40), torch.arange(40)] = -math.inf
    for k in (1, 9, len(reference) - int(exclude_self)):
        with blocks_of(*blocks):
            got_scores, got_idx = nearest_neighbors(
                query, reference, k, exclude_self=exclude_self, metric="inner_product"
            )
        want_idx = torch.argsort(-scores, dim=1, stable=True)[:, :k]
        assert torch.equal(got_idx, want_idx)
        torch.testing.assert_close(got_scores.double(), scores.gather(1, want_idx))


def test_engines_agree_on_numpy_float64_input() -> None:
    x, _ = grid_data(300, 7, dim=5, seed=19)
    by_faiss = nearest_neighbors(x.numpy(), x.numpy(), 12, exclude_self=True, engine="faiss")
    by_torch = nearest_neighbors(x, x, 12, exclude_self=True, engine="torch")
    assert torch.equal(by_faiss[1], by_torch[1])
    assert by_faiss[0].dtype == torch.float32  # faiss ranks in float32
    assert by_torch[0].dtype == torch.float64  # float64 stays float64
    assert torch.equal(by_faiss[0].double(), by_torch[0])  # integer data: exact in both


def test_float64_is_ranked_in_float64() -> None:
    """1 + 1e-8 is 1 in float32: a tie (the smaller index first) there, farther in float64."""
    reference = torch.tensor([[1 + 1e-8], [1.0]], dtype=torch.float64)
    query = torch.zeros(1, 1, dtype=torch.float64)
    assert nearest_neighbors(query, reference, 2)[1].tolist() == [[1, 0]]
    assert nearest_neighbors(query.float(), reference.float(), 2)[1].tolist() == [[0, 1]]
    assert nearest_neighbors(query, reference, 2, engine="faiss")[1].tolist() == [[0, 1]]


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


def test_blocked_and_whole_searches_agree_in_the_calculator() -> None:
    x, y = grid_data(900, 15, seed=13, spread=1)
    kwargs = {"k": "max_bin_count", "include": evaluation.KNN_METRICS}
    whole = ours(**kwargs).get_accuracy(x, y)
    with blocks_of(2000, 8):  # 8 queries × 250 references per block
        assert_metrics_equal(ours(**kwargs).get_accuracy(x, y), whole, rtol=1e-12)
        separate = ours(**kwargs).get_accuracy(x[:300], y[:300], x[300:], y[300:])
    expected = ours(**kwargs).get_accuracy(x[:300], y[:300], x[300:], y[300:])
    assert_metrics_equal(separate, expected, rtol=1e-12)


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


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def test_invalid_inputs_raise_value_error() -> None:
    x, y = grid_data(20, 3)
    calc = ours(exclude=("NMI", "AMI"))
    bad_calls = [
        lambda: calc.get_accuracy(x[0], y),  # 1-D embeddings
        lambda: calc.get_accuracy(x.long(), y),  # integer embeddings
        lambda: calc.get_accuracy(torch.full_like(x, math.nan), y),  # NaN
        lambda: calc.get_accuracy(x, y[:-1]),  # length mismatch
        lambda: calc.get_accuracy(x, y.double()),  # float labels
        lambda: calc.get_accuracy(x, y, x[:, :2], y),  # dimension mismatch
        lambda: calc.get_accuracy(x, y, x),  # reference without labels
        lambda: calc.get_accuracy(x, y, x + 1, y, ref_includes_query=True),  # not a prefix
        lambda: calc.get_accuracy(x[:0], y[:0]),  # empty
        lambda: calc.get_accuracy(x * 1e30, y),  # squared norms overflow float32
        lambda: knn(x, 20),  # k > number of other references
        lambda: nearest_neighbors(x, x, 3, metric="cosine"),  # unknown metric
        lambda: nearest_neighbors(x, x, 3, engine="annoy"),  # unknown engine
        lambda: nearest_neighbors(x, x, 3, metric="inner_product", engine="faiss"),
        lambda: nearest_neighbors(x, x, True),  # k not an int
        lambda: nearest_neighbors(x, x + 1, 3, exclude_self=True),  # not a prefix
        lambda: nearest_neighbors(x, x[:, :2], 3),  # dimension mismatch
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()


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


def test_row_squared_norms_in_chunks_equal_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1000, 7, generator=torch.Generator().manual_seed(0))
    # 16 chunks, the last one short
    monkeypatch.setattr(evaluation.neighbors, "NORM_CHUNK_ROWS", 64)
    assert torch.equal(evaluation.row_squared_norms(x), (x * x).sum(dim=1))
    assert evaluation.row_squared_norms(x[:0]).shape == (0,)
