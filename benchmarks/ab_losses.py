"""A/B timing of deepmetric's losses: the working tree against an earlier commit.

A change to the pair engine should not slow any loss down. Comparing each against PML in two
separate runs of ``losses.py`` mixes the change with PML's and the machine's run-to-run
variation (PML's time for one case has moved by 2x between runs); this compares the two
versions of deepmetric directly. For each case, ``--rounds`` pairs of fresh processes, the two
versions alternating (old, new, then new, old, ...), each timing ``--repeats`` steps of the loss
alone (as ``losses.py --max-batch`` does: miner, forward and backward, after a warm-up step,
with the same inputs; freed heap memory kept, as in ``losses.py``'s timed processes); per round
the ratio new / old of the median step times. Reported: each version's median time, and the
median ratio with its range. Memory is ``losses.py``'s to measure.

Run from the repository root::

    python benchmarks/ab_losses.py --old 4abba5c --losses LiftedStructureLoss --sizes 512,1024
    python benchmarks/ab_losses.py --old HEAD~3 --rounds 8

Results go to ``benchmarks/results/ab_losses.json``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import losses as grid
from _common import TIMING_ENV, fmt, format_table, machine_info, run_worker, write_json

ROOT = Path(__file__).resolve().parent.parent
HEADERS = ("case", "B", "K", "old ms", "new ms", "new/old median", "range")


def export_source(rev: str, into: Path) -> Path:
    """``src/`` of commit ``rev`` written below ``into``; returns that ``src`` folder."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def time_version(
    args: argparse.Namespace, case: grid.Case, b: int, k: int, source: Path
) -> dict[str, Any]:
    """One fresh process of the deepmetric found in ``source``: its median ms per step."""
    spec = grid.worker_spec(args, case, "max_batch", ["ours"], b, k)
    env = dict(TIMING_ENV, PYTHONPATH=str(source))
    result = run_worker(grid.SCRIPT, spec, args.timeout, args.threads, env)
    return result.get("libraries", {}).get("ours", {"status": result.get("status")})


def compare_case(
    args: argparse.Namespace, case: grid.Case, b: int, k: int, old: Path, new: Path
) -> dict[str, Any]:
    """``--rounds`` alternating pairs of processes for one case."""
    rounds: list[dict[str, Any]] = []
    for index in range(args.rounds):
        order = [("old", old), ("new", new)]
        if index % 2:
            order.reverse()
        measured = {name: time_version(args, case, b, k, source) for name, source in order}
        rounds.append(measured)
        if any(m.get("status") != "ok" for m in measured.values()):
            break
    row: dict[str, Any] = {"case": case.name, "batch_size": b, "per_class": k, "rounds": rounds}
    ok = [r for r in rounds if all(m.get("status") == "ok" for m in r.values())]
    if ok:
        ratios = sorted(r["new"]["median_ms"] / r["old"]["median_ms"] for r in ok)
        for name in ("old", "new"):
            row[f"{name}_ms"] = statistics.median(r[name]["median_ms"] for r in ok)
        row |= {"ratio": statistics.median(ratios), "ratio_min": ratios[0]}
        row["ratio_max"] = ratios[-1]
    else:
        row["status"] = "; ".join(str(m.get("status")) for m in rounds[-1].values())
    return row


def table_row(row: dict[str, Any]) -> list[str]:
    spread = f"{fmt(row.get('ratio_min'), '.2f')}-{fmt(row.get('ratio_max'), '.2f')}"
    return [
        row["case"],
        str(row["batch_size"]),
        str(row["per_class"]),
        fmt(row.get("old_ms"), ".1f"),
        fmt(row.get("new_ms"), ".1f"),
        fmt(row.get("ratio"), ".2f") if "ratio" in row else row.get("status", "")[:60],
        spread if "ratio" in row else "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", required=True, help="the commit to compare with (any git rev)")
    parser.add_argument("--losses", default="", help="case or loss names, as in losses.py")
    parser.add_argument("--sizes", default="512,1024", help="batch sizes, e.g. 512,1024")
    parser.add_argument("--per-class", default="4", help="samples per class, e.g. 4,8")
    parser.add_argument("--rounds", type=int, default=6, help="pairs of processes per case")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per process")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ab_losses.json")
    args = parser.parse_args(argv)
    # the settings losses.py's worker reads
    args.device, args.autocast, args.mem_cap_gb, args.time_budget = "cpu", "none", 16.0, 120.0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    per_class = [int(k) for k in args.per_class.split(",") if k]
    cases = grid.discover_cases([n for n in args.losses.split(",") if n] or None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = export_source(args.old, Path(tmp))
        new = ROOT / "src"
        for case in cases:
            for b in sizes:
                for k in per_class:
                    rows.append(compare_case(args, case, b, k, old, new))
                    print(" | ".join(table_row(rows[-1])), flush=True)
    print()
    print(format_table(HEADERS, [table_row(row) for row in rows], left=(0,)))
    payload = {
        "machine": machine_info(args.threads, "cpu"),
        "settings": {"old": args.old, "rounds": args.rounds, "repeats": args.repeats},
        "results": rows,
    }
    write_json(args.out, payload)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
