"""Trainer: exact resume, safe checkpoints, metrics log, early stopping, loss parameters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from deepmetric import data, losses, miners, models
from deepmetric.training import TrainConfig, Trainer, atomic_save, load_checkpoint


def _digits(classes: range) -> data.ArrayDataset:
    digits = data.load_digits()
    keep = torch.isin(digits.labels, torch.tensor(list(classes)))
    return digits.subset(torch.where(keep)[0])


def _model() -> models.EmbeddingNet:
    return models.EmbeddingNet(models.SmallConvNet(1, channels=8, blocks=2), 8, embedding_size=16)


def _trainer(run_dir: Path | None, epochs: int = 3, **kwargs) -> Trainer:
    torch.manual_seed(0)
    options = {"p": 4, "k": 8, "lr": 3e-3, "progress": False, **kwargs}
    config = TrainConfig(epochs=epochs, **options)
    return Trainer(
        _model(),
        losses.TripletMarginLoss(margin=0.2),
        _digits(range(6)),
        config,
        val_set=_digits(range(6, 10)),
        miner=miners.MultiSimilarityMiner(),
        run_dir=run_dir,
    )


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.state_dict().values()]


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path: Path) -> None:
    straight = _trainer(tmp_path / "straight")
    straight.fit()

    first = _trainer(tmp_path / "resumed")
    steps_per_epoch = len(first.sampler)
    first.fit(max_steps=steps_per_epoch + 3)  # stops in the middle of epoch 2
    assert first.step == steps_per_epoch + 3
    del first
    second = _trainer(tmp_path / "resumed")  # a fresh process would do exactly this
    history = second.fit()

    assert second.step == straight.step
    for a, b in zip(_weights(straight), _weights(second), strict=True):
        assert torch.equal(a, b)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[-1])["val_precision_at_1"] == pytest.approx(
        straight.history[-1]["val_precision_at_1"]
    )


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


def test_early_stopping_stops_after_patience(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, epochs=30, patience=1, lr=1e-6)
    history = trainer.fit()
    assert len(history) < 30
    assert trainer.evals_without_improvement >= 1


def test_loss_parameters_are_optimised() -> None:
    torch.manual_seed(0)
    train = _digits(range(6))
    loss = losses.ArcFaceLoss(num_classes=6, embedding_size=16)
    before = loss.W.detach().clone()
    trainer = Trainer(_model(), loss, train, TrainConfig(epochs=1, p=3, k=8, progress=False))
    trainer.fit()
    assert not torch.equal(before, loss.W.detach())
    assert trainer.optimizer.param_groups[1]["lr"] >= 0  # the loss's own group


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="scheduler"):
        TrainConfig(scheduler="linear")
