"""Embedding data with a trained model: the one ``embed`` of the library.

    embeddings = embed(model, images)                 # (N, ...) tensor -> (N, E) float32
    result = embed_dataset(model, dataset, num_workers=2, progress=True)
    result.embeddings, result.labels, result.kept_indices, result.skipped_indices

``data`` may be a tensor ``(N, ...)``, an :class:`~deepmetric.data.ArrayDataset` (its ``x`` is
sliced in batches), or a *lazy* dataset that decodes its samples on demand. A lazy dataset is a
map-style ``Dataset`` with ``labels`` (``(N,)`` int64) and ``class_names``, whose
``dataset[i]`` (an int) returns ``(x | None, label, i)`` with its deterministic (evaluation)
transform; ``x is None`` marks a file it could not read. It is streamed through a
``DataLoader`` (worker processes decode while the model embeds), so memory holds the embeddings
and a few batches of inputs, never the whole dataset; unreadable files are left out and
reported in :attr:`Embedded.skipped_indices`.

:func:`collate_samples` is the batch collation shared with the trainer.
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ._malloc import return_freed_memory
from .config import AUTO_WORKERS
from .data import collate_samples

__all__ = ["Embedded", "collate_samples", "embed", "embed_dataset", "is_lazy_dataset"]


def is_lazy_dataset(data: object) -> bool:
    """True for a dataset that decodes its samples on demand (it has no in-memory ``x``)."""
    return isinstance(data, Dataset) and not isinstance(getattr(data, "x", None), Tensor)


def loader_workers(setting: int | str, dataset: object) -> int:
    """The number of ``DataLoader`` workers for ``dataset``: ``setting`` when it is a number;
    for ``"auto"``, one per CPU core this process may use, at most
    :data:`~deepmetric.config.AUTO_WORKERS`, for a dataset decoded from files, and 0 for one
    held in memory (a worker would only copy its tensors)."""
    if setting != "auto":
        return int(setting)
    if not is_lazy_dataset(dataset):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(AUTO_WORKERS, cores or 1)


@dataclass
class Embedded:
    """The embeddings of a dataset's readable samples.

    Attributes:
        embeddings: ``(M, E)`` float32 on the CPU, row ``j`` for sample ``kept_indices[j]``.
        labels: ``(M,)`` int64 labels of those samples (None when the data had no labels).
        kept_indices: ``(M,)`` int64 dataset indices of the rows, in increasing order.
        skipped_indices: dataset indices of the samples that could not be read.
    """

    embeddings: Tensor
    labels: Tensor | None
    kept_indices: Tensor
    skipped_indices: list[int]


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    data: Tensor | Dataset[Any],
    batch_size: int = 256,
    device: torch.device | str | None = None,
    *,
    num_workers: int = 0,
    progress: bool = False,
    indices: Sequence[int] | None = None,
) -> Embedded:
    """Embed ``data`` in evaluation mode, batch by batch (the model's mode is restored).

    Args:
        model: maps ``(B, ...)`` inputs to ``(B, E)`` embeddings.
        data: a tensor ``(N, ...)``, a dataset with an in-memory ``x`` (``ArrayDataset``) or a
            lazy dataset (see the module docstring), streamed through a ``DataLoader``.
        batch_size: inputs per forward pass.
        device: where the model runs (default: the device of its parameters).
        num_workers: ``DataLoader`` worker processes decoding a lazy dataset (0: in this one).
        progress: show a tqdm progress bar.
        indices: embed only these dataset indices (default: all, in order).

    Returns:
        :class:`Embedded`; a file that a lazy dataset cannot read is left out of the rows and
        listed in ``skipped_indices`` (with one warning naming the files).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        if not isinstance(data, Tensor) and is_lazy_dataset(data):
            return _embed_streamed(model, data, batch_size, device, num_workers, progress, indices)
        x: Tensor = data if isinstance(data, Tensor) else getattr(data, "x")  # noqa: B009
        labels: Tensor | None = None if isinstance(data, Tensor) else getattr(data, "labels", None)
        rows = torch.arange(len(x)) if indices is None else torch.as_tensor(list(indices))
        rows = rows.long()
        out = []
        starts = range(0, len(rows), batch_size)
        for start in tqdm(starts, desc="embedding", disable=not progress, leave=False):
            stop = start + batch_size
            batch = x[start:stop] if indices is None else x[rows[start:stop]]  # no copy of x
            out.append(model(batch.to(device)).float().cpu())
        return Embedded(
            embeddings=torch.cat(out) if out else torch.empty(0, 0),
            labels=None if labels is None else labels[rows],
            kept_indices=rows,
            skipped_indices=[],
        )
    finally:
        model.train(was_training)


def init_loader_worker(worker_id: int) -> None:
    """The ``worker_init_fn`` of the DataLoaders of deepmetric: a worker leaves Ctrl-C to the main
    process, which finishes its step and writes a checkpoint (a terminal sends SIGINT to the
    whole process group), and hands the memory of each batch it has sent back to the system
    (:func:`~deepmetric._malloc.return_freed_memory`: otherwise its heap grows with every
    batch)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return_freed_memory()


def _embed_streamed(
    model: nn.Module,
    dataset: Dataset[Any],
    batch_size: int,
    device: torch.device,
    num_workers: int,
    progress: bool,
    indices: Sequence[int] | None,
) -> Embedded:
    """:func:`embed_dataset` of a lazy dataset: ``dataset[i]`` keys (the evaluation transform)
    through a ``DataLoader``; only the embeddings accumulate."""
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]  # type: ignore[arg-type]
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,  # a list of int keys is a valid sampler
        collate_fn=collate_samples,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=init_loader_worker if num_workers > 0 else None,
    )
    out: list[Tensor] = []
    labels: list[Tensor] = []
    kept: list[Tensor] = []
    skipped: list[int] = []
    for position, (x, y, missing) in enumerate(
        tqdm(loader, desc="embedding", disable=not progress, leave=False)
    ):
        keys = torch.tensor(order[position * batch_size : (position + 1) * batch_size])
        if missing:
            skipped += missing
            keys = keys[~torch.isin(keys, torch.tensor(missing))]
        if len(keys):
            out.append(model(x.to(device, non_blocking=True)).float().cpu())
            labels.append(y)
            kept.append(keys)
    if skipped:
        paths = getattr(dataset, "paths", None)
        names = [str(paths[i]) if paths is not None else f"sample {i}" for i in skipped]
        warnings.warn(
            f"skipped {len(skipped)} unreadable file(s): {', '.join(names)}",
            stacklevel=3,
        )
    return Embedded(
        embeddings=torch.cat(out) if out else torch.empty(0, 0),
        labels=torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
        kept_indices=torch.cat(kept) if kept else torch.empty(0, dtype=torch.long),
        skipped_indices=skipped,
    )


def embed(
    model: nn.Module,
    data: Tensor | Dataset[Any],
    batch_size: int = 256,
    device: torch.device | str | None = None,
    *,
    num_workers: int = 0,
    progress: bool = False,
) -> Tensor:
    """Embed every sample of ``data`` -> ``(N, E)`` float32 on the CPU, row ``i`` for sample
    ``i`` (see :func:`embed_dataset` for the arguments).

    ``ValueError`` when a lazy dataset has unreadable files (the rows would no longer match the
    samples): call :func:`embed_dataset`, which says which rows it kept.
    """
    result = embed_dataset(
        model, data, batch_size, device, num_workers=num_workers, progress=progress
    )
    if result.skipped_indices:
        raise ValueError(
            f"{len(result.skipped_indices)} sample(s) could not be read (dataset indices "
            f"{result.skipped_indices[:10]}); use deepmetric.inference.embed_dataset, which "
            "returns the kept rows and their indices"
        )
    return result.embeddings
