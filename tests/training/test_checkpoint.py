"""Checkpoints (:mod:`deepmetric.training.checkpoint`): loaded with weights only, the best chosen on
validation, atomic saves, truncated or missing files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from deepmetric.training import atomic_save, load_checkpoint
from tests.training.trainer_cases import _trainer


def test_checkpoints_load_with_weights_only_and_best_is_chosen_on_validation(
    tmp_path: Path,
) -> None:
    trainer = _trainer(tmp_path, epochs=2)
    history = trainer.fit()
    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / name, weights_only=True)
        assert state["version"] == 1
    best = load_checkpoint(tmp_path / "best.pt")
    best_epoch = max(history, key=lambda r: r["val_mean_average_precision_at_r"])["epoch"]
    assert best["epoch"] == best_epoch


def test_atomic_save_keeps_the_previous_file_on_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"version": 1, "value": torch.tensor(1.0)}, path)

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_save({"version": 1, "value": torch.tensor(2.0)}, path)
    monkeypatch.undo()
    assert float(load_checkpoint(path)["value"]) == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_truncated_or_missing_checkpoint_is_a_value_error(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, epochs=1)
    trainer.fit(max_steps=1)
    blob = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "broken.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
