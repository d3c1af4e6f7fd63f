"""Data, the calculator under test and comparisons shared by the evaluation tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from deepmetric import evaluation
from deepmetric.evaluation import AccuracyCalculator

CPU = torch.device("cpu")


def grid_data(
    n: int, n_classes: int, dim: int = 4, seed: int = 0, spread: int = 2
) -> tuple[Tensor, Tensor]:
    """Integer-valued clustered embeddings (float64) and their labels: many exact ties."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    centers = torch.randint(-6, 7, (n_classes, dim), generator=g)
    noise = torch.randint(-spread, spread + 1, (n, dim), generator=g)
    return (centers[labels] + noise).double(), labels


def assert_metrics_equal(
    ours: dict[str, Any], expected: dict[str, Any], rtol: float = 1e-10
) -> None:
    assert set(ours) == set(expected), (set(ours), set(expected))
    for name, value in expected.items():
        got, want = np.asarray(ours[name], dtype=float), np.asarray(value, dtype=float)
        tol = 1e-6 if name == "mean_reciprocal_rank" else rtol  # PML: MRR in float32
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)


def ours(**kwargs: Any) -> AccuracyCalculator:
    return AccuracyCalculator(device=CPU, **kwargs)


@contextmanager
def blocks_of(entries: int, min_queries: int) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation.neighbors, "BLOCK_ENTRIES", entries)
        patch.setattr(evaluation.neighbors, "_MIN_BLOCK_QUERIES", min_queries)
        yield
