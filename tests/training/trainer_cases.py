"""Data, model and trainers shared by the trainer and checkpoint tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deepmetric import data, losses, miners, models
from deepmetric.hdml import HDML
from deepmetric.training import TrainConfig, Trainer


def _digits(classes: range) -> data.ArrayDataset:
    digits = data.load_digits()
    keep = torch.isin(digits.labels, torch.tensor(list(classes)))
    return digits.subset(torch.where(keep)[0])


def _model() -> models.EmbeddingNet:
    return models.EmbeddingNet(models.SmallConvNet(1, channels=8, blocks=2), 8, embedding_size=16)


def _hdml(model: models.EmbeddingNet, loss: nn.Module) -> HDML:
    """A small HDML whose running means refresh every 4 steps, so a resume falls mid-window."""
    return HDML(
        model.embed_features,
        loss,
        feature_size=model.trunk_features,
        embedding_size=model.embedding_size,
        num_classes=10,
        hidden_size=16,
        window=4,
        alpha=0.5,
    )


def _trainer(run_dir: Path | None, epochs: int = 3, hdml: bool = False, **kwargs) -> Trainer:
    torch.manual_seed(0)
    options = {"p": 4, "k": 8, "lr": 3e-3, "progress": False, **kwargs}
    config = TrainConfig(epochs=epochs, **options)
    model = _model()
    loss = losses.TripletMarginLoss(margin=0.2)
    return Trainer(
        model,
        loss,
        _digits(range(6)),
        config,
        val_set=_digits(range(6, 10)),
        miner=miners.MultiSimilarityMiner(),
        run_dir=run_dir,
        hdml=_hdml(model, loss) if hdml else None,
    )
