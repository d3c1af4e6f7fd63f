"""Distances: values against direct computation and PML, finite gradients, half precision."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import distances as pml_distances

from deepmetric import distances


def _loop_lp(q: torch.Tensor, r: torch.Tensor, p: float) -> torch.Tensor:
    out = torch.empty(len(q), len(r), dtype=q.dtype)
    for i in range(len(q)):
        for j in range(len(r)):
            out[i, j] = (q[i] - r[j]).abs().pow(p).sum().pow(1 / p)
    return out


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_lp_distance_matches_loop_and_pml(p: float, power: float, normalize: bool) -> None:
    torch.manual_seed(0)
    q, r = torch.randn(7, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    ours = distances.LpDistance(normalize_embeddings=normalize, p=p, power=power)
    theirs = pml_distances.LpDistance(normalize_embeddings=normalize, p=p, power=power)
    qn, rn = (ours.normalize(q), ours.normalize(r)) if normalize else (q, r)
    expected = _loop_lp(qn, rn, p) ** power
    torch.testing.assert_close(ours(q, r), expected)
    torch.testing.assert_close(ours(q, r), theirs(q, r))
    torch.testing.assert_close(ours(q), theirs(q))
    # PML's pairwise_distance takes already-normalised rows and adds eps=1e-6 (F.pairwise_distance)
    pml_pairwise = theirs.pairwise_distance(
        theirs.maybe_normalize(q), theirs.maybe_normalize(r[:7])
    )
    torch.testing.assert_close(
        ours.pairwise_distance(q, r[:7]), pml_pairwise**power, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(ours.pairwise_distance(q, r[:7]), torch.diagonal(expected[:, :7]))


def test_similarities_match_pml() -> None:
    torch.manual_seed(1)
    q, r = torch.randn(6, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(
        distances.CosineSimilarity()(q, r), pml_distances.CosineSimilarity()(q, r)
    )
    torch.testing.assert_close(
        distances.DotProductSimilarity()(q, r), pml_distances.DotProductSimilarity()(q, r)
    )
    raw = distances.DotProductSimilarity(normalize_embeddings=False)
    torch.testing.assert_close(raw(q, r), q @ r.T)
    assert distances.CosineSimilarity().is_inverted
    assert not distances.LpDistance().is_inverted
    with pytest.raises(ValueError, match="always normalises"):
        distances.CosineSimilarity(normalize_embeddings=False)


def test_defaults_match_pml() -> None:
    for name in ["LpDistance", "CosineSimilarity", "DotProductSimilarity"]:
        ours, theirs = getattr(distances, name)(), getattr(pml_distances, name)()
        assert ours.normalize_embeddings == theirs.normalize_embeddings, name
        assert ours.p == theirs.p and ours.power == theirs.power, name
        assert ours.is_inverted == theirs.is_inverted, name


@pytest.mark.parametrize("normalize", [True, False])
def test_gradient_of_equal_embeddings_is_finite(normalize: bool) -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0]], requires_grad=True)
    mat = distances.LpDistance(normalize_embeddings=normalize)(x)
    mat.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert mat[0, 1] == 0 and mat[0, 0] == 0


def test_pairwise_gradient_of_equal_rows_is_finite() -> None:
    x = torch.ones(3, 4, requires_grad=True)
    y = torch.ones(3, 4)
    distances.LpDistance(normalize_embeddings=False).pairwise_distance(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    # large values overflow float16 when squared; the result must be exact in float32
    x = torch.tensor([[300.0, 0.0], [0.0, 300.0]], dtype=dtype, requires_grad=True)
    mat = distances.LpDistance(normalize_embeddings=False)(x)
    assert mat.dtype == torch.float32
    assert torch.isfinite(mat).all()
    torch.testing.assert_close(mat[0, 1], torch.tensor(300.0 * 2**0.5), rtol=1e-3, atol=0)
    mat.sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_small_margin_keeps_its_sign_in_half_precision() -> None:
    # d(a,p) < d(a,n) by a hair: in float16 arithmetic the two round to the same value
    a = torch.tensor([[0.0, 0.0]], dtype=torch.float16)
    p = torch.tensor([[1000.0, 0.0]], dtype=torch.float16)
    n = torch.tensor([[1000.0, 1.0]], dtype=torch.float16)
    dist = distances.LpDistance(normalize_embeddings=False)
    d_ap, d_an = dist(a, p)[0, 0], dist(a, n)[0, 0]
    assert d_an - d_ap > 0


def test_autocast_does_not_downcast() -> None:
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mat = distances.LpDistance()(x)
    assert mat.dtype == torch.float32
    torch.testing.assert_close(mat, distances.LpDistance()(x))


def test_bad_input_raises() -> None:
    dist = distances.LpDistance()
    with pytest.raises(ValueError, match="2-D"):
        dist(torch.randn(3))
    with pytest.raises(ValueError, match="NaN"):
        dist(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="floating"):
        dist(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dimension"):
        dist(torch.randn(2, 3), torch.randn(2, 4))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 20),
    d=st.integers(1, 8),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    duplicate=st.booleans(),
)
def test_euclidean_matches_cdist_and_has_finite_gradient(
    n: int, d: int, scale: float, duplicate: bool
) -> None:
    x = torch.randn(n, d, dtype=torch.float64) * scale
    if duplicate:
        x[-1] = x[0]
    x.requires_grad_(True)
    dist = distances.LpDistance(normalize_embeddings=False)
    mat = dist(x)
    expected = torch.cdist(x.detach(), x.detach())
    torch.testing.assert_close(mat.detach(), expected, rtol=1e-6, atol=1e-6 * scale)
    mat.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_hand_written_euclidean_backward_passes_gradcheck(normalize: bool) -> None:
    torch.manual_seed(2)
    q = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    dist = distances.LpDistance(normalize_embeddings=normalize)
    assert torch.autograd.gradcheck(lambda a, b: dist(a, b), (q, r))


def test_self_distance_gradient_matches_direct_differences() -> None:
    torch.manual_seed(3)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(7, 7, dtype=torch.float64)
    (distances.LpDistance(normalize_embeddings=False)(x) * weights).sum().backward()
    assert x.grad is not None
    ours = x.grad.clone()
    x.grad = None
    eye = torch.eye(7, dtype=torch.float64)
    direct = torch.sqrt(((x[:, None] - x[None]) ** 2).sum(-1) + eye) * (1 - eye)
    (direct * weights).sum().backward()
    torch.testing.assert_close(ours, x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [0, 1])
def test_l2_normalize_matches_f_normalize_with_first_and_second_derivatives(dim: int) -> None:
    """The hand-written backward of the distances' L2 normalisation against torch's
    ``F.normalize``: same values and gradients (also for a zero row and one below the norm
    floor, where the gradient is grad / eps), and gradcheck / gradgradcheck."""
    from deepmetric.distances import l2_normalize

    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    index = (slice(None), 1) if dim == 0 else (1,)
    x[index] = 0
    x[(slice(None), 2) if dim == 0 else (2,)] = 1e-14
    grad = torch.randn(6, 5, dtype=torch.float64)
    results = []
    for fn in (l2_normalize, torch.nn.functional.normalize):
        leaf = x.clone().requires_grad_(True)
        out = fn(leaf, dim=dim)
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=0)
    smooth = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: l2_normalize(t, dim), (smooth,))
    assert torch.autograd.gradgradcheck(lambda t: l2_normalize(t, dim), (smooth,))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_snr_distance_matches_a_loop_of_variances_and_pml(normalize: bool, power: float) -> None:
    g = torch.Generator().manual_seed(5)
    query = torch.randn(7, 6, generator=g, dtype=torch.float64)
    ref = torch.randn(5, 6, generator=g, dtype=torch.float64) * 2 + 0.5
    ours = distances.SNRDistance(normalize_embeddings=normalize, power=power)
    theirs = pml_distances.SNRDistance(normalize_embeddings=normalize, power=power)
    q = torch.nn.functional.normalize(query, dim=1) if normalize else query
    r = torch.nn.functional.normalize(ref, dim=1) if normalize else ref
    loop = torch.tensor(
        [
            [float(torch.var(r[j] - q[i]) / torch.var(q[i])) ** power for j in range(5)]
            for i in range(7)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(ours(query, ref), loop, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours(query, ref), theirs(query, ref), rtol=1e-10, atol=1e-12)
    # (PML's pairwise_distance neither normalises nor raises to the power; deepmetric's does both)
    torch.testing.assert_close(
        ours.pairwise_distance(query[:5], ref), theirs.pairwise_distance(q[:5], r) ** power
    )
    # gradients of the matrix, against PML's (which forms every difference)
    grads = []
    for distance in (ours, theirs):
        x = query.clone().requires_grad_(True)
        y = ref.clone().requires_grad_(True)
        (distance(x, y) * torch.arange(35.0, dtype=torch.float64).view(7, 5)).sum().backward()
        grads.append((x.grad, y.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_snr_distance_is_not_symmetric_and_zero_on_the_diagonal() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)
    mat = distances.SNRDistance()(x)
    assert not torch.allclose(mat, mat.t())
    torch.testing.assert_close(
        mat.diagonal(), torch.zeros(6, dtype=torch.float64), atol=1e-14, rtol=0
    )
