"""The metrics of :class:`~deepmetric.evaluation.AccuracyCalculator`: retrieval metrics from the
ranks of each query's positives, and clustering scores.

* ``precision_at_1``: the nearest reference shares the label;
* ``recall_at_1/2/4/8`` (opt-in): one of the K nearest shares the label -- the "Recall@K" of
  deep-metric-learning papers (Song, Xiang, Jegelka & Savarese, 2016), not information-retrieval
  recall;
* ``r_precision`` and ``mean_average_precision_at_r`` (Musgrave, Belongie & Lim, "A Metric
  Learning Reality Check", 2020), with R the number of the query's positives;
* ``mean_average_precision`` and ``mean_reciprocal_rank`` over the ``k`` nearest neighbours;
* ``NMI`` and ``AMI``: k-means (faiss) on the query embeddings with one cluster per label,
  scored by scikit-learn (Strehl & Ghosh, 2002; Vinh, Epps & Bailey, 2010).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
from torch import Tensor

#: PML's metrics, in the order PML returns them (``include=()`` computes these).
DEFAULT_METRICS = (
    "AMI",
    "NMI",
    "mean_average_precision",
    "mean_average_precision_at_r",
    "mean_reciprocal_rank",
    "precision_at_1",
    "r_precision",
)
#: Recall@K of deep-metric-learning papers; computed only when named in ``include``.
RECALL_KS = (1, 2, 4, 8)
RECALL_METRICS = tuple(f"recall_at_{k}" for k in RECALL_KS)
ALL_METRICS = DEFAULT_METRICS + RECALL_METRICS
CLUSTERING_METRICS = ("NMI", "AMI")
KNN_METRICS = tuple(m for m in ALL_METRICS if m not in CLUSTERING_METRICS)


# --------------------------------------------------------------------------------------------
# The functional core: metrics from the ranks of each query's positives
# --------------------------------------------------------------------------------------------
def metrics_from_ranks(
    ranks: Tensor, num_relevant: Tensor, k: int, recall_ks: Sequence[int] = RECALL_KS
) -> dict[str, Tensor]:
    """Per-query retrieval metrics from where each query's positives appear in its ranking.

    Args:
        ranks: ``(Nq, M)`` 1-based ranks of each query's positives among the references (the
            query itself excluded), ascending along each row; ``inf`` pads rows with fewer than
            ``M`` positives and may stand for any rank beyond ``max(k, max(recall_ks))``.
        num_relevant: ``(Nq,)`` R, the number of references relevant to each query.
        k: how many neighbours PML's metrics look at (``mean_average_precision``,
            ``mean_reciprocal_rank``, and the cut-off of R for the R-metrics).
        recall_ks: the K of each ``recall_at_K``.

    Returns:
        ``{metric name: (Nq,) float64}``, the value PML computes for each query.
    """
    ranks = ranks.to(torch.float64)
    relevant = num_relevant.to(torch.float64)
    n, m = ranks.shape
    first = ranks[:, 0] if m > 0 else ranks.new_full((n,), math.inf)
    ordinal = torch.arange(1, m + 1, dtype=torch.float64, device=ranks.device)
    precision_at_rank = ordinal / ranks  # the i-th positive at rank r: precision i / r (inf -> 0)
    within_k = ranks <= k
    cutoff = relevant.clamp(max=k)  # PML's relevance mask: the first R columns of k
    within_r = ranks <= cutoff.unsqueeze(1)
    metrics = {
        "precision_at_1": (first == 1).to(torch.float64),
        "r_precision": within_r.sum(dim=1) / cutoff,
        "mean_average_precision_at_r": (precision_at_rank * within_r).sum(dim=1) / relevant,
        "mean_average_precision": (precision_at_rank * within_k).sum(dim=1) / relevant,
        "mean_reciprocal_rank": torch.where(first <= k, 1.0 / first, 0.0),
    }
    for recall_k in recall_ks:
        metrics[f"recall_at_{recall_k}"] = (first <= recall_k).to(torch.float64)
    return metrics


# --------------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------------
def faiss_kmeans(x: Tensor, n_clusters: int, niter: int = 20, gpu: bool = False) -> Tensor:
    """Cluster index of each row of ``x`` ``(N, D)`` -> ``(N,)`` int64, by faiss k-means
    (Lloyd, 1982) with faiss' defaults -- the same call as PML's ``FaissKMeans``, hence the same
    clusters."""
    try:
        import faiss
    except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "NMI and AMI cluster with faiss: pip install faiss-cpu (or pass kmeans_func)"
        ) from error
    data = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32))
    kmeans = faiss.Kmeans(data.shape[1], n_clusters, niter=niter, gpu=gpu)
    kmeans.train(data)
    _, assignment = kmeans.index.search(data, 1)
    return torch.from_numpy(assignment[:, 0].astype(np.int64)).to(x.device)


def clustering_scores(labels: Tensor, cluster_labels: Tensor) -> dict[str, float]:
    """``{"NMI": ..., "AMI": ...}`` of a clustering against the labels (both ``(N,)``)."""
    truth, found = labels.cpu().numpy(), cluster_labels.cpu().numpy()
    return {
        "NMI": float(normalized_mutual_info_score(truth, found)),
        "AMI": float(adjusted_mutual_info_score(truth, found)),
    }
