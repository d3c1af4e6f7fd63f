"""The pairwise matrix (:mod:`deepmetric.pairwise.matrix`): a margin decided before the square
root."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmetric import pairwise


@settings(max_examples=100, deadline=None)
@given(
    bound=st.one_of(
        st.floats(min_value=-2.0, max_value=1e30, allow_nan=False),
        st.sampled_from([0.0, 1.0, 0.2, 0.8, 1e-30, 1e-45, float("inf")]),
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_root_bound_decides_a_margin_before_the_square_root(
    bound: float, dtype: torch.dtype, seed: int
) -> None:
    """sqrt(x) < bound exactly when x < root_bound(bound): on the floats next to the bound on
    either side, and on random ones."""
    threshold = pairwise.root_bound(bound, dtype)
    inf = torch.tensor(float("inf"), dtype=dtype)
    near = [torch.tensor(threshold, dtype=dtype)]
    for step in (inf, -inf):
        x = near[0]
        for _ in range(40):
            x = torch.nextafter(x, step)
            near.append(x)
    g = torch.Generator().manual_seed(seed)
    scale = max(abs(threshold), 1e-30) if threshold != float("inf") else 1e30
    spread = torch.rand(200, generator=g, dtype=torch.float64) * 2 * scale
    x = torch.cat([torch.stack(near), spread.to(dtype)]).clamp_min(0)
    x = x[torch.isfinite(x)]
    torch.testing.assert_close(torch.sqrt(x) < bound, x < threshold, rtol=0, atol=0)


def test_matrix_to_unit_reference_against_a_loop() -> None:
    """Each entry is the distance of one query row to one unit column, computed pair by pair;
    the inner-product shortcut and the general call agree with it."""
    from deepmetric.distances import CosineSimilarity, DotProductSimilarity, LpDistance

    g = torch.Generator().manual_seed(3)
    query = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    columns = torch.randn(5, 4, generator=g, dtype=torch.float64)
    unit = columns / columns.norm(dim=0, keepdim=True)
    cases = {
        "cosine": (CosineSimilarity(), lambda q, r: q @ r / q.norm()),
        "dot, raw": (DotProductSimilarity(normalize_embeddings=False), lambda q, r: q @ r),
        "euclidean": (LpDistance(), lambda q, r: (q / q.norm() - r).norm()),
        "l1, raw": (
            LpDistance(p=1, normalize_embeddings=False),
            lambda q, r: (q - r).abs().sum(),
        ),
    }
    for name, (distance, pair) in cases.items():
        expected = torch.tensor(
            [[float(pair(q, unit[:, c])) for c in range(unit.shape[1])] for q in query],
            dtype=torch.float64,
        )
        got = pairwise.matrix_to_unit_reference(distance, query, unit)
        torch.testing.assert_close(got, expected, msg=name)
