"""keep_freed_memory: glibc accepts the thresholds (the speed-up is measured end to end, on a
training run, in the module's docstring: page-fault counts of small programs vary too much
between runs to test it here)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_accepts_the_thresholds_in_a_fresh_process() -> None:
    program = (
        "from deepmetric._malloc import keep_freed_memory as k; "
        "import torch; torch.ones(1 << 22).sum(); print(k(), k())"
    )
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_other_platforms_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepmetric import _malloc

    monkeypatch.setattr(_malloc.sys, "platform", "darwin")
    assert _malloc.keep_freed_memory() is False


def _resident_kb() -> int:
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class _FreedBatchDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int, int]]):
    """In the worker, makes and frees two 16 MB "batches" (a worker's life), then reports how
    much of them the worker still holds."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int, int]:
        # one cycle first: what the first large operator sets up (its threads) is not measured
        block = torch.ones(1 << 22)
        del block
        before = _resident_kb()
        for _ in range(2):
            block = torch.ones(1 << 22)  # 16 MB, every page touched
            del block
        return torch.tensor([float(_resident_kb() - before)]), 0, 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_loader_workers_hand_freed_batches_back() -> None:
    # glibc's default keeps the second 16 MB block on the heap after the first free raised its
    # mmap threshold: the worker would hold it (and one more per batch size it meets).
    from deepmetric.samplers import PKSampler
    from deepmetric.training.config import TrainConfig
    from deepmetric.training.loading import train_loader

    sampler = PKSampler(torch.tensor([0, 0, 1, 1]), 2, 2, seed=0)
    config = TrainConfig(num_workers=1, persistent_workers=False)
    loader = train_loader(_FreedBatchDataset(), sampler, config, torch.device("cpu"))
    (x, _, _), *_ = list(loader)
    assert float(x.max()) < 4096, f"the worker kept {float(x.max()):.0f} kB of freed blocks"


_COPY_ON_WRITE_PROGRAM = """
import os
from pathlib import Path
import torch
from deepmetric._malloc import keep_freed_memory
from deepmetric.inference import collate_samples, init_loader_worker

keep_freed_memory()  # as the command line does
blocks = [torch.ones(1 << 20) for _ in range(64)]  # 256 MB, then freed: kept in the heap
del blocks

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return torch.zeros(2), 0, i

loader = torch.utils.data.DataLoader(
    Items(), batch_size=2, num_workers=1, persistent_workers=True,
    collate_fn=collate_samples, worker_init_fn=init_loader_worker,
)

def worker_pss_mb():
    (child,) = [int(c) for t in Path(f"/proc/{os.getpid()}/task").iterdir()
                for c in (t / "children").read_text().split()]
    for line in Path(f"/proc/{child}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024

list(loader)
before = worker_pss_mb()
blocks = [torch.full((1 << 20,), 2.0) for _ in range(64)]  # the parent writes its heap again
list(loader)
print(worker_pss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_a_worker_drops_the_freed_heap_it_inherited() -> None:
    # Without the trim, every page the parent writes again stays behind in the worker as a
    # private copy: its memory would grow by the 256 MB the parent had freed.
    out = subprocess.run(
        [sys.executable, "-c", _COPY_ON_WRITE_PROGRAM], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 64, f"the worker grew by {float(out.stdout):.0f} MB"
