"""The state dicts of the tiny Hugging Face models, kept to compare with what a folder loads."""

from __future__ import annotations

import torch

_SAVED: dict[str, dict[str, torch.Tensor]] = {}
