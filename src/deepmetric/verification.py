"""Verification: is this pair of inputs the same identity? Calibrate a threshold, measure it.

A verification system (face unlock, signature check) embeds both inputs and accepts the pair as
"same" when their distance is at most a threshold (for a similarity: at least). The threshold
is calibrated on labelled validation pairs, and the usual numbers come from the ROC curve
(scikit-learn's ``roc_curve`` / ``roc_auc_score``) over all thresholds:

* ``auc``: probability that a random genuine pair is closer than a random impostor pair;
* ``eer``: the equal error rate, where false accepts (FPR) equal false rejects (1 - TPR),
  interpolated linearly between the two ROC points around the crossing;
* ``tpr_at_fpr``: true accept rate at a fixed false accept rate (1e-3, 1e-2), the operating
  point face recognition reports (Taigman et al., "DeepFace", 2014; Schroff et al., "FaceNet",
  2015). With ``n`` impostor pairs, FPRs below ``1 / n`` cannot be told apart from 0;
* ``best_accuracy`` and its threshold.

Pieces: :func:`make_pairs` samples genuine and impostor pairs from a labelled set,
:func:`pair_distances` scores them, :func:`evaluate_verification` computes the numbers above
(a :class:`VerificationResult`), :func:`evaluate_labelled_set` does all three on a labelled
set, :class:`Verifier` wraps calibration and decision, and :func:`plot_verification` draws the
distance distributions and the ROC curve into a PNG.

Convention: a pair is accepted when ``distance <= threshold`` (for a similarity,
``similarity >= threshold``). Thresholds are observed scores, so calibrating on a set and
applying the threshold to the same set reproduces the reported rates exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from ._checks import check_embeddings, check_positive_int
from .distances import BaseDistance
from .fewshot import as_tensor, resolve_distance

#: Default false accept rates at which the true accept rate is reported.
DEFAULT_TARGET_FPRS = (1e-3, 1e-2)
#: :func:`make_pairs` lists every candidate pair when there are at most this many (or fewer
#: than twice the number wanted) and draws at random otherwise.
ENUMERATE_LIMIT = 1 << 20

IntArray = np.ndarray
PairSampler = Callable[[int], tuple[IntArray, IntArray]]


# --------------------------------------------------------------------------------------------
# The numbers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerificationResult:
    """ROC-based verification metrics of a set of scored pairs.

    ``fpr``, ``tpr``, ``thresholds`` are the ROC's operating points (scikit-learn's
    ``roc_curve`` with every threshold kept), the thresholds in the scores' own units: accept
    when ``score <= threshold`` for distances, ``>=`` for similarities (the first point
    accepts nothing: threshold ``-inf``, resp. ``+inf``). ``genuine`` and ``impostor`` are the
    scores of the same-identity and different-identity pairs.
    """

    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    thresholds: np.ndarray = field(repr=False)
    auc: float
    eer: float
    eer_threshold: float
    best_accuracy: float
    best_threshold: float
    tpr_at_fpr: dict[float, float]
    threshold_at_fpr: dict[float, float]
    genuine: np.ndarray = field(repr=False)
    impostor: np.ndarray = field(repr=False)
    is_similarity: bool = False

    def accept(self, scores: Any, threshold: float) -> np.ndarray:
        """Boolean "same" decision for ``scores`` at ``threshold``."""
        scores = np.asarray(scores)
        return scores >= threshold if self.is_similarity else scores <= threshold

    def summary(self) -> dict[str, float]:
        """The scalar metrics, flat, for a run report."""
        out = {
            "auc": self.auc,
            "eer": self.eer,
            "eer_threshold": self.eer_threshold,
            "best_accuracy": self.best_accuracy,
            "best_threshold": self.best_threshold,
            "n_genuine": float(len(self.genuine)),
            "n_impostor": float(len(self.impostor)),
        }
        for target, tpr in self.tpr_at_fpr.items():
            out[f"tpr_at_fpr_{target:g}"] = tpr
            out[f"threshold_at_fpr_{target:g}"] = self.threshold_at_fpr[target]
        return out


def _as_numpy(x: Any, name: str) -> np.ndarray:
    return as_tensor(x, name).detach().cpu().numpy()


def _check_scores_and_truth(scores: Any, same: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _as_numpy(scores, "distances")
    truth = _as_numpy(same, "same")
    if s.ndim != 1:
        raise ValueError(f"distances must be 1-D (n_pairs,), got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.floating):
        raise ValueError(f"distances must be floating point, got {s.dtype}")
    if not np.isfinite(s).all():
        raise ValueError("distances contain NaN or Inf")
    if truth.shape != s.shape:
        raise ValueError(f"same must have shape {s.shape} (one entry per pair), got {truth.shape}")
    if truth.dtype != np.bool_:
        if not np.issubdtype(truth.dtype, np.integer) or not np.isin(truth, (0, 1)).all():
            raise ValueError("same must be boolean (or 0/1 integers): True for a genuine pair")
        truth = truth.astype(bool)
    if truth.all() or not truth.any():
        raise ValueError("need at least one genuine (same) and one impostor (different) pair")
    return s.astype(np.float64), truth


def _equal_error_rate(
    fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray
) -> tuple[float, float]:
    """EER and the threshold of the ROC point nearest to where ``FPR = 1 - TPR``.

    Along the ROC, ``gap = (1 - TPR) - FPR`` falls from 1 (accept nothing) to -1 (accept
    everything); the EER is where it crosses 0, interpolated between the two points around it.
    """
    gap = (1 - tpr) - fpr
    after = int(np.argmax(gap <= 0))  # first point at or past the crossing (never point 0)
    before = after - 1
    fraction = gap[before] / (gap[before] - gap[after])
    eer = fpr[before] + fraction * (fpr[after] - fpr[before])
    nearest = after if abs(gap[after]) <= abs(gap[before]) else before
    return float(eer), float(thresholds[nearest])


def evaluate_verification(
    distances: Any,
    same: Any,
    target_fprs: Sequence[float] = DEFAULT_TARGET_FPRS,
    is_similarity: bool = False,
) -> VerificationResult:
    """ROC, AUC, EER, TPR at the ``target_fprs`` and the best-accuracy threshold.

    Args:
        distances: ``(n_pairs,)`` score of each pair: a distance (smaller = more alike) or,
            with ``is_similarity=True``, a similarity.
        same: ``(n_pairs,)`` booleans, True for a genuine (same identity) pair.
        target_fprs: false accept rates in ``(0, 1]`` at which to read the true accept rate
            (largest TPR with ``FPR <= target``).
        is_similarity: the scores are similarities (larger = more alike).

    Ties between thresholds of equal merit go to the stricter one (fewer accepts).
    """
    scores, truth = _check_scores_and_truth(distances, same)
    for target in target_fprs:
        if not 0 < target <= 1:
            raise ValueError(f"target_fprs must be in (0, 1], got {target}")
    # scikit-learn wants "larger = more likely genuine": negate distances, and negate back
    sign = 1.0 if is_similarity else -1.0
    fpr, tpr, sk_thresholds = roc_curve(truth, sign * scores, drop_intermediate=False)
    thresholds = sign * sk_thresholds
    auc = float(roc_auc_score(truth, sign * scores))
    eer, eer_threshold = _equal_error_rate(fpr, tpr, thresholds)

    n_genuine, n_impostor = int(truth.sum()), int((~truth).sum())
    accuracy = (tpr * n_genuine + (1 - fpr) * n_impostor) / len(truth)
    best = int(np.argmax(accuracy))  # the first maximum: the strictest threshold

    tpr_at, threshold_at = {}, {}
    for target in target_fprs:
        last_allowed = int(np.searchsorted(fpr, target, side="right")) - 1
        reached = tpr[last_allowed]
        strictest = int(np.searchsorted(tpr, reached, side="left"))
        tpr_at[float(target)] = float(reached)
        threshold_at[float(target)] = float(thresholds[strictest])

    return VerificationResult(
        fpr=fpr,
        tpr=tpr,
        thresholds=thresholds,
        auc=auc,
        eer=eer,
        eer_threshold=eer_threshold,
        best_accuracy=float(accuracy[best]),
        best_threshold=float(thresholds[best]),
        tpr_at_fpr=tpr_at,
        threshold_at_fpr=threshold_at,
        genuine=scores[truth],
        impostor=scores[~truth],
        is_similarity=is_similarity,
    )


# --------------------------------------------------------------------------------------------
# Scoring pairs and deciding
# --------------------------------------------------------------------------------------------
def _paired_scores(a: Any, b: Any, distance: BaseDistance) -> np.ndarray:
    """Row-wise score of two ``(N, D)`` embedding sets -> ``(N,)`` float64 numpy."""
    ta, tb = as_tensor(a, "a"), as_tensor(b, "b")
    check_embeddings(ta, "a")
    check_embeddings(tb, "b")
    if ta.shape != tb.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(ta.shape)} and {tuple(tb.shape)}"
        )
    with torch.no_grad():
        scores = distance.pairwise_distance(ta, tb.to(ta.device))
    return scores.double().cpu().numpy()


def pair_distances(
    embeddings: Any, first: Any, second: Any, distance: BaseDistance | None = None
) -> np.ndarray:
    """Score of each pair ``(embeddings[first[i]], embeddings[second[i]])`` -> ``(n_pairs,)``.

    ``distance`` defaults to Euclidean on the raw embeddings; ``CosineSimilarity()`` gives
    similarities (then pass ``is_similarity=True`` to :func:`evaluate_verification`).
    """
    emb = as_tensor(embeddings, "embeddings")
    check_embeddings(emb, "embeddings")
    i = as_tensor(first, "first").long().to(emb.device)
    j = as_tensor(second, "second").long().to(emb.device)
    if i.ndim != 1 or i.shape != j.shape:
        raise ValueError("first and second must be 1-D index arrays of the same length")
    for name, idx in (("first", i), ("second", j)):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(emb)):
            raise ValueError(f"{name} has an index outside [0, {len(emb)})")
    return _paired_scores(emb[i], emb[j], resolve_distance(distance))


class Verifier:
    """Same/different decisions with a threshold calibrated on labelled pairs.

    ``fit(a, b, same)`` scores the validation pairs ``(a[i], b[i])`` with ``distance``, keeps
    the :class:`VerificationResult` as ``result_`` and sets ``threshold_``: the best-accuracy
    threshold, or with ``target_fpr`` the one giving the largest true accept rate at a false
    accept rate of at most ``target_fpr``. ``verify(a, b)`` then answers ``(same, scores)``.

    Args:
        distance: a deepmetric distance; default Euclidean on the raw embeddings,
            ``LpDistance(normalize_embeddings=False)``; ``CosineSimilarity()`` for cosine.
        target_fpr: calibrate for this false accept rate instead of for accuracy.

    Shapes: ``a``, ``b``: ``(N, D)`` tensors or numpy arrays; ``same``: ``(N,)`` booleans.
    Outputs are numpy arrays.
    """

    def __init__(
        self, distance: BaseDistance | None = None, target_fpr: float | None = None
    ) -> None:
        self.distance = distance
        self.target_fpr = target_fpr

    def fit(self, a: Any, b: Any, same: Any) -> Verifier:
        """Calibrate the threshold on validation pairs."""
        self.distance_ = resolve_distance(self.distance)
        targets = DEFAULT_TARGET_FPRS if self.target_fpr is None else (self.target_fpr,)
        scores = _paired_scores(a, b, self.distance_)
        self.result_ = evaluate_verification(
            scores, same, target_fprs=targets, is_similarity=self.distance_.is_inverted
        )
        if self.target_fpr is None:
            self.threshold_ = self.result_.best_threshold
        else:
            self.threshold_ = self.result_.threshold_at_fpr[float(self.target_fpr)]
        return self

    def verify(self, a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(same, scores)``, both ``(N,)``: the decision for each pair and its score."""
        if not hasattr(self, "threshold_"):
            raise ValueError("this Verifier is not calibrated; call fit() first")
        scores = _paired_scores(a, b, self.distance_)
        return self.result_.accept(scores, self.threshold_), scores


# --------------------------------------------------------------------------------------------
# Sampling validation pairs
# --------------------------------------------------------------------------------------------
def _distinct_pairs(
    wanted: int,
    total: int,
    n: int,
    draw: PairSampler,
    every_pair: Callable[[], tuple[IntArray, IntArray]],
    rng: np.random.Generator,
) -> tuple[IntArray, IntArray]:
    """``wanted`` distinct unordered pairs, uniformly among ``total`` candidates.

    Few candidates: list them all and choose. Many: draw uniform pairs (with repetition) in
    batches and keep the first ``wanted`` distinct ones in draw order, which is a uniform
    random subset by symmetry.
    """
    if wanted == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if total <= max(ENUMERATE_LIMIT, 2 * wanted):
        i, j = every_pair()
        chosen = rng.choice(len(i), size=wanted, replace=False)
        return i[chosen], j[chosen]
    keys = np.empty(0, np.int64)  # pair (i < j) as i * n + j, in draw order
    have = 0
    while have < wanted:
        i, j = draw(max(64, 2 * (wanted - have)))
        keys = np.concatenate([keys, np.minimum(i, j) * n + np.maximum(i, j)])
        _, first_seen = np.unique(keys, return_index=True)
        have = len(first_seen)
    kept = keys[np.sort(first_seen)[:wanted]]
    return kept // n, kept % n


def make_pairs(
    labels: Any, n_genuine: int, n_impostor: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample validation pairs from a labelled set.

    Genuine pairs (two different samples with the same label) and impostor pairs (different
    labels) are each drawn uniformly without repetition among all such unordered pairs.

    Args:
        labels: ``(N,)`` labels (tensor or numpy; any values numpy can sort).
        n_genuine: number of same-label pairs (at most the number that exist).
        n_impostor: number of different-label pairs (at most the number that exist).
        seed: seed of the random generator (same seed, same pairs).

    Returns:
        ``(first, second, same)``: int64 indices ``(n_genuine + n_impostor,)`` with
        ``first < second``, and the boolean truth; the genuine pairs come first.
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    for name, value in (("n_genuine", n_genuine), ("n_impostor", n_impostor)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    _, cls, sizes = np.unique(y, return_inverse=True, return_counts=True)
    n = len(y)
    pairs_per_class = sizes * (sizes - 1) // 2
    genuine_total = int(pairs_per_class.sum())
    impostor_total = n * (n - 1) // 2 - genuine_total
    if n_genuine > genuine_total:
        raise ValueError(f"n_genuine={n_genuine} but only {genuine_total} same-label pairs exist")
    if n_impostor > impostor_total:
        raise ValueError(
            f"n_impostor={n_impostor} but only {impostor_total} different-label pairs exist"
        )
    rng = np.random.default_rng(seed)
    members = np.argsort(cls, kind="stable")  # samples grouped by class
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def draw_genuine(m: int) -> tuple[IntArray, IntArray]:
        c = rng.choice(len(sizes), size=m, p=pairs_per_class / genuine_total)
        a = rng.integers(0, sizes[c])
        b = rng.integers(0, sizes[c] - 1)
        b = b + (b >= a)  # a different member of the same class
        return members[starts[c] + a], members[starts[c] + b]

    def draw_impostor(m: int) -> tuple[IntArray, IntArray]:
        i, j = rng.integers(0, n, m), rng.integers(0, n, m)
        different = cls[i] != cls[j]
        return i[different], j[different]

    def every_genuine() -> tuple[IntArray, IntArray]:
        firsts, seconds = [], []
        for start, size in zip(starts, sizes, strict=True):
            a, b = np.triu_indices(size, k=1)
            firsts.append(members[start + a])
            seconds.append(members[start + b])
        return np.concatenate(firsts), np.concatenate(seconds)

    def every_impostor() -> tuple[IntArray, IntArray]:
        firsts, seconds = [], []
        for start, size in zip(starts, sizes, strict=True):
            later = members[start + size :]  # samples of the classes after this one
            firsts.append(np.repeat(members[start : start + size], len(later)))
            seconds.append(np.tile(later, size))
        return np.concatenate(firsts), np.concatenate(seconds)

    gi, gj = _distinct_pairs(n_genuine, genuine_total, n, draw_genuine, every_genuine, rng)
    ii, ij = _distinct_pairs(n_impostor, impostor_total, n, draw_impostor, every_impostor, rng)
    first = np.concatenate([gi, ii]).astype(np.int64)
    second = np.concatenate([gj, ij]).astype(np.int64)
    same = np.concatenate([np.ones(len(gi), bool), np.zeros(len(ii), bool)])
    return np.minimum(first, second), np.maximum(first, second), same


def count_pairs(labels: Any) -> tuple[int, int]:
    """``(genuine, impostor)``: how many distinct unordered same-label and different-label
    pairs the ``(N,)`` labels have (what :func:`make_pairs` can draw from)."""
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    _, sizes = np.unique(y, return_counts=True)
    genuine = int((sizes * (sizes - 1) // 2).sum())
    return genuine, len(y) * (len(y) - 1) // 2 - genuine


def evaluate_labelled_set(
    embeddings: Any,
    labels: Any,
    max_pairs: int,
    seed: int = 0,
    target_fprs: Sequence[float] = DEFAULT_TARGET_FPRS,
    distance: BaseDistance | None = None,
) -> VerificationResult:
    """Verification metrics of a labelled set, on pairs sampled from it.

    Draws ``min(max_pairs, available)`` genuine and as many impostor pairs with
    :func:`make_pairs` (``seed``: same seed, same pairs), scores them with
    :func:`pair_distances` and evaluates them with :func:`evaluate_verification`.

    Args:
        embeddings: ``(N, D)`` embeddings; labels: ``(N,)`` their identities.
        max_pairs: at most this many genuine pairs, and at most this many impostor pairs.
        distance: as in :func:`pair_distances` (default Euclidean; a similarity such as
            ``CosineSimilarity()`` gives similarity thresholds).

    ``ValueError`` if the set has no two samples of one class or fewer than two classes.
    """
    check_positive_int(max_pairs, "max_pairs")
    genuine_total, impostor_total = count_pairs(labels)
    if genuine_total == 0 or impostor_total == 0:
        raise ValueError(
            "verification needs a class with two or more samples and at least two classes"
        )
    first, second, same = make_pairs(
        labels, min(max_pairs, genuine_total), min(max_pairs, impostor_total), seed=seed
    )
    resolved = resolve_distance(distance)
    scores = pair_distances(embeddings, first, second, resolved)
    return evaluate_verification(
        scores, same, target_fprs=target_fprs, is_similarity=resolved.is_inverted
    )


# --------------------------------------------------------------------------------------------
# Picture for the run report
# --------------------------------------------------------------------------------------------
def plot_verification(result: VerificationResult, path: str | Path) -> Path:
    """Write a PNG: genuine/impostor score histograms with the thresholds, and the ROC curve.

    Draws with matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    hist, roc = fig.subplots(1, 2)

    edges = np.histogram_bin_edges(np.concatenate([result.genuine, result.impostor]), bins=50)
    hist.hist(result.genuine, bins=edges, density=True, alpha=0.6, label="genuine (same)")
    hist.hist(result.impostor, bins=edges, density=True, alpha=0.6, label="impostor (different)")
    for threshold, style, name in (
        (result.best_threshold, "--", "best-accuracy threshold"),
        (result.eer_threshold, ":", "EER threshold"),
    ):
        if np.isfinite(threshold):  # (-inf: "accept nothing" is the best a dataset allows)
            hist.axvline(threshold, color="k", ls=style, label=name)
    hist.set_xlabel("similarity" if result.is_similarity else "distance")
    hist.set_ylabel("density")
    hist.set_title(f"best accuracy {result.best_accuracy:.2%}")
    hist.legend(fontsize="small")

    # a logarithmic FPR axis shows the low false-accept rates a verification gate runs at
    smallest = 1.0 / max(1, len(result.impostor))
    roc.plot(np.maximum(result.fpr, smallest), result.tpr, label=f"ROC (AUC {result.auc:.4f})")
    chance = np.logspace(np.log10(smallest), 0, 50)
    roc.plot(chance, chance, color="gray", ls=":", lw=1, label="chance")
    roc.plot(
        [max(result.eer, smallest)],
        [1 - result.eer],
        "o",
        color="C3",
        label=f"EER {result.eer:.2%}",
    )
    roc.set_xscale("log")
    roc.set_xlabel("false accept rate (FPR, log scale)")
    roc.set_ylabel("true accept rate (TPR)")
    roc.set_xlim(smallest, 1)
    roc.set_ylim(0, 1.01)
    roc.set_title(", ".join(f"TPR@{fpr:g} = {tpr:.3f}" for fpr, tpr in result.tpr_at_fpr.items()))
    roc.legend(loc="lower right", fontsize="small")

    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
