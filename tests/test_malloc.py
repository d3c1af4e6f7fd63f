"""keep_freed_memory: glibc accepts the thresholds (the speed-up is measured end to end, on a
training run, in the module's docstring: page-fault counts of small programs vary too much
between runs to test it here)."""

from __future__ import annotations

import subprocess
import sys

import pytest


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


_FREED_BATCH_PROGRAM = """
import torch
from deepmetric.samplers import PKSampler
from deepmetric.training.config import TrainConfig
from deepmetric.training.loading import train_loader

def resident_kb():
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

class FreedBatches(torch.utils.data.Dataset):
    # in the worker: two 16 MB blocks made and freed (a worker's life), and what it still holds
    def __len__(self):
        return 4
    def __getitem__(self, key):
        block = torch.ones(1 << 22)  # a first cycle: the operator's own set-up is not measured
        del block
        before = resident_kb()
        for _ in range(2):
            block = torch.ones(1 << 22)  # 16 MB, every page touched
            del block
        return torch.tensor([float(resident_kb() - before)]), 0, 0

sampler = PKSampler(torch.tensor([0, 0, 1, 1]), 2, 2, seed=0)
config = TrainConfig(num_workers=1, persistent_workers=False)
(x, _, _), *_ = list(train_loader(FreedBatches(), sampler, config, torch.device("cpu")))
print(float(x.max()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_loader_workers_hand_freed_batches_back() -> None:
    # glibc's default keeps the second 16 MB block on the heap after the first free raised its
    # mmap threshold: the worker would hold it (and one more per batch size it meets). A fresh
    # process, so that no freed heap of this one is inherited.
    out = subprocess.run(
        [sys.executable, "-c", _FREED_BATCH_PROGRAM], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 4096, f"the worker kept {float(out.stdout):.0f} kB of freed blocks"


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
