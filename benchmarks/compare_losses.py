"""Compare two runs of ``benchmarks/losses.py`` and print the README's summary table.

Each run is one or more JSON files written by ``losses.py`` (a grid measured in halves, e.g.
``--per-class 4`` and ``--per-class 8``, is given as both files). For every case measured in
both runs, the change of deepmetric's speed-up over PML (new speed-up / old speed-up) and of its
peak memory; cases whose speed-up fell by more than ``--tolerance`` are listed. The README table
(speed-ups at B = 512, 1024 and 2048 for K = 4 and 8, milliseconds at B = 512 and megabytes at
B = 2048 for K = 4) is printed from the new run.

Run from the repository root::

    python benchmarks/compare_losses.py --old benchmarks/results/losses.json \\
        --new benchmarks/results/losses_k4_rebuilt.json benchmarks/results/losses_k8_rebuilt.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

Key = tuple[str, int, int]


def load(paths: list[Path]) -> dict[Key, dict[str, Any]]:
    """The results of ``paths`` by (case, B, K); a later file overrides an earlier one."""
    rows: dict[Key, dict[str, Any]] = {}
    for path in paths:
        for row in json.loads(path.read_text())["results"]:
            rows[(row["case"], row["batch_size"], row["per_class"])] = row
    return rows


def speedup_cell(row: dict[str, Any] | None) -> str:
    """A speed-up as the README writes it, or why there is none."""
    if row is None:
        return "n/a"
    if "speedup" in row:
        return f"{row['speedup']:.1f}x"
    if row["pml"].get("status", "").startswith("failed: out of memory"):
        return "PML OOM"
    return "n/a"


def pair_cell(row: dict[str, Any] | None, field: str, digits: int) -> str:
    """``ours / PML`` of ``field`` (``median_ms`` or ``peak_mb``), ``OOM`` for a library that
    ran out of memory, ``n/a`` when the case did not run."""
    if row is None or row["ours"].get(field) is None:
        return "n/a"
    pml = row["pml"].get(field)
    pml_text = "OOM" if pml is None and "out of memory" in row["status"] else fmt(pml, digits)
    return f"{fmt(row['ours'][field], digits)} / {pml_text}"


def fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def readme_table(rows: dict[Key, dict[str, Any]]) -> str:
    """The README's markdown table of the run ``rows``."""
    lines = [
        "| case | B=512 ms, ours / PML | speed-up B=512 (K=4, 8) | B=1024 (K=4, 8) "
        "| B=2048 (K=4, 8) | B=2048 MB, ours / PML |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case in sorted({key[0] for key in rows}):
        cells = [case, pair_cell(rows.get((case, 512, 4)), "median_ms", 1)]
        for size in (512, 1024, 2048):
            k4, k8 = rows.get((case, size, 4)), rows.get((case, size, 8))
            cells.append(f"{speedup_cell(k4)}, {speedup_cell(k8)}")
        cells.append(pair_cell(rows.get((case, 2048, 4)), "peak_mb", 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def changes(
    old: dict[Key, dict[str, Any]], new: dict[Key, dict[str, Any]], tolerance: float
) -> str:
    """One line per case timed in both runs whose speed-up fell by more than ``tolerance``,
    then a summary of all of them."""
    ratios: dict[Key, float] = {}
    for key in sorted(old.keys() & new.keys()):
        if "speedup" in old[key] and "speedup" in new[key]:
            ratios[key] = new[key]["speedup"] / old[key]["speedup"]
    lines = ["case, B, K: speed-up old -> new (new/old), ms ours old -> new, ms PML old -> new"]
    for key, ratio in ratios.items():
        if ratio < 1 - tolerance:
            o, n = old[key], new[key]
            lines.append(
                f"{key[0]}, {key[1]}, {key[2]}: {o['speedup']:.2f}x -> {n['speedup']:.2f}x "
                f"({ratio:.2f}), ours {o['ours']['median_ms']:.1f} -> "
                f"{n['ours']['median_ms']:.1f}, PML {o['pml']['median_ms']:.1f} -> "
                f"{n['pml']['median_ms']:.1f}"
            )
    within = sum(ratio >= 1 - tolerance for ratio in ratios.values())
    values = sorted(ratios.values())
    if values:
        lines.append(
            f"{within} of {len(values)} cases within {tolerance:.0%} of their old speed-up or "
            f"better; new/old median {statistics.median(values):.2f}, "
            f"range {values[0]:.2f}-{values[-1]:.2f}"
        )
    memory = [
        new[key]["ours"]["peak_mb"] - old[key]["ours"]["peak_mb"]
        for key in old.keys() & new.keys()
        if old[key]["ours"].get("peak_mb") is not None
        and new[key]["ours"].get("peak_mb") is not None
    ]
    if memory:
        lines.append(
            f"our peak memory new - old over {len(memory)} cases: "
            f"{min(memory):+.1f} to {max(memory):+.1f} MB"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, nargs="+", required=True, help="the earlier run")
    parser.add_argument("--new", type=Path, nargs="+", required=True, help="the later run")
    parser.add_argument(
        "--tolerance", type=float, default=0.1, help="fall of the speed-up to list (0.1 = 10%%)"
    )
    args = parser.parse_args(argv)
    old, new = load(args.old), load(args.new)
    print(changes(old, new, args.tolerance))
    print()
    print(readme_table(new))


if __name__ == "__main__":
    main()
