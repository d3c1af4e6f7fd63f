"""Checkpoint files: written atomically, read without unpickling code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..io import atomic_torch_save

CHECKPOINT_VERSION = 1


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash mid-save leaves
    the previous file intact (:func:`deepmetric.io.atomic_torch_save`)."""
    atomic_torch_save(obj, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain data, never code)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a deepmetric checkpoint of version {CHECKPOINT_VERSION}")
    return state


def open_summary_writer(log_dir: Path, purge_step: int | None = None) -> Any | None:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``, or None when TensorBoard is
    not installed (``torch.utils.tensorboard`` needs the optional ``tensorboard`` package).

    ``purge_step``: events at this step or later, left by a run that crashed after logging
    them, are discarded (TensorBoard's own mechanism for resumed runs)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
