"""Time, memory and agreement of deepmetric's ``AccuracyCalculator`` against PML 2.9.0's.

Self-retrieval (``get_accuracy(x, labels)``: every embedding is a query and a reference, itself
excluded) on clustered random data: ``--classes`` (1000) centres drawn from N(0, I) in ``--dim``
(128) dimensions, a uniformly random label per point, the point its centre plus N(0, 1.5² I)
noise, float32. Both calculators run with ``k="max_bin_count"`` (PML's default ``k=None``
searches all N neighbours: ``N² × 12`` bytes for faiss' result alone, 30 GB at N = 50k) and
without NMI/AMI, which both compute with the same faiss k-means call.

For each N, every measurement in a fresh process (so no library warms the other's caches):

* **time**: wall-clock seconds of one ``get_accuracy`` call, median over ``--repeats`` rounds,
  interleaved (PML, deepmetric, matrix product, PML, ...);
* **memory**: one more process per library: the peak resident set over the one at the call (the
  data already in memory), with glibc's mmap threshold fixed so freed memory is given back (see
  ``_common.MEMORY_ENV``). This is not the timed process: mapping every temporary afresh costs
  page faults, more for many small temporaries than for a few large ones;
* **agreement**: the largest absolute difference between the two libraries' metrics (rounding
  in float32 can swap two nearly equidistant neighbours: ~1e-7 per swap);
* **bare matrix product**: the time of one float32 ``(N, d) @ (d, N)`` product, in blocks of
  rows written into one reused 64 MiB result, on the same machine and threads: the floor for
  any exact search, which deepmetric's self-retrieval undercuts by computing each pair of
  blocks once.

Every process runs with ``--threads`` OpenMP/MKL threads and OpenMP's own wait policy (idle
threads spin a while at each barrier, then sleep). ``--wait-policy PASSIVE`` makes them sleep at
once: on a CPU shared with other jobs, spinning threads steal the cores they wait for, which
slows every parallel operator several-fold. On a quiet machine, PASSIVE slows deepmetric's many
small operators more than PML's few large calls or the bare product: 10k self-retrieval took
0.37 s under PASSIVE against 0.28 s under the default (the product 0.17 s in both), so use it
only on a busy machine, and quote ratios measured under one policy.

**memory at scale** (``--memory-at``, deepmetric only): ``--memory-queries`` (10k) queries ranked
against all N references (the queries among them, ``ref_includes_query=True``) at each N of the
list, one fresh process each, with its wall time and peak memory over the data: the exact top-k
is streamed over chunks of the references, so the peak stays flat as N grows (1M × 128 included),
while the N × N self-retrieval of that N would only take longer, not more memory.

Run from the repository root::

    python benchmarks/evaluation.py --quick     # N = 10k only
    python benchmarks/evaluation.py             # N = 10k, 50k, 200k
    python benchmarks/evaluation.py --sizes 50000,200000 --memory-at 100000,1000000

Results go to ``benchmarks/results/evaluation.json`` with a description of the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MEMORY_ENV,
    MemoryProbe,
    describe_failure,
    emit_result,
    fmt,
    format_table,
    machine_info,
    run_worker,
    write_json,
)

TASKS = ("pml", "deepmetric", "matmul")
METRIC_EXCLUDE = ("NMI", "AMI")
RESULTS = Path(__file__).resolve().parent / "results" / "evaluation.json"


def make_data(n: int, dim: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered float32 embeddings ``(n, dim)`` and their labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    centers = torch.randn(n_classes, dim, generator=g)
    return centers[labels] + 1.5 * torch.randn(n, dim, generator=g), labels


def bare_matmul(x: torch.Tensor) -> None:
    """One ``x @ x.T``, in blocks of rows into a reused 64 MiB result."""
    n = len(x)
    rows = max(1, min(n, (64 << 20) // (4 * n)))
    out = torch.empty(rows, n)
    for start in range(0, n, rows):
        block = x[start : start + rows]
        torch.mm(block, x.T, out=out[: len(block)])


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    x, labels = make_data(spec["n"], spec["dim"], spec["classes"], spec["seed"])
    cpu = torch.device("cpu")
    if spec["task"] == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc: Any = AccuracyCalculator(k="max_bin_count", exclude=METRIC_EXCLUDE, device=cpu)
    elif spec["task"] == "deepmetric":
        from deepmetric.evaluation import AccuracyCalculator as OurCalculator

        calc = OurCalculator(k="max_bin_count", exclude=METRIC_EXCLUDE, device=cpu)
    torch.mm(x[:256], x[:256].T)  # start the BLAS threads outside the measurement
    probe = MemoryProbe(cpu)
    probe.start()
    start = time.perf_counter()
    values: dict[str, float] = {}
    try:
        if spec["task"] == "matmul":
            bare_matmul(x)
        elif spec.get("queries"):  # memory at scale: queries against all N references
            q = spec["queries"]
            result = calc.get_accuracy(x[:q], labels[:q], x, labels, ref_includes_query=True)
            values = {name: float(v) for name, v in result.items()}
        else:
            values = {name: float(v) for name, v in calc.get_accuracy(x, labels).items()}
    except Exception as exc:  # out of memory and the like: recorded, not fatal
        return {"status": describe_failure(exc)}
    return {
        "status": "ok",
        "seconds": time.perf_counter() - start,
        "peak_mb": probe.peak_mb(),
        "values": values,
    }


def wait_policy_env(policy: str) -> dict[str, str]:
    """The workers' ``OMP_WAIT_POLICY`` (``default``: not set, OpenMP's own)."""
    return {} if policy == "default" else {"OMP_WAIT_POLICY": policy}


def run_size(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """Every task at one N, interleaved over the rounds."""
    spec = {"n": n, "dim": args.dim, "classes": args.classes, "seed": 0}
    timing_env = wait_policy_env(args.wait_policy)
    runs: dict[str, list[dict[str, Any]]] = {task: [] for task in TASKS}
    for round_ in range(args.repeats):
        for task in TASKS:
            result = run_worker(
                __file__, {**spec, "task": task}, args.timeout, args.threads, timing_env
            )
            print(f"  N={n} round {round_ + 1} {task}: {summary(result)}", flush=True)
            runs[task].append(result)
    row: dict[str, Any] = {"n": n}
    for task, results in runs.items():
        memory = run_worker(
            __file__, {**spec, "task": task}, args.timeout, args.threads,
            {**MEMORY_ENV, **timing_env},
        )  # fmt: skip
        print(f"  N={n} memory {task}: {summary(memory)}", flush=True)
        ok = [r for r in results if r.get("status") == "ok"]
        row[task] = {
            "status": "ok" if ok else results[0].get("status"),
            "seconds": [r["seconds"] for r in ok],
            "median_seconds": statistics.median(r["seconds"] for r in ok) if ok else None,
            "peak_mb": memory.get("peak_mb"),
            "memory_status": memory.get("status"),
            "values": ok[0]["values"] if ok else None,
        }
    ours, theirs = row["deepmetric"]["values"], row["pml"]["values"]
    if ours and theirs:
        diff = max(abs(ours[name] - theirs[name]) for name in theirs)
        row["max_abs_difference"] = diff
        row["values_equal"] = set(ours) == set(theirs) and diff <= args.tolerance
    for task in ("pml", "deepmetric"):
        seconds, bare = row[task]["median_seconds"], row["matmul"]["median_seconds"]
        row[task]["vs_matmul"] = seconds / bare if seconds and bare else None
    return row


def run_memory_at(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """deepmetric alone: ``--memory-queries`` queries against all ``n`` references, in one
    fresh process with the memory settings (time and peak memory of that one call)."""
    spec = {"n": n, "dim": args.dim, "classes": args.classes, "seed": 0}
    spec.update(task="deepmetric", queries=min(n, args.memory_queries))
    env = {**MEMORY_ENV, **wait_policy_env(args.wait_policy)}
    result = run_worker(__file__, spec, args.timeout, args.threads, env)
    print(f"  N={n} {spec['queries']} queries, deepmetric: {summary(result)}", flush=True)
    data_mb = n * (args.dim * 4 + 8) / 2**20
    return {"n": n, "queries": spec["queries"], "data_mb": data_mb, **result}


def summary(result: dict[str, Any]) -> str:
    if result.get("status") != "ok":
        return str(result.get("status"))
    return f"{result['seconds']:.2f} s, peak {result['peak_mb']:.0f} MiB"


def table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "N",
        "PML s",
        "ours s",
        "matmul s",
        "ours/matmul",
        "PML/ours",
        "PML MiB",
        "ours MiB",
        "equal",
        "max |diff|",
    ]
    lines = []
    for row in rows:
        pml, ours, bare = row["pml"], row["deepmetric"], row["matmul"]
        speedup = (
            pml["median_seconds"] / ours["median_seconds"]
            if pml["median_seconds"] and ours["median_seconds"]
            else None
        )
        lines.append(
            [
                f"{row['n']:,}",
                fmt(pml["median_seconds"], ".2f") if pml["status"] == "ok" else pml["status"],
                fmt(ours["median_seconds"], ".2f") if ours["status"] == "ok" else ours["status"],
                fmt(bare["median_seconds"], ".2f"),
                fmt(ours["vs_matmul"], ".2f"),
                fmt(speedup, ".1f"),
                fmt(pml["peak_mb"], ".0f"),
                fmt(ours["peak_mb"], ".0f"),
                str(row.get("values_equal", "—")),
                fmt(row.get("max_abs_difference"), ".1e"),
            ]
        )
    return format_table(headers, lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 10k only")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per N (median)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--wait-policy",
        default="default",
        help="OMP_WAIT_POLICY of the workers: PASSIVE, ACTIVE or default (left unset)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="'equal' up to this")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--memory-at",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[],
        help="also: deepmetric's time and peak memory for --memory-queries queries against "
        "each of these N references",
    )
    parser.add_argument("--memory-queries", type=int, default=10_000)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [10_000] if args.quick else [10_000, 50_000, 200_000]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        emit_result(worker(json.loads(args.worker)))
        return
    rows = [run_size(args, n) for n in args.sizes]
    at_scale = [run_memory_at(args, n) for n in args.memory_at]
    print()
    print(table(rows))
    if at_scale:
        print()
        print(
            format_table(
                ["N references", "queries", "data MiB", "seconds", "peak MiB over the data"],
                [
                    [
                        f"{r['n']:,}",
                        f"{r['queries']:,}",
                        f"{r['data_mb']:.0f}",
                        fmt(r.get("seconds"), ".1f"),
                        fmt(r.get("peak_mb"), ".0f") if r.get("status") == "ok" else r["status"],
                    ]
                    for r in at_scale
                ],
            )
        )
    payload = {
        "machine": machine_info(args.threads, "cpu"),
        "settings": {
            "k": "max_bin_count",
            "metrics": "PML's defaults without NMI/AMI (same faiss k-means in both)",
            "dim": args.dim,
            "classes": args.classes,
            "repeats": args.repeats,
            "omp_wait_policy": args.wait_policy,
            "tolerance": args.tolerance,
        },
        "cases": rows,
        "memory_at_scale": at_scale,
    }
    write_json(args.output, payload)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
