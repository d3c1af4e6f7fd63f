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
