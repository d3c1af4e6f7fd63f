"""Plumbing shared by the benchmark scripts.

* :func:`run_worker` runs one measurement in a fresh Python process (the benchmark script itself,
  called with ``--worker SPEC``) and reads back the one JSON line it prints, so a blow-up in one
  case (out of memory, a hang) is recorded instead of taking the whole run down;
* :class:`MemoryProbe` and :func:`cap_memory` are used inside such a worker: the peak memory of a
  block of code over what was in use when it started, and a hard cap on what it may take;
* :func:`competing_load` runs another CPU-bound process beside a measurement, as another
  training or inference job would on a user's machine;
* :func:`machine_info`, :func:`format_table` and :func:`write_json` describe and report a run.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

RESULT_PREFIX = "BENCHMARK-RESULT "
MB = 2**20

# Environment of a process that measures peak memory. glibc's malloc keeps freed blocks below
# its (self-raising) mmap threshold in the heap, where a later step reuses them without the RSS
# growing: after a warm-up step the peak RSS would under-report. With the threshold fixed at
# 64 KiB every larger block is mapped on allocation and unmapped on free, so the RSS tracks the
# memory actually in use.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# The timed processes keep freed memory as deepmetric's command line does
# (``deepmetric._malloc.keep_freed_memory``): without it a process's steps run either from reused
# heap memory or page-faulting fresh mmap'd blocks, by the accident of its allocation history
# (PML's ContrastiveLoss + PairMarginMiner at B=512 measured 4.6 ms in one run, 8.0 in the next).
TIMING_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


# -- describing the machine ------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_memory_gb() -> float | None:
    """Physical memory of the machine in GiB, if the OS tells."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def git_commit() -> str | None:
    """The commit of the working tree the benchmark runs from (``None`` outside a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def machine_info(threads: int, device: str) -> dict[str, Any]:
    """Everything needed to compare two benchmark runs: versions, CPU, threads, date."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "deepmetric": package_version("deepmetric"),
        "pytorch_metric_learning": package_version("pytorch-metric-learning"),
        "git_commit": git_commit(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gb": total_memory_gb(),
        "torch_threads": threads,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda_version"] = torch.version.cuda
    return info


# -- running a measurement in a fresh process ------------------------------------------------------


def run_worker(
    script: str,
    spec: dict[str, Any],
    timeout_s: float,
    threads: int,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python SCRIPT --worker JSON(spec)`` and return the dict the worker emitted.

    The worker runs with ``threads`` OpenMP/MKL threads and ``extra_env`` added to the environment.

    A worker that runs past ``timeout_s`` is killed and reported as ``{"status": "timeout"}``;
    one that dies without a result (killed by the kernel, a crash) as ``{"status": "failed: ..."}``.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra_env or {})
    command = [sys.executable, script, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return {"status": f"failed: killed by {name}{hint}"}
    last_error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"failed: exit code {proc.returncode}: {last_error[:200]}"}


# The competing load: float32 matrix products in a loop, until killed.
_LOAD_LOOP = (
    "import sys, torch\n"
    "torch.set_num_threads(int(sys.argv[1]))\n"
    "a = torch.randn(1024, 1024)\n"
    "while True:\n"
    "    torch.mm(a, a)\n"
)


@contextmanager
def competing_load(threads: int | None) -> Iterator[None]:
    """Run a process of float32 matrix products on ``threads`` threads while the block runs
    (nothing for ``None``)."""
    if threads is None:
        yield
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen([sys.executable, "-c", _LOAD_LOOP, str(threads)], env=env)
    time.sleep(1.0)  # let it reach its loop
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def emit_result(result: dict[str, Any]) -> None:
    """Worker side of :func:`run_worker`: print the result as the one marked line."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def describe_failure(exc: BaseException) -> str:
    """A short status for an exception, with allocation failures recognised as such."""
    message = str(exc)
    lowered = message.lower()
    if isinstance(exc, MemoryError) or any(
        marker in lowered
        for marker in ("can't allocate memory", "out of memory", "not enough memory")
    ):
        return "failed: out of memory"
    first_line = (message.splitlines() or [""])[0]
    return f"failed: {type(exc).__name__}: {first_line[:160]}"


# -- memory, inside a worker -----------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``VmSize``), Linux only."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _max_rss_kb() -> int:
    """Peak resident set of this process so far (``ru_maxrss``: kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; ``False`` if it can't."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class MemoryProbe:
    """Peak memory taken by the code between :meth:`start` and :meth:`peak_mb`, in MiB.

    CPU: the peak resident set size over the resident set at :meth:`start`. On Linux the peak mark
    is reset at :meth:`start` (``/proc/self/clear_refs``), so the imports' own transient peak does
    not hide a smaller one later; elsewhere the lifetime peak is used, which can under-report.
    CUDA: ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` at :meth:`start` (memory
    held by tensors only; the caching allocator's reserve and the CUDA context are not counted).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline_kb = 0
        self.baseline_bytes = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            return
        current = _proc_status_kb("VmRSS") if _reset_peak_rss() else None
        self.baseline_kb = current if current is not None else _max_rss_kb()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self.baseline_bytes
            return max(peak, 0) / MB
        peak_kb = _proc_status_kb("VmHWM") or _max_rss_kb()
        return max(peak_kb - self.baseline_kb, 0) / 1024


def cap_memory(cap_bytes: int, device: torch.device) -> str:
    """Make an allocation beyond ``cap_bytes`` more than now fail with an exception.

    CPU: the address-space limit (``RLIMIT_AS``) is set to the current virtual size plus the cap,
    so torch's allocator raises instead of the machine swapping or the OOM killer striking. It is
    set after the imports and the first tensor operation, which map their libraries and start
    their thread pools under no limit. CUDA: ``RLIMIT_AS`` would break the driver's large
    virtual mappings, so the caching allocator is limited instead
    (``set_per_process_memory_fraction``). Returns how the cap was applied, for the record.
    """
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
        return f"cuda memory fraction {min(1.0, cap_bytes / total):.3f}"
    size_kb = _proc_status_kb("VmSize")
    if size_kb is None:
        return "no cap (no /proc/self/status)"
    limit = size_kb * 1024 + cap_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return f"RLIMIT_AS {limit / 2**30:.1f} GiB"


# -- reporting -------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or an em dash for a missing value."""
    return "—" if value is None else format(value, spec)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)
) -> str:
    """A plain-text table; the columns at indices ``left`` (negative ones count from the end)
    are left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    left_aligned = {index % len(widths) for index in left}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(cell).ljust(width) if index in left_aligned else str(cell).rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
