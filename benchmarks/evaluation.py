"""Time, memory and agreement of deepmetric's ``AccuracyCalculator`` against PML 2.9.0's, in the
three ways users call it, on a quiet machine or under a competing load.

Data: clustered random embeddings, ``--classes`` (500) centres drawn from N(0, I) in ``--dim``
(128) dimensions, a uniformly random label per point, the point its centre plus
N(0, ``--noise``² I) noise (1.5: MAP@R about 0.4, a realistic, hard ranking; every run prints
it), float32. Both calculators run with ``k="max_bin_count"`` (PML's default ``k=None``
searches all N neighbours: ``N² × 12`` bytes for faiss' result alone, 30 GB at N = 50k) and
without NMI/AMI, which both compute with the same faiss k-means call.

Modes (``--modes``), for N embeddings:

* ``self``: ``get_accuracy(x, y)``, every embedding a query and a reference, itself excluded;
* ``includes``: ``get_accuracy(x, y, x, y, ref_includes_query=True)``, the same ranking through
  an explicit reference set;
* ``separate``: ``get_accuracy(x[:N/2], y[:N/2], x[N/2:], y[N/2:])``, queries against a
  separate reference set.

For each N, every measurement in a fresh process (so no library warms the other's caches):

* **time**: wall-clock seconds of one ``get_accuracy`` call; the rounds are interleaved (each
  round runs every mode with both libraries, which of the two goes first alternating), and the
  table gives medians and the median and range of the per-round ratio ours / PML (below 1:
  deepmetric is faster). On a machine shared with other jobs only such paired ratios compare;
* **agreement**: the largest absolute difference between the two libraries' metrics (rounding
  in float32 can swap two nearly equidistant neighbours: ~1e-7 per swap);
* **memory** (``--memory``): one more process per library and mode, the peak resident set over
  the one at the call (the data already in memory), with glibc's mmap threshold fixed so freed
  memory is given back (see ``_common.MEMORY_ENV``).

``--load`` runs a competing CPU-bound process for the whole measurement: a loop of float32
matrix products on ``--load-threads`` threads (default: every core), as another training or
benchmark job on the machine would. On two cores every parallel operator of the measured process
then waits for cores the load holds: a search of a few large calls (faiss) keeps more of its
speed than one of many small operators.

Every process runs with ``--threads`` OpenMP/MKL threads and OpenMP's own wait policy (idle
threads spin a while at each barrier, then sleep); ``--wait-policy PASSIVE`` makes them sleep at
once. Quote ratios measured under one policy.

**memory at scale** (``--memory-at``, deepmetric only): ``--memory-queries`` (10k) queries ranked
against all N references (the queries among them, ``ref_includes_query=True``) at each N of the
list, one fresh process each, with its wall time and peak memory over the data.

Run from the repository root::

    python benchmarks/evaluation.py --quick                # N = 5k only
    python benchmarks/evaluation.py --sizes 5000,20000 --repeats 5
    python benchmarks/evaluation.py --sizes 5000,20000 --load   # under a competing load

Results go to ``benchmarks/results/evaluation.json`` (``evaluation_load.json`` with ``--load``)
with a description of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
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
    competing_load,
    describe_failure,
    emit_result,
    fmt,
    format_table,
    machine_info,
    run_worker,
    write_json,
)

LIBRARIES = ("pml", "deepmetric")
MODES = ("self", "includes", "separate")
METRIC_EXCLUDE = ("NMI", "AMI")
RESULTS = Path(__file__).resolve().parent / "results"


def make_data(
    n: int, dim: int, n_classes: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered float32 embeddings ``(n, dim)`` and their labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    centers = torch.randn(n_classes, dim, generator=g)
    return centers[labels] + noise * torch.randn(n, dim, generator=g), labels


def call_mode(calc: Any, mode: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """One ``get_accuracy`` call in ``mode`` (see the module docstring)."""
    if mode == "self":
        return dict(calc.get_accuracy(x, y))
    if mode == "includes":
        return dict(calc.get_accuracy(x, y, x, y, ref_includes_query=True))
    half = len(x) // 2
    return dict(calc.get_accuracy(x[:half], y[:half], x[half:], y[half:]))


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    x, labels = make_data(spec["n"], spec["dim"], spec["classes"], spec["noise"], spec["seed"])
    cpu = torch.device("cpu")
    if spec["task"] == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc: Any = AccuracyCalculator(k="max_bin_count", exclude=METRIC_EXCLUDE, device=cpu)
    else:
        from deepmetric.evaluation import AccuracyCalculator as OurCalculator

        calc = OurCalculator(k="max_bin_count", exclude=METRIC_EXCLUDE, device=cpu)
    torch.mm(x[:256], x[:256].T)  # start the BLAS threads outside the measurement
    probe = MemoryProbe(cpu)
    probe.start()
    start = time.perf_counter()
    try:
        if spec.get("queries"):  # memory at scale: queries against all N references
            q = spec["queries"]
            result = calc.get_accuracy(x[:q], labels[:q], x, labels, ref_includes_query=True)
        else:
            result = call_mode(calc, spec["mode"], x, labels)
    except Exception as exc:  # out of memory and the like: recorded, not fatal
        return {"status": describe_failure(exc)}
    return {
        "status": "ok",
        "seconds": time.perf_counter() - start,
        "peak_mb": probe.peak_mb(),
        "values": {name: float(v) for name, v in result.items()},
    }


def wait_policy_env(policy: str) -> dict[str, str]:
    """The workers' ``OMP_WAIT_POLICY`` (``default``: not set, OpenMP's own)."""
    return {} if policy == "default" else {"OMP_WAIT_POLICY": policy}


def base_spec(args: argparse.Namespace, n: int) -> dict[str, Any]:
    return {"n": n, "dim": args.dim, "classes": args.classes, "noise": args.noise, "seed": 0}


def run_size(args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    """Every mode with both libraries at one N, interleaved over the rounds: one row per mode."""
    spec = base_spec(args, n)
    env = wait_policy_env(args.wait_policy)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {
        (mode, lib): [] for mode in args.modes for lib in LIBRARIES
    }
    for round_ in range(args.repeats):
        for mode in args.modes:
            order = LIBRARIES if round_ % 2 == 0 else LIBRARIES[::-1]
            for lib in order:
                task = {**spec, "task": lib, "mode": mode}
                result = run_worker(__file__, task, args.timeout, args.threads, env)
                print(f"  N={n} round {round_ + 1} {mode} {lib}: {summary(result)}", flush=True)
                runs[mode, lib].append(result)
    rows = []
    for mode in args.modes:
        row: dict[str, Any] = {"n": n, "mode": mode}
        for lib in LIBRARIES:
            results = runs[mode, lib]
            ok = [r for r in results if r.get("status") == "ok"]
            row[lib] = {
                "status": "ok" if ok else results[0].get("status"),
                "seconds": [r.get("seconds") for r in results],
                "median_seconds": statistics.median(r["seconds"] for r in ok) if ok else None,
                "values": ok[0]["values"] if ok else None,
            }
            if args.memory:
                task = {**spec, "task": lib, "mode": mode}
                memory = run_worker(
                    __file__, task, args.timeout, args.threads, {**MEMORY_ENV, **env}
                )
                print(f"  N={n} memory {mode} {lib}: {summary(memory)}", flush=True)
                row[lib]["peak_mb"] = memory.get("peak_mb")
        ratios = [
            ours["seconds"] / theirs["seconds"]
            for ours, theirs in zip(runs[mode, "deepmetric"], runs[mode, "pml"], strict=True)
            if ours.get("status") == theirs.get("status") == "ok"
        ]
        row["ratios"] = ratios  # ours / PML, one per round
        ours_values, theirs_values = row["deepmetric"]["values"], row["pml"]["values"]
        if ours_values and theirs_values:
            diff = max(abs(ours_values[name] - theirs_values[name]) for name in theirs_values)
            row["max_abs_difference"] = diff
            row["values_equal"] = set(ours_values) == set(theirs_values) and diff <= args.tolerance
            row["map_at_r"] = theirs_values.get("mean_average_precision_at_r")
        rows.append(row)
    return rows


def run_memory_at(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """deepmetric alone: ``--memory-queries`` queries against all ``n`` references, in one
    fresh process with the memory settings (time and peak memory of that one call)."""
    spec = {**base_spec(args, n), "task": "deepmetric", "queries": min(n, args.memory_queries)}
    env = {**MEMORY_ENV, **wait_policy_env(args.wait_policy)}
    result = run_worker(__file__, spec, args.timeout, args.threads, env)
    print(f"  N={n} {spec['queries']} queries, deepmetric: {summary(result)}", flush=True)
    data_mb = n * (args.dim * 4 + 8) / 2**20
    return {"n": n, "queries": spec["queries"], "data_mb": data_mb, **result}


def summary(result: dict[str, Any]) -> str:
    if result.get("status") != "ok":
        return str(result.get("status"))
    return f"{result['seconds']:.2f} s, peak {result['peak_mb']:.0f} MiB"


def table(rows: list[dict[str, Any]], memory: bool) -> str:
    headers = ["N", "mode", "PML s", "ours s", "ours/PML", "range", "MAP@R", "equal", "max |diff|"]
    if memory:
        headers += ["PML MiB", "ours MiB"]
    lines = []
    for row in rows:
        pml, ours, ratios = row["pml"], row["deepmetric"], row["ratios"]
        line = [
            f"{row['n']:,}",
            row["mode"],
            fmt(pml["median_seconds"], ".2f") if pml["status"] == "ok" else pml["status"],
            fmt(ours["median_seconds"], ".2f") if ours["status"] == "ok" else ours["status"],
            fmt(statistics.median(ratios) if ratios else None, ".2f"),
            f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "—",
            fmt(row.get("map_at_r"), ".3f"),
            str(row.get("values_equal", "—")),
            fmt(row.get("max_abs_difference"), ".1e"),
        ]
        if memory:
            line += [fmt(pml.get("peak_mb"), ".0f"), fmt(ours.get("peak_mb"), ".0f")]
        lines.append(line)
    return format_table(headers, lines, left=(1,))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 5k only")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--repeats", type=int, default=5, help="rounds per N (median)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=500)
    parser.add_argument(
        "--noise", type=float, default=1.5, help="standard deviation around a centre"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--wait-policy",
        default="default",
        help="OMP_WAIT_POLICY of the workers: PASSIVE, ACTIVE or default (left unset)",
    )
    parser.add_argument("--load", action="store_true", help="measure under a competing load")
    parser.add_argument("--load-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--memory", action="store_true", help="also each case's peak memory")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="'equal' up to this")
    parser.add_argument("--output", type=Path)
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
        args.sizes = [5_000] if args.quick else [5_000, 20_000, 50_000]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose among {list(MODES)}")
    if args.output is None:
        args.output = RESULTS / ("evaluation_load.json" if args.load else "evaluation.json")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        emit_result(worker(json.loads(args.worker)))
        return
    with competing_load(args.load_threads if args.load else None):
        rows = [row for n in args.sizes for row in run_size(args, n)]
        at_scale = [run_memory_at(args, n) for n in args.memory_at]
    print()
    print(table(rows, args.memory))
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
            "noise": args.noise,
            "modes": args.modes,
            "repeats": args.repeats,
            "omp_wait_policy": args.wait_policy,
            "load_threads": args.load_threads if args.load else None,
            "tolerance": args.tolerance,
        },
        "cases": rows,
        "memory_at_scale": at_scale,
    }
    write_json(args.output, payload)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
