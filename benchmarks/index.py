"""Search throughput, recall and edit costs of deepmetric's EmbeddingIndex (faiss underneath).

For each size N (100k and 1M; ``--quick``: 100k only) of 128-dimensional float32 embeddings:

* **data**: clustered, with the low intrinsic dimension of a trained model's embeddings:
  ``N / 100`` centres drawn from ``N(0, 0.5²)``, each point its centre plus unit Gaussian noise
  in a random 32-dimensional subspace plus ``N(0, 0.1²)`` noise in all 128 dimensions. Queries
  are fresh points from the same distribution. The index normalises (its default), so search is
  by cosine similarity;
* **ground truth**: the exact top 10 of every query by brute force in torch (matrix products
  over chunks of the references, a running ``topk``), independently of faiss;
* **build**: seconds to fill each index: flat; IVF with ``nlist`` = 4·√N rounded to a power of
  two, trained on 64·nlist points; HNSW with M = 32 and efConstruction = 40 (the defaults);
* **search**: queries per second (``Nq`` queries searched as one batch, median of
  ``--repeats``), the median milliseconds of a search for one query at a time (the first
  :data:`SINGLE_QUERIES` queries; what a live lookup waits, where a flat index cannot use a
  matrix product over many queries) and recall@10 (the share of the true top 10 returned)
  for each knob setting: flat; IVF ``nprobe`` = nlist / :data:`NPROBE_DIVISORS` (the same
  shares of the cells at every N: 8, 32, 128 of 1024 cells at 100k, 32, 128, 512 of 4096 at
  1M); HNSW ``efSearch`` in :data:`EF_SEARCHES`;
* **edits**: milliseconds to add 10k new items to the full index, then to remove 10k random
  stored ones (HNSW: tombstones), recall@10 after both (against a brute force over the edited
  set), and the seconds :meth:`~deepmetric.index.EmbeddingIndex.compact` takes (HNSW: rebuild
  without tombstones; IVF: re-train the cells).

Run from the repository root::

    python benchmarks/index.py --quick        # 100k only, 1000 queries (about 2 minutes)
    python benchmarks/index.py                # 100k and 1M, 10000 queries (see below)
    python benchmarks/index.py --sizes 1000000 --queries 200 --repeats 1 --kinds flat \
        --out /tmp/index-1m.json              # the 1M path in about a minute

Results go to ``benchmarks/results/index.json`` with a description of the machine and the
peak resident memory of the run. The full run needs about 4-5 GB of memory (3.0 GB measured
for the flat index alone at 1M) and, extrapolated from runs at 250k, about 15 minutes on 2
idle cores of an AMD EPYC server (about 25 on one), four fifths of it at 1M: the HNSW build
and its ``compact()`` rebuild (~3 min each on one core), the IVF searches at nprobe = 512 and
its re-training in ``compact()`` (~3 min each), the flat searches and the brute-force truth.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from _common import fmt, format_table, machine_info, write_json

from deepmetric.index import EmbeddingIndex

RESULTS = Path(__file__).resolve().parent / "results"

DIM = 128
INTRINSIC_DIM = 32
CENTRE_SCALE = 0.5
NOISE = 0.1
POINTS_PER_CLUSTER = 100
K = 10
EDIT_SIZE = 10_000
NPROBE_DIVISORS = (128, 32, 8)
EF_SEARCHES = (32, 64, 128)
SINGLE_QUERIES = 200
SEED = 0
KINDS = ("flat", "ivf", "hnsw")
#: Ground truth: at most this many query-reference scores (float32) in memory at once.
GROUND_TRUTH_SCORES = 1 << 28  # 1 GiB


# -- data and ground truth -----------------------------------------------------------------------


class ClusteredData:
    """Draws points from one fixed clustered distribution (see the module documentation)."""

    def __init__(self, n_clusters: int, seed: int = SEED) -> None:
        self.rng = np.random.default_rng(seed)
        self.centres = (CENTRE_SCALE * self.rng.standard_normal((n_clusters, DIM))).astype(
            np.float32
        )
        basis = self.rng.standard_normal((INTRINSIC_DIM, DIM)) / math.sqrt(INTRINSIC_DIM)
        self.basis = basis.astype(np.float32)

    def sample(self, n: int, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
        """``(n, DIM)`` float32 points and their ``(n,)`` cluster labels."""
        labels = self.rng.integers(0, len(self.centres), n)
        points = np.empty((n, DIM), dtype=np.float32)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = self.centres[labels[start:stop]]
            block += (
                self.rng.standard_normal((stop - start, INTRINSIC_DIM), np.float32) @ self.basis
            )
            block += NOISE * self.rng.standard_normal((stop - start, DIM), np.float32)
            points[start:stop] = block
        return points, labels


def unit_rows(x: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(x)
    return tensor / tensor.norm(dim=1, keepdim=True).clamp_min(1e-12)


def brute_force_top_k(
    stored: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> np.ndarray:
    """``(Nq, k)`` ids of the largest cosine similarities, by torch matrix products over
    chunks of the references (at most :data:`GROUND_TRUTH_SCORES` scores at a time)."""
    q = unit_rows(queries)
    chunk = max(k, GROUND_TRUTH_SCORES // max(1, len(q)))
    best_scores = torch.full((len(q), k), -math.inf)
    best_rows = torch.zeros((len(q), k), dtype=torch.long)
    for start in range(0, len(stored), chunk):
        block = unit_rows(stored[start : start + chunk])
        scores, rows = torch.topk(q @ block.T, min(k, len(block)), dim=1)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_rows = torch.cat([best_rows, rows + start], dim=1)
        best_scores, order = torch.topk(merged_scores, k, dim=1)
        best_rows = torch.gather(merged_rows, 1, order)
    return ids[best_rows.numpy()]


def recall(found: torch.Tensor, truth: np.ndarray) -> float:
    """Share of the true neighbours returned (order ignored)."""
    hits = sum(
        len(set(row.tolist()) & set(true.tolist())) for row, true in zip(found, truth, strict=True)
    )
    return hits / truth.size


# -- measurements --------------------------------------------------------------------------------


def timed(function: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = function()
    return out, time.perf_counter() - start


def build(kind: str, vectors: np.ndarray, labels: np.ndarray) -> tuple[EmbeddingIndex, float]:
    n = len(vectors)
    start = time.perf_counter()
    if kind == "flat":
        index = EmbeddingIndex.flat(DIM)
    elif kind == "ivf":
        nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
        index = EmbeddingIndex.ivf(DIM, nlist=nlist)
        sample = np.random.default_rng(SEED).choice(n, min(n, 64 * nlist), replace=False)
        index.train(vectors[np.sort(sample)])
    else:
        index = EmbeddingIndex.hnsw(DIM)
    index.add(vectors, labels)
    return index, time.perf_counter() - start


def settings(kind: str, nlist: int) -> list[tuple[str, int | None]]:
    """The knob settings searched: IVF ``nprobe`` (a share of the ``nlist`` cells), HNSW
    ``ef_search``, none for flat."""
    if kind == "ivf":
        return [("nprobe", max(1, nlist // divisor)) for divisor in NPROBE_DIVISORS]
    if kind == "hnsw":
        return [("ef_search", value) for value in EF_SEARCHES]
    return [("", None)]


def search_rate(
    index: EmbeddingIndex, queries: np.ndarray, repeats: int
) -> tuple[torch.Tensor, float]:
    """The found ids and the median queries per second over ``repeats`` batch searches."""
    times = []
    for _ in range(repeats):
        result, seconds = timed(lambda: index.search(queries, K))
        times.append(seconds)
    return result.ids, len(queries) / statistics.median(times)


def single_query_ms(index: EmbeddingIndex, queries: np.ndarray) -> float:
    """Median milliseconds to search one query at a time (what a live lookup waits)."""
    times = []
    for query in queries:
        start = time.perf_counter()
        index.search(query[None], K)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_size(
    n: int, n_queries: int, repeats: int, kinds: Sequence[str]
) -> tuple[list[dict[str, Any]], ...]:
    data = ClusteredData(max(1, n // POINTS_PER_CLUSTER))
    vectors, labels = data.sample(n)
    queries, _ = data.sample(n_queries)
    extra, extra_labels = data.sample(EDIT_SIZE)
    ids = np.arange(n, dtype=np.int64)
    truth, truth_s = timed(lambda: brute_force_top_k(vectors, ids, queries, K))
    print(f"N={n:,}: brute-force ground truth for {n_queries:,} queries in {truth_s:.1f} s")

    # The same edits for every kind: 10k new items (ids n, n+1, ...), then 10k stored removed.
    doomed = np.random.default_rng(SEED + 1).choice(n, EDIT_SIZE, replace=False)
    live = np.ones(n + EDIT_SIZE, dtype=bool)
    live[doomed] = False
    all_vectors = np.concatenate([vectors, extra])
    all_ids = np.arange(n + EDIT_SIZE, dtype=np.int64)
    edited_truth = brute_force_top_k(all_vectors[live], all_ids[live], queries, K)

    search_rows: list[dict[str, Any]] = []
    edit_rows: list[dict[str, Any]] = []
    for kind in kinds:
        index, build_s = build(kind, vectors, labels)
        print(f"  {kind}: built in {build_s:.1f} s")
        knobs = settings(kind, index.nlist)
        for knob, value in knobs:
            if value is not None:
                setattr(index, knob, value)
            found, qps = search_rate(index, queries, repeats)
            latency_ms = single_query_ms(index, queries[:SINGLE_QUERIES])
            search_rows.append(
                {
                    "n": n,
                    "kind": kind,
                    "knob": knob,
                    "value": value,
                    "nlist": index.nlist if kind == "ivf" else None,
                    "build_s": build_s,
                    "queries": n_queries,
                    "queries_per_s": qps,
                    "single_query_ms": latency_ms,
                    "recall_at_10": recall(found, truth),
                }
            )
        default_knob, default_value = knobs[(len(knobs) - 1) // 2]
        if default_value is not None:
            setattr(index, default_knob, default_value)
        start = time.perf_counter()
        index.add(extra, extra_labels)
        add_s = time.perf_counter() - start
        start = time.perf_counter()
        index.remove(doomed)
        remove_s = time.perf_counter() - start
        found, _ = search_rate(index, queries, 1)
        assert not np.isin(found.numpy(), doomed).any(), "a removed id was returned"
        row = {
            "n": n,
            "kind": kind,
            "knob": default_knob,
            "value": default_value,
            "nlist": index.nlist if kind == "ivf" else None,
            "add_10k_ms": add_s * 1e3,
            "remove_10k_ms": remove_s * 1e3,
            "recall_at_10_after_edits": recall(found, edited_truth),
            "tombstones": index.n_tombstones,
            "compact_s": None,
            "recall_at_10_after_compact": None,
        }
        if kind != "flat":
            _, row["compact_s"] = timed(index.compact)
            found, _ = search_rate(index, queries, 1)
            row["recall_at_10_after_compact"] = recall(found, edited_truth)
        edit_rows.append(row)
        del index
    return search_rows, edit_rows


# -- reporting -----------------------------------------------------------------------------------


def knob_text(row: dict[str, Any]) -> str:
    if row["kind"] == "ivf":
        return f"nlist={row['nlist']}, nprobe={row['value']}"
    return f"{row['knob']}={row['value']}" if row["knob"] else "exact"


def report(search_rows: list[dict[str, Any]], edit_rows: list[dict[str, Any]]) -> str:
    search_table = format_table(
        ["N", "kind", "setting", "build s", "queries/s", "1 query ms", "recall@10"],
        [
            [
                f"{row['n']:,}",
                row["kind"],
                knob_text(row),
                fmt(row["build_s"], ".1f"),
                fmt(row["queries_per_s"], ",.0f"),
                fmt(row["single_query_ms"], ".3f"),
                fmt(row["recall_at_10"], ".4f"),
            ]
            for row in search_rows
        ],
        left=(1, 2),
    )
    edit_table = format_table(
        ["N", "kind", "setting", "add 10k ms", "remove 10k ms", "recall@10", "compact s", "recall"],
        [
            [
                f"{row['n']:,}",
                row["kind"],
                knob_text(row),
                fmt(row["add_10k_ms"], ",.0f"),
                fmt(row["remove_10k_ms"], ",.0f"),
                fmt(row["recall_at_10_after_edits"], ".4f"),
                fmt(row["compact_s"], ".1f"),
                fmt(row["recall_at_10_after_compact"], ".4f"),
            ]
            for row in edit_rows
        ],
        left=(1, 2),
    )
    return (
        "Search (k = 10; recall against a torch brute force)\n"
        + search_table
        + "\n\nEdits: add 10k, then remove 10k (recall after the edits, then after compact())\n"
        + edit_table
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N = 100k only, 1000 queries")
    parser.add_argument("--sizes", help="comma-separated N, e.g. 100000,1000000")
    parser.add_argument("--queries", type=int, help="queries per search (default 10000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches per setting")
    parser.add_argument("--threads", type=int, default=2, help="faiss and torch threads")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="comma-separated index kinds: flat,ivf,hnsw"
    )
    parser.add_argument("--out", help="JSON output path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    if args.sizes:
        sizes = [int(size) for size in args.sizes.split(",")]
    n_queries = args.queries or (1_000 if args.quick else 10_000)
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise SystemExit(f"unknown index kind(s): {', '.join(unknown)}; choose from {KINDS}")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    search_rows: list[dict[str, Any]] = []
    edit_rows: list[dict[str, Any]] = []
    for n in sizes:
        searched, edited = run_size(n, n_queries, args.repeats, kinds)
        search_rows += searched
        edit_rows += edited
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kB
    print()
    print(report(search_rows, edit_rows))
    print(f"\npeak resident memory {peak_gb:.1f} GiB")
    out = Path(args.out) if args.out else RESULTS / "index.json"
    payload = {
        "machine": machine_info(args.threads, "cpu") | {"faiss": faiss.__version__},
        "config": {
            "quick": args.quick,
            "sizes": sizes,
            "queries": n_queries,
            "repeats": args.repeats,
            "kinds": kinds,
            "k": K,
            "dim": DIM,
            "data": {
                "points_per_cluster": POINTS_PER_CLUSTER,
                "centre_scale": CENTRE_SCALE,
                "intrinsic_dim": INTRINSIC_DIM,
                "noise": NOISE,
                "seed": SEED,
            },
            "edit_size": EDIT_SIZE,
            "metric": "inner_product on normalised embeddings (cosine)",
        },
        "peak_rss_gb": peak_gb,
        "search": search_rows,
        "edits": edit_rows,
    }
    write_json(out, payload)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
