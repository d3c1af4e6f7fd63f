"""Retrieval and clustering accuracy of an embedding: a streamed drop-in for PML's
``AccuracyCalculator``, and the exact nearest-neighbour search the rest of deepmetric shares.

Every query is ranked against a reference set by squared Euclidean distance (what PML's default
``FaissKNN`` uses: ``faiss.IndexFlatL2`` on the raw embeddings), and the metrics read where each
query's *positives* (references sharing its label) land in that ranking. One concept per module:

* :mod:`~deepmetric.evaluation.neighbors`: exact k nearest neighbours
  (:func:`nearest_neighbors`, :func:`neighbor_chunks`: blocks of distances, a few large
  operations each), and :func:`knn`, the same search called as PML's ``knn_func``;
* :mod:`~deepmetric.evaluation.ranks`: the ranks of each query's positives, chunk by chunk,
  from the nearest neighbours or, for rankings deeper than a top-k should hold (PML's default
  ``k=None`` ranks every reference), by counting;
* :mod:`~deepmetric.evaluation.metrics`: the metrics from those ranks
  (:func:`metrics_from_ranks`: precision@1, R-precision, MAP@R, MAP, MRR, Recall@K), and
  NMI/AMI of a faiss k-means;
* :mod:`~deepmetric.evaluation.calculator`: :class:`AccuracyCalculator`, PML's class name,
  arguments, defaults and results; only the sums of the per-query metrics are kept, so memory is
  bounded by the chunk size, not by ``Nq × k``.

Deliberate differences from PML 2.9.0 are listed in :class:`AccuracyCalculator`.
"""

from .calculator import LOGGER, AccuracyCalculator, Array, KMeansFn
from .metrics import (
    ALL_METRICS,
    CLUSTERING_METRICS,
    DEFAULT_METRICS,
    KNN_METRICS,
    RECALL_KS,
    RECALL_METRICS,
    clustering_scores,
    faiss_kmeans,
    metrics_from_ranks,
)
from .neighbors import (
    AUGMENTED_CACHE_BYTES,
    BLOCK_ENTRIES,
    DEFAULT_CHUNK_SIZE,
    FAISS_RESULT_BYTES,
    NORM_CHUNK_ROWS,
    knn,
    nearest_neighbors,
    neighbor_chunks,
    row_squared_norms,
    topk_key_chunks,
)
from .ranks import (
    TOPK_MAX_FRACTION,
    TOPK_MAX_K,
    KnnFn,
    LabelComparisonFn,
    label_match_counts,
    rank_chunks,
    rank_chunks_by_counting,
    ranks_from_hits,
)

__all__ = [
    "ALL_METRICS",
    "AUGMENTED_CACHE_BYTES",
    "BLOCK_ENTRIES",
    "CLUSTERING_METRICS",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_METRICS",
    "FAISS_RESULT_BYTES",
    "KNN_METRICS",
    "LOGGER",
    "NORM_CHUNK_ROWS",
    "RECALL_KS",
    "RECALL_METRICS",
    "TOPK_MAX_FRACTION",
    "TOPK_MAX_K",
    "AccuracyCalculator",
    "Array",
    "KMeansFn",
    "KnnFn",
    "LabelComparisonFn",
    "clustering_scores",
    "faiss_kmeans",
    "knn",
    "label_match_counts",
    "metrics_from_ranks",
    "nearest_neighbors",
    "neighbor_chunks",
    "rank_chunks",
    "rank_chunks_by_counting",
    "ranks_from_hits",
    "row_squared_norms",
    "topk_key_chunks",
]
