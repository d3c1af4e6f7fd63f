"""The drop-in for PML's ``AccuracyCalculator``: its arguments, defaults and results, from the
streamed rankings of :mod:`~deepmetric.evaluation.ranks` and the metrics of
:mod:`~deepmetric.evaluation.metrics`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import check_labels
from .metrics import (
    ALL_METRICS,
    CLUSTERING_METRICS,
    DEFAULT_METRICS,
    KNN_METRICS,
    RECALL_KS,
    clustering_scores,
    faiss_kmeans,
    metrics_from_ranks,
)
from .neighbors import (
    DEFAULT_CHUNK_SIZE,
    ENGINES,
    Engine,
    _as_float32,
    _as_tensor,
    _check_pair,
    one_thread,
)
from .ranks import KnnFn, LabelComparisonFn, _same_label, label_match_counts, rank_chunks

LOGGER = logging.getLogger("deepmetric.evaluation")

Array = Tensor | np.ndarray  # what get_accuracy accepts, as PML does
KMeansFn = Callable[[Tensor, int], Tensor]


# --------------------------------------------------------------------------------------------
# The drop-in calculator
# --------------------------------------------------------------------------------------------
def _check_metric_names(include: Any, exclude: Any) -> None:
    for names in (include, exclude):
        if not isinstance(names, (tuple, list)):
            raise TypeError(f"Arguments must be of type tuple, not {type(names)}.")
        unknown = set(names) - set(ALL_METRICS)
        if unknown:
            raise ValueError(
                f"Unknown metrics {sorted(unknown)}; metrics must be one or more of: "
                f"{list(ALL_METRICS)}."
            )


class AccuracyCalculator:
    """Retrieval and clustering accuracy, with PML 2.9.0's class name, arguments, defaults and
    results: ``get_accuracy(query, query_labels, reference=None, reference_labels=None,
    ref_includes_query=False, include=(), exclude=())`` -> ``{metric name: float}``.

    Metrics (see the module docstring): ``precision_at_1``, ``r_precision``,
    ``mean_average_precision_at_r`` (Musgrave, Belongie & Lim, 2020), ``mean_average_precision``,
    ``mean_reciprocal_rank``, ``NMI``, ``AMI``, and, only when named in ``include``,
    ``recall_at_1``/``_2``/``_4``/``_8`` (Recall@K of deep-metric-learning papers; Song et al.,
    2016). Queries whose label has no other reference are left out of the retrieval metrics
    (every one of them: ``nan``), as in PML.

    Args:
        include, exclude: metric names to compute / skip (``include=()``: PML's seven).
        avg_of_avgs: average per class first, then over classes.
        return_per_class: a list of per-class averages (sorted labels) instead of one number.
        k: neighbours looked at: ``None`` (every reference, PML's default), ``"max_bin_count"``
            (the largest number of references sharing a query label: enough for the R-metrics,
            and much cheaper) or a positive int.
        label_comparison_fn: ``fn(labels_a, labels_b) -> bool tensor`` on broadcastable 1-D
            integer labels, instead of equality (not with NMI/AMI, as in PML).
        device: where to compute (default: CUDA if available, like PML).
        knn_func: PML-style ``knn_func(query, k, reference, ref_includes_query) -> (distances,
            indices)``; default: the streamed exact search of this module.
        kmeans_func: ``kmeans_func(query, n_clusters) -> cluster index per query``; default:
            faiss k-means with ``niter=20`` (PML's ``FaissKMeans``).
        chunk_size: (deepmetric only) queries per chunk of the rank-counting pass (deep
            rankings, ``k=None``) and references per block of it.
        engine: (deepmetric only) the nearest-neighbour search: ``"torch"`` (blocks of
            distances, any device) or ``"faiss"`` (PML's kernel, CPU only); see
            :mod:`~deepmetric.evaluation.neighbors`. The same neighbours either way, up to
            float32 rounding of nearly equal distances.

    Shapes: query ``(Nq, D)``, query_labels ``(Nq,)``, reference ``(Nr, D)``, reference_labels
    ``(Nr,)``; numpy arrays are accepted too.

    Differences from PML 2.9.0, all deliberate:

    * Never an ``Nq × k`` neighbour list (unless a ``knn_func`` is passed): memory is bounded by
      one block of the search (:data:`~deepmetric.evaluation.neighbors.BLOCK_ENTRIES`) and the
      chunk size, so the default ``k=None`` works at any N (PML needs ``Nq × Nr`` × 12 bytes
      for the faiss search alone, and more for its float64 metric tensors).
    * Ties in distance are broken by the smaller reference index (faiss' order as well); the
      query itself is excluded by index, never by distance.
    * Labels must be 1-D integer tensors (PML casts them to float32, which merges labels above
      2**24); embeddings must be floating point, finite, and are ranked in float32, as in PML.
    * An int ``k`` larger than the number of references is clamped to it (faiss returns index
      ``-1`` there, which PML silently reads as the last reference's label).
    * ``mean_reciprocal_rank`` alone works (PML forgets to run the k-NN search for it), and is
      computed in float64 like the others (PML averages it in float32: ~1e-7 apart).
    * The ``recall_at_K`` metrics are extra; custom ``calculate_*`` methods of a subclass are
      not called (a subclass defining one raises ``NotImplementedError``).
    """

    def __init__(
        self,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        avg_of_avgs: bool = False,
        return_per_class: bool = False,
        k: int | str | None = None,
        label_comparison_fn: LabelComparisonFn | None = None,
        device: torch.device | str | None = None,
        knn_func: KnnFn | None = None,
        kmeans_func: KMeansFn | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        engine: Engine = "torch",
    ) -> None:
        custom = [name for name in dir(self) if name.startswith("calculate_")]
        if custom:
            raise NotImplementedError(
                f"deepmetric's AccuracyCalculator computes a fixed set of metrics from streamed "
                f"rankings and does not call custom methods {custom}"
            )
        _check_metric_names(include, exclude)
        self.original_metrics = [
            m for m in ALL_METRICS if m in (include or DEFAULT_METRICS) and m not in exclude
        ]
        self.curr_metrics = list(self.original_metrics)
        if avg_of_avgs and return_per_class:
            raise ValueError("avg_of_avgs and return_per_class are mutually exclusive")
        self.avg_of_avgs = avg_of_avgs
        self.return_per_class = return_per_class
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.knn_func = knn_func
        self.kmeans_func = kmeans_func
        if not (isinstance(k, int) and k > 0) and k not in (None, "max_bin_count"):
            raise ValueError("k must be an integer greater than 0, or None, or 'max_bin_count'")
        self.k = k
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.engine = engine
        self.label_comparison_fn = label_comparison_fn
        if label_comparison_fn is not None and any(
            m in self.requires_clustering() for m in self.get_curr_metrics()
        ):
            raise NotImplementedError("Unsupported: clustering + custom label comparison")

    # -- PML's public helpers ------------------------------------------------------------------
    def get_curr_metrics(self) -> list[str]:
        return list(self.curr_metrics)

    def requires_clustering(self) -> list[str]:
        return list(CLUSTERING_METRICS)

    def requires_knn(self) -> list[str]:
        return list(KNN_METRICS)

    def description(self) -> str:
        return "avg_of_avgs" if self.avg_of_avgs else ""

    def determine_k(
        self, bin_counts: Tensor, num_reference_embeddings: int, ref_includes_query: bool
    ) -> int:
        """PML's choice of k (before clamping to the number of references)."""
        self_count = int(ref_includes_query)
        max_bin_count = int(bin_counts.max())
        if self.k == "max_bin_count":
            return max_bin_count - self_count
        if self.k is None:
            return num_reference_embeddings - self_count
        assert isinstance(self.k, int)
        r_metrics = {"r_precision", "mean_average_precision_at_r"} & set(self.curr_metrics)
        if self.k < max_bin_count and r_metrics:
            LOGGER.warning(
                "You are computing %s, but k (%d) is less than the max bin count (%d), so these "
                "metrics will be incorrect. Set k='max_bin_count', or use "
                "'mean_average_precision' for MAP@%d.",
                sorted(r_metrics),
                self.k,
                max_bin_count,
                self.k,
            )
        return self.k

    # -- evaluation ------------------------------------------------------------------------------
    def get_accuracy(
        self,
        query: Array,
        query_labels: Array,
        reference: Array | None = None,
        reference_labels: Array | None = None,
        ref_includes_query: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> dict[str, Any]:
        """``{metric: value}`` for the queries ranked against the references (the queries
        themselves, each excluding itself, when ``reference`` is None)."""
        query = _as_float32(query, "query").to(self.device)
        query_labels = check_labels(
            _as_tensor(query_labels, "query_labels").to(self.device), query, "query_labels"
        )
        if reference is None:
            reference, reference_labels, ref_includes_query = query, query_labels, True
        else:
            if reference_labels is None:
                raise ValueError("reference_labels must be given with reference")
            reference = _as_float32(reference, "reference").to(self.device)
            reference_labels = check_labels(
                _as_tensor(reference_labels, "reference_labels").to(self.device),
                reference,
                "reference_labels",
            )
            _check_pair(query, reference, ref_includes_query)
            if ref_includes_query and not torch.equal(query_labels, reference_labels[: len(query)]):
                raise ValueError(
                    "When ref_includes_query is True, the first len(query_labels) elements of "
                    "reference_labels must be equal to query_labels"
                )
        self.curr_metrics = [
            m for m in self.original_metrics if (not include or m in include) and m not in exclude
        ]
        results: dict[str, Any] = {}
        retrieval = [m for m in self.curr_metrics if m in KNN_METRICS]
        if retrieval:
            results.update(
                self._retrieval_metrics(
                    query, query_labels, reference, reference_labels, ref_includes_query, retrieval
                )
            )
        if any(m in CLUSTERING_METRICS for m in self.curr_metrics):
            n_clusters = len(torch.unique(query_labels))
            if self.kmeans_func is None:
                clusters = faiss_kmeans(query, n_clusters, gpu=self.device.type == "cuda")
            else:
                clusters = self.kmeans_func(query, n_clusters)
            results.update(clustering_scores(query_labels, torch.as_tensor(clusters)))
        return {m: results[m] for m in self.curr_metrics}

    def _retrieval_metrics(
        self,
        query: Tensor,
        query_labels: Tensor,
        reference: Tensor,
        reference_labels: Tensor,
        ref_includes_query: bool,
        names: list[str],
    ) -> dict[str, Any]:
        fn = self.label_comparison_fn
        unique, counts, label_index = label_match_counts(query_labels, reference_labels, fn)
        self_count = int(ref_includes_query)
        if ref_includes_query:
            matches_itself = _same_label(fn, unique, unique).long()
            lone_label = counts - matches_itself <= 0
        else:
            lone_label = counts == 0
        scored = ~lone_label[label_index]
        if not bool(scored.any()):
            LOGGER.warning("None of the query labels are in the reference set.")
            nan: float | list[float] = (
                [math.nan] * len(unique) if self.return_per_class else math.nan
            )
            return {name: nan for name in names}

        num_relevant = counts[label_index] - self_count
        available = len(reference) - self_count
        k = min(self.determine_k(counts, len(reference), ref_includes_query), available)
        recall_ks = [rk for rk in RECALL_KS if f"recall_at_{rk}" in names]
        max_rank = min(max([k, *recall_ks]), available)

        classes = torch.unique(query_labels[scored])
        sums = {name: torch.zeros(len(classes), dtype=torch.float64) for name in names}
        sizes = torch.zeros(len(classes), dtype=torch.float64)
        for ids, ranks in rank_chunks(
            query,
            query_labels,
            reference,
            reference_labels,
            ref_includes_query,
            max_rank,
            fn,
            self.knn_func,
            self.chunk_size,
            self.engine,
        ):
            with one_thread():  # small operators (see one_thread)
                keep = scored[ids]
                if not bool(keep.any()):
                    continue
                ids = ids[keep]
                per_query = metrics_from_ranks(ranks[keep], num_relevant[ids], k, recall_ks)
                cls = torch.searchsorted(classes, query_labels[ids]).cpu()
                for name in names:
                    sums[name].index_add_(0, cls, per_query[name].cpu())
                sizes.index_add_(0, cls, torch.ones(len(cls), dtype=torch.float64))
        return {name: self._average(sums[name], sizes) for name in names}

    def _average(self, sums: Tensor, sizes: Tensor) -> float | list[float]:
        if self.return_per_class:
            return (sums / sizes).tolist()
        if self.avg_of_avgs:
            return float((sums / sizes).mean())
        return float(sums.sum() / sizes.sum())
