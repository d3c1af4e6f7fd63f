"""Peak memory of ``deepmetric train`` on folders of JPEG photos: RAM must hold a batch, not the
dataset (issue 14: 50,000 photos at 224 px under 2 GB, within 20% of the same run on 5,000).

    python benchmarks/train_memory.py --counts 5000 50000 [--workers 2] [--data /tmp/dm-photos]

For each count, a folder of synthetic product photos at 224 px is generated once (cached under
``--data``), then one ``deepmetric train`` runs in a fresh process: one epoch of the small CNN at
64 px with ``--num-workers`` decoding processes, then the scores and report of a finished run.
A sampler reads the memory of the command (resident, RSS) and of its whole process tree
(proportional set size, PSS: shared pages counted once) every 0.2 s; the table shows the peaks.
Writes ``benchmarks/results/train_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "train_memory.json"


def _memory_mb(pid: int, field: str) -> float:
    """``VmRSS`` (resident) from ``/proc/PID/status``, or ``Pss`` (proportional: pages shared
    by several processes split between them, so a tree's sum counts torch's libraries once)
    from ``/proc/PID/smaps_rollup``."""
    source = "status" if field == "VmRSS" else "smaps_rollup"
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            found += [int(c) for c in text]
    except OSError:
        pass
    return found + [g for c in found for g in _children(c)]


def measure(command: list[str]) -> dict[str, float]:
    """Run ``command``; peak RSS (MB) of it alone and of its process tree, and its seconds."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks = {"main": 0.0, "tree": 0.0}

    def sample() -> None:
        while process.poll() is None:
            main = _memory_mb(process.pid, "VmRSS")
            tree = _memory_mb(process.pid, "Pss")
            tree += sum(_memory_mb(c, "Pss") for c in _children(process.pid))
            peaks["main"], peaks["tree"] = max(peaks["main"], main), max(peaks["tree"], tree)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output.decode()[-3000:]}")
    return {**peaks, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("/tmp/dm-photos"))
    options = parser.parse_args()
    from deepmetric.data.synthetic import make_products

    rows = []
    for count in options.counts:
        folder = options.data / f"products-{count}"
        if not (folder / "done").is_file():
            started = time.perf_counter()
            make_products(folder, products=count // 10, photos=10, size=224, seed=0)
            (folder / "done").write_text("")
            print(f"generated {count} photos in {time.perf_counter() - started:.0f} s")
        out = options.data / f"run-{count}"
        command = [
            sys.executable, "-m", "deepmetric", "train", "--dataset", f"folder:{folder}",
            "--out", str(out), "--overwrite", "--no-progress", "--epochs", "1",
            "--image-size", "64", "--test-classes", "0.1", "--val-classes", "0",
            "--num-workers", str(options.workers),
        ]  # fmt: skip
        row = {"images": count, "workers": options.workers, **measure(command)}
        rows.append(row)
        print(
            f"{count:>7} images: peak RSS {row['main']:.0f} MB (command), "
            f"PSS {row['tree']:.0f} MB (with workers), {row['seconds']:.0f} s"
        )
    base = rows[0]
    print("\nimages   command RSS MB   tree PSS MB   vs first   seconds")
    for row in rows:
        ratio = row["tree"] / base["tree"]
        print(
            f"{row['images']:>7}   {row['main']:>13.0f}   {row['tree']:>11.0f}   {ratio:>7.2f}x"
            f"   {row['seconds']:>7.0f}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    RESULTS.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
