"""Step plug-ins: a method brings its own losses, trainable modules, optimizer groups, logged
values and checkpointed state through :class:`StepPlugin`, without branches in the trainer
(HDML's plug-in is tested in tests/training/test_trainer.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from deepmetric import data, losses, models
from deepmetric.training import TrainConfig, Trainer, load_checkpoint
from deepmetric.training.plugins import StepLosses, StepPlugin


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("calls", torch.tensor(0))


class ScaledEmbeddings:
    """A contrastive loss on embeddings times a learnt scale (its own group, lr 0.05)."""

    name = "scaled"

    def __init__(self) -> None:
        self.module: nn.Module = Scale()
        self.loss = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)

    def losses(
        self, model: nn.Module, x: Tensor, labels: Tensor, miner: Callable[..., Any] | None
    ) -> StepLosses:
        self.module.calls += 1  # type: ignore[operator]
        loss = self.loss(model(x) * self.module.scale, labels)
        return StepLosses(loss, loss.detach(), {"scale": float(self.module.scale.detach())})

    def loss_modules(self) -> list[nn.Module]:
        return []

    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return [{"params": [self.module.scale], "lr": 0.05, "name": "scale"}]


def _trainer(run_dir: Path, plugin: StepPlugin) -> Trainer:
    digits = data.load_digits()
    train = digits.subset(torch.where(digits.labels < 4)[0][:64])
    torch.manual_seed(0)
    model = models.EmbeddingNet(models.SmallConvNet(1, channels=8, blocks=2), 8, embedding_size=8)
    config = TrainConfig(epochs=2, p=4, k=4, progress=False, tensorboard=False)
    loss = losses.TripletMarginLoss()  # unused: the plug-in computes the step's loss
    return Trainer(model, loss, train, config, run_dir=run_dir, plugin=plugin)


def test_a_plugin_trains_its_own_group_logs_its_values_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    straight_plugin = ScaledEmbeddings()
    straight = _trainer(tmp_path / "a", straight_plugin)
    assert straight.optimizer.param_groups[-1]["name"] == "scale"
    history = straight.fit()
    steps = straight.step
    assert int(straight_plugin.module.calls) == steps
    scale = float(straight_plugin.module.scale.detach())
    assert scale != 1.0
    assert all(0 < record["scale"] < 10 for record in history)  # a mean over the epoch

    stopped = _trainer(tmp_path / "b", ScaledEmbeddings())
    stopped.fit(max_steps=steps // 2 + 1)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["scaled"]["calls"] == steps // 2 + 1
    plugin = ScaledEmbeddings()
    resumed = _trainer(tmp_path / "b", plugin)
    resumed_history = resumed.fit()
    assert float(plugin.module.scale.detach()) == scale
    assert int(plugin.module.calls) == steps
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [r["scale"] for r in resumed_history] == [r["scale"] for r in history]


def test_plugin_errors_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="StepPlugin"):
        _trainer(tmp_path, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="accumulate"):
        digits = data.load_digits()
        model = models.EmbeddingNet(models.SmallConvNet(1, 8, 2), 8, embedding_size=8)
        config = TrainConfig(p=4, k=4, accumulate=2)
        Trainer(model, losses.TripletMarginLoss(), digits, config, plugin=ScaledEmbeddings())
