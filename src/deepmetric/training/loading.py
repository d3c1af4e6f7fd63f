"""The training ``DataLoader``: P×K batches, with a seed per sample for datasets that transform
their samples at random, so that a resumed run draws the same augmentations.

A dataset that declares ``accepts_sample_seeds = True`` (the lazy image datasets of
:mod:`deepmetric.data`) is read with keys ``(index, seed)``: ``dataset[(i, s)]`` applies its
random transform seeded by ``s``, whichever worker process decodes it. The seed of the sample in
slot ``j`` of the global batch ``b`` of epoch ``e`` is a hash of ``(config.seed, e, b, j)``:
it depends on where the run stands, never on the workers' own random state, so
``num_workers=0`` and ``num_workers=2`` train the same model, and a run resumed in the middle of
an epoch sees the same augmented images as one that was never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..inference import collate_samples, init_loader_worker, loader_workers
from ..samplers import PKSampler
from .config import TrainConfig


def accepts_sample_seeds(dataset: object) -> bool:
    """True when ``dataset[(index, seed)]`` gives a reproducible random transform."""
    return bool(getattr(dataset, "accepts_sample_seeds", False))


def sample_seeds(seed: int, epoch: int, step: int, slots: int) -> list[int]:
    """Seeds of the first ``slots`` slots of batch ``step`` of ``epoch``: 63-bit ints hashed
    from ``(seed, epoch, step, slot)`` (NumPy's ``SeedSequence``; slot ``j``'s seed does not
    depend on ``slots``)."""
    words = np.random.SeedSequence([seed, epoch, step]).generate_state(slots, dtype=np.uint64)
    return [int(w) >> 1 for w in words]


class SeededBatchSampler(Sampler[list[Any]]):
    """A :class:`~deepmetric.samplers.PKSampler`'s batches, each index paired with its seed
    (see the module docstring) when ``with_seeds``, else the plain index lists.

    The position in the epoch is the ``PKSampler``'s, so its ``state_dict`` resumes this too.
    With several processes each yields its share of the global batch with the seeds of the
    share's global slots (the one-process run's seeds).
    """

    def __init__(self, sampler: PKSampler, seed: int, with_seeds: bool) -> None:
        self.sampler = sampler
        self.seed = seed
        self.with_seeds = with_seeds

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[Any]]:
        share = self.sampler.batch_size
        first_slot = self.sampler.rank * share
        for batch in self.sampler:
            if not self.with_seeds:
                yield batch
                continue
            state = self.sampler.state_dict()  # the position is already past this batch
            seeds = sample_seeds(
                self.seed, state["epoch"], state["position"] - 1, first_slot + share
            )
            yield list(zip(batch, seeds[first_slot:], strict=True))


def train_loader(
    dataset: Dataset[Any], sampler: PKSampler, config: TrainConfig, device: torch.device
) -> DataLoader[Any]:
    """The ``DataLoader`` of the training batches: ``(x, labels, skipped_indices)`` per batch
    (:func:`~deepmetric.inference.collate_samples`)."""
    workers = loader_workers(config.num_workers, dataset)
    pin = device.type == "cuda" if config.pin_memory == "auto" else bool(config.pin_memory)
    return DataLoader(
        dataset,
        batch_sampler=SeededBatchSampler(sampler, config.seed, accepts_sample_seeds(dataset)),
        collate_fn=collate_samples,
        num_workers=workers,
        persistent_workers=workers > 0 and config.persistent_workers,
        pin_memory=pin,
        prefetch_factor=config.prefetch_factor if workers > 0 else None,
        worker_init_fn=init_loader_worker if workers > 0 else None,
    )
