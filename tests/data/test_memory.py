"""Datasets held in memory (:mod:`deepmetric.data.memory`): the built-in digits and Omniglot,
arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepmetric import data


def test_digits() -> None:
    digits = data.load_digits()
    assert digits.x.shape == (1797, 1, 8, 8)
    assert float(digits.x.min()) >= 0 and float(digits.x.max()) <= 1
    assert sorted(set(digits.labels.tolist())) == list(range(10))


def test_omniglot_background_and_runs() -> None:
    omniglot = data.load_omniglot(size=28)
    assert omniglot.x.shape == (4840, 1, 28, 28)
    counts = np.bincount(omniglot.labels.numpy())
    assert len(counts) == 242 and set(counts.tolist()) == {20}
    assert omniglot.class_names[0] == "Balinese/character01"
    runs = data.load_omniglot_runs(size=28)
    assert len(runs) == 20
    for run in runs:
        assert run.support.shape == run.query.shape == (20, 1, 28, 28)
        assert sorted(run.query_labels.tolist()) == list(range(20))
    # strokes are bright on a dark background
    assert float(omniglot.x.mean()) < 0.3


def test_arrays(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (6, 5, 5), dtype=np.uint8)
    y = np.array([0, 0, 1, 1, 2, 2])
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    ds = data.load_arrays(tmp_path / "d.npz")
    assert ds.x.shape == (6, 1, 5, 5) and float(ds.x.max()) <= 1.0
    np.save(tmp_path / "f.npy", np.ones((6, 3), dtype=np.float32))
    np.save(tmp_path / "y.npy", y)
    assert data.load_arrays(tmp_path / "f.npy", tmp_path / "y.npy").x.shape == (6, 3)
    np.save(tmp_path / "yf.npy", y.astype(float))
    with pytest.raises(ValueError, match="integers"):
        data.load_arrays(tmp_path / "f.npy", tmp_path / "yf.npy")
    with pytest.raises(ValueError, match="labels_path"):
        data.load_arrays(tmp_path / "f.npy")
