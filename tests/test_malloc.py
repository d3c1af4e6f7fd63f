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
        torch.ones(1)  # the first operator's own memory is not what is measured
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
