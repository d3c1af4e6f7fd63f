"""Exact nearest neighbours (:mod:`deepmetric.evaluation.neighbors`) against a full stable sort
and PML's faiss search: ties, separate and including references, blocks, inner products,
float64, engines, row norms, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.utils.inference import FaissKNN
from torch import Tensor

from deepmetric import evaluation
from deepmetric.evaluation import knn, nearest_neighbors
from tests.evaluation.evaluation_cases import blocks_of, grid_data, ours


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


# ------------------------------------------------------------------------------------------------
# exact nearest neighbours
# ------------------------------------------------------------------------------------------------
#: (distances per block, least queries per block) of the torch engine: 1 × 1 blocks, a few
#: queries × 16 references (several reference blocks merged), and the default (one block).
BLOCKS = [(1, 1), (64, 4), (600, 8), (evaluation.BLOCK_ENTRIES, 256)]


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


def test_row_squared_norms_in_chunks_equal_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1000, 7, generator=torch.Generator().manual_seed(0))
    # 16 chunks, the last one short
    monkeypatch.setattr(evaluation.neighbors, "NORM_CHUNK_ROWS", 64)
    assert torch.equal(evaluation.row_squared_norms(x), (x * x).sum(dim=1))
    assert evaluation.row_squared_norms(x[:0]).shape == (0,)
