"""Data shared by the fine-tuning and training-step tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepmetric import data


def _digits(classes: int = 6, per_class: int = 24) -> data.ArrayDataset:
    digits = data.load_digits()
    keep = torch.cat([torch.where(digits.labels == c)[0][:per_class] for c in range(classes)])
    return digits.subset(keep)


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
