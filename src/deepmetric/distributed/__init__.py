"""Data-parallel training on ``torch.distributed``: losses and miners over the global batch, the
processes that run it, and BatchNorm over the global batch.

* :mod:`~deepmetric.distributed.wrappers`: :class:`DistributedLossWrapper` and
  :class:`DistributedMinerWrapper` (PML's names and call signatures) compute a loss or mine on
  the batch gathered from every process, with gradients equal to one process on the global
  batch (the promise and the ``efficient`` trade-off are in that module's docstring);
* :mod:`~deepmetric.distributed.gather`: every rank's rows in rank order, after all ranks have
  checked their input and agreed on shapes;
* :mod:`~deepmetric.distributed.launch`: ``deepmetric train --nproc N`` starting its processes,
  or joining the process group torchrun set up (imported on its own: it needs
  :mod:`deepmetric.training`, which imports this package);
* :mod:`~deepmetric.distributed.sync_batchnorm`: BatchNorm layers swapped for ones that
  normalise with the global batch's statistics, on GPUs and on the CPU.
"""

from __future__ import annotations

from .gather import gather_rows, gather_with_local, is_distributed, world_size
from .wrappers import DistributedLossWrapper, DistributedMinerWrapper, scale_gradient

__all__ = [
    "DistributedLossWrapper",
    "DistributedMinerWrapper",
    "gather_rows",
    "gather_with_local",
    "is_distributed",
    "scale_gradient",
    "world_size",
]
