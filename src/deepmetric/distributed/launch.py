"""Starting the processes of a distributed run, and joining their process group.

Two ways to run ``deepmetric train`` / ``deepmetric demo`` on N processes of one machine:

* ``deepmetric train --nproc N ...``: :func:`start_processes` starts N local processes itself;
* ``torchrun --nproc_per_node N -m deepmetric train ...`` (or any launcher that sets torchrun's
  environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``; also across machines): :func:`launched_by_torchrun` sees them.

Both end in the same place: :func:`process_group` initialises ``torch.distributed`` from those
variables (``init_method="env://"``), with the backend chosen from the run's device
(:func:`backend_for`: nccl on CUDA, gloo on the CPU) and a timeout, and, on CUDA, selects the GPU
``LOCAL_RANK``. The timeout bounds every wait on another process: if one stalls, the others fail
with a timeout error after that long instead of waiting forever (one that dies is noticed at
once: its sockets close).

``--nproc`` uses ``torch.multiprocessing`` rather than running ``torchrun`` in a subprocess: the
config is parsed and checked once, in the parent, and handed to the processes as an object (no
command line to rebuild); the processes are forked from a *forkserver* that imports torch and
deepmetric once (on Linux; ``spawn`` elsewhere), so N processes do not pay N imports; and
``torch.multiprocessing`` ends the remaining processes as soon as one fails and reports which
one, and how (:class:`ProcessFailedError`). A process that raises ``ValueError`` prints
``deepmetric: error: ...`` and exits with status 2, as the single-process command does.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException
from torch.multiprocessing.spawn import start_processes as torch_start_processes

from ..training import resolve_device

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class ProcessFailedError(RuntimeError):
    """A process of a :func:`start_processes` run failed (the others were ended)."""


def launched_by_torchrun() -> bool:
    """True when torchrun's ``RANK`` and ``WORLD_SIZE`` environment variables are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launcher_rank() -> int:
    """This process's rank as torchrun's ``RANK`` variable says (0 when it is not set)."""
    return int(os.environ.get("RANK", "0"))


def backend_for(device: str) -> str:
    """``"nccl"`` when ``device`` (a :class:`~deepmetric.training.TrainConfig` device name)
    resolves to CUDA, else ``"gloo"``."""
    return "nccl" if resolve_device(device).type == "cuda" else "gloo"


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


@contextmanager
def process_group(device: str, timeout_s: float) -> Iterator[int]:
    """Initialise the default process group from torchrun's environment variables and yield
    this process's rank; destroy the group when the block ends without an error (after an
    error the process is about to exit, and the group goes with it).

    Args:
        device: the run's device name (``"auto"``, ``"cpu"``, ``"cuda"``): picks the backend;
            on CUDA this process uses GPU ``LOCAL_RANK``.
        timeout_s: how long any collective waits for the other processes before failing.
    """
    if timeout_s <= 0:
        raise ValueError(f"the process-group timeout must be > 0 seconds, got {timeout_s}")
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"environment variable(s) {', '.join(missing)} not set (torchrun sets them)"
        )
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    backend = backend_for(device)
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    yield rank
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _process_main(
    local_rank: int,
    nproc: int,
    port: int,
    device: str,
    timeout_s: float,
    target: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    """What each started process runs: torchrun's variables, the group, ``target(*args)``."""
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        with process_group(device, timeout_s):
            target(*args)
    except ValueError as error:
        print(f"deepmetric: error (process {local_rank}): {error}", file=sys.stderr)
        sys.exit(2)


def start_processes(
    nproc: int,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    device: str,
    timeout_s: float,
) -> None:
    """Run ``target(*args)`` in ``nproc`` new local processes, ranks ``0 .. nproc - 1`` of one
    process group (see :func:`process_group`), and wait for them.

    ``target`` must be importable by name (a module-level function) and ``args`` picklable.
    Raises :class:`ProcessFailedError` as soon as one process fails (the others are ended).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if backend_for(device) == "nccl" and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} needs {nproc} GPUs, {torch.cuda.device_count()} visible")
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        # imported once by the server; torch._dynamo is what DDP's constructor imports (slow)
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["deepmetric.experiment", "torch._dynamo"]
        )
    try:
        torch_start_processes(
            _process_main,
            args=(nproc, _free_port(), device, timeout_s, target, args),
            nprocs=nproc,
            start_method=method,
        )
    except ProcessException as error:
        raise ProcessFailedError(
            f"process {error.error_index} of {nproc} failed, the others were stopped: {error}"
        ) from error
