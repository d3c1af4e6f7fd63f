"""Few-shot classification on embeddings: enrol new classes from a handful of examples each.

A trained embedding turns "learn a new class" into "store a few vectors": a face database seeded
with one photo per person, a product catalogue that grows every day. Two classifiers, both in
scikit-learn's style (``fit`` / ``predict`` / ``score``, ``get_params`` / ``clone``):

* :class:`PrototypeClassifier` -- each class is the mean of its enrolled embeddings, a query
  takes the label of the nearest mean (Snell, Swersky & Zemel, "Prototypical Networks for
  Few-shot Learning", 2017). With one example per class this is 1-nearest-neighbour.
* :class:`KNNClassifier` -- majority or distance-weighted vote of the ``k`` nearest enrolled
  examples (Cover & Hart, "Nearest Neighbor Pattern Classification", 1967).

Both can be fed more examples at any time (:meth:`~PrototypeClassifier.enroll` adds to existing
classes and creates new ones), forget a class (``remove_class``), and answer "unknown" (the
``unknown_label``, ``-1`` by default) when a query is farther than ``threshold`` from the best
match. They take torch tensors or numpy arrays and answer in the kind they were asked in.

The comparison is any deepmetric distance object: ``LpDistance(normalize_embeddings=False)``
(plain Euclidean, the default) or ``CosineSimilarity()`` (then scores are similarities: larger
is closer, and a query is rejected when its score is *below* the threshold).

:func:`one_shot_accuracy` scores one N-way K-shot episode.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError
from torch import Tensor

from ._checks import check_embeddings, check_labels
from .distances import BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance
from .evaluation.neighbors import nearest_neighbors

#: Queries are compared with the enrolled set this many matrix entries at a time.
CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------
# Inputs and outputs: torch or numpy in, the same kind out
# --------------------------------------------------------------------------------------------
def as_tensor(x: Any, name: str) -> Tensor:
    """A torch tensor as is; a numpy array (or anything ``np.asarray`` takes) as a tensor."""
    if isinstance(x, Tensor):
        return x
    try:
        return torch.from_numpy(np.ascontiguousarray(x))
    except TypeError as err:  # object arrays, strings, ...
        raise ValueError(f"{name} must be a torch.Tensor or a numeric numpy array") from err


def _embeddings(x: Any, name: str) -> Tensor:
    tensor = as_tensor(x, name)
    check_embeddings(tensor, name)
    return tensor.detach()


def _labels(y: Any, embeddings: Tensor, name: str = "labels") -> Tensor:
    return check_labels(as_tensor(y, name).to(embeddings.device), embeddings, name)


def _like(result: Tensor, template: Any) -> Any:
    """``result`` as a numpy array unless ``template`` (the caller's input) was a tensor."""
    return result if isinstance(template, Tensor) else result.cpu().numpy()


def resolve_distance(distance: BaseDistance | None) -> BaseDistance:
    """``distance`` itself, or for ``None`` the default: Euclidean on the raw embeddings."""
    if distance is None:
        return LpDistance(normalize_embeddings=False)
    if not isinstance(distance, BaseDistance):
        raise ValueError(
            f"distance must be a deepmetric BaseDistance, got {type(distance).__name__}"
        )
    return distance


def _query_chunks(queries: Tensor, n_ref: int) -> Iterator[tuple[int, Tensor]]:
    """``(start, chunk)`` of queries such that a chunk × ``n_ref`` matrix stays small."""
    rows = max(1, CHUNK_ELEMENTS // max(1, n_ref))
    for start in range(0, len(queries), rows):
        yield start, queries[start : start + rows]


def _storage_dtype(embeddings: Tensor) -> torch.dtype:
    """Half-precision enrolments are kept in float32; float32/float64 as given."""
    half = embeddings.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half else embeddings.dtype


def _top(key: Tensor, k: int, largest: bool) -> Tensor:
    """Column indices of the ``k`` best entries of each row, best first (``k = 1``: ties go to
    the lowest index)."""
    if k == 1:
        best = key.argmax(dim=1) if largest else key.argmin(dim=1)
        return best.unsqueeze(1)
    return key.topk(k, dim=1, largest=largest).indices


class _References:
    """Enrolled rows ``(R, D)``, already normalised as the distance wants, ready for ranking.

    For the common metrics the ranking is deepmetric's exact nearest-neighbour search
    (:func:`~deepmetric.evaluation.nearest_neighbors`, ties to the smaller index): Euclidean
    (``LpDistance(p=2)``, any positive power) ranks by squared distance, and only the selected
    rows' exact scores are computed afterwards; an inner product or cosine ranks by ``q·r``, its
    own score. Any other distance ranks on its full matrix.
    """

    def __init__(self, rows: Tensor, distance: BaseDistance) -> None:
        self.rows = rows
        self.distance = distance

    def __len__(self) -> int:
        return len(self.rows)

    def nearest(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` closest rows of each query ``(Nq, D)``: ``(scores, indices)``, both
        ``(Nq, k)``, closest first."""
        distance = self.distance
        q = distance.maybe_normalize(queries)
        if type(distance) is LpDistance and distance.p == 2 and distance.power > 0:
            _, index = nearest_neighbors(q, self.rows, k)
            chosen = self.rows[index.flatten()]
            scores = distance.pairwise_distance(q.repeat_interleave(k, dim=0), chosen)
            return scores.view(len(q), k), index
        if type(distance) in (DotProductSimilarity, CosineSimilarity) and distance.power == 1:
            return nearest_neighbors(q, self.rows, k, metric="inner_product")  # the similarity
        mat = distance.compute_powered_mat(q, self.rows)
        index = _top(mat, k, largest=distance.is_inverted)
        return mat.gather(1, index), index


# --------------------------------------------------------------------------------------------
# Shared behaviour: enrolment bookkeeping, rejection, scoring
# --------------------------------------------------------------------------------------------
class _EnrolledClassifier(ClassifierMixin, BaseEstimator):
    """What both classifiers share; subclasses say how to enrol and how to match."""

    distance: BaseDistance | None
    threshold: float | None
    unknown_label: int
    distance_: BaseDistance

    # -- to be provided by subclasses ---------------------------------------------------------
    def _add(self, embeddings: Tensor, labels: Tensor) -> None:
        raise NotImplementedError

    def _keep_classes(self, keep: Tensor) -> None:
        raise NotImplementedError

    def _match(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------------------
    def fit(self, embeddings: Any, labels: Any) -> _EnrolledClassifier:
        """Forget everything, then :meth:`enroll` ``embeddings`` ``(N, D)`` with ``labels``
        ``(N,)``."""
        for attribute in ("classes_", "n_features_in_", "distance_"):
            self.__dict__.pop(attribute, None)
        return self.enroll(embeddings, labels)

    def enroll(self, embeddings: Any, labels: Any) -> _EnrolledClassifier:
        """Add examples ``(N, D)`` with integer ``labels`` ``(N,)``: new labels become new
        classes, known ones gain examples. Can be called any number of times."""
        emb = _embeddings(embeddings, "embeddings")
        lab = _labels(labels, emb)
        if len(emb) == 0:
            raise ValueError("embeddings must contain at least one example to enrol")
        first_enrolment = not hasattr(self, "classes_")
        if first_enrolment:
            self.distance_ = resolve_distance(self.distance)
        self._check_params()
        if bool((lab == self.unknown_label).any()):
            raise ValueError(
                f"labels contain unknown_label={self.unknown_label}, which is reserved for "
                "rejected queries"
            )
        if first_enrolment:
            self.n_features_in_ = emb.shape[1]
            self._device = emb.device
            self._dtype = _storage_dtype(emb)
            self.classes_ = np.empty(0, dtype=np.int64)
        elif emb.shape[1] != self.n_features_in_:
            raise ValueError(
                f"embeddings have dimension {emb.shape[1]} but the enrolled ones have "
                f"{self.n_features_in_}"
            )
        self._add(emb.to(self._device, self._dtype), lab.to(self._device))
        return self

    def remove_class(self, label: int) -> _EnrolledClassifier:
        """Forget every example of ``label``."""
        classes = self._enrolled_classes()
        keep = classes != int(label)
        if bool(keep.all()):
            raise ValueError(f"class {label} is not enrolled")
        self._keep_classes(keep)
        return self

    def predict(self, queries: Any) -> Any:
        """Labels ``(Nq,)`` of ``queries`` ``(Nq, D)``; ``unknown_label`` where rejected."""
        return self.predict_with_scores(queries)[0]

    def predict_with_scores(self, queries: Any) -> tuple[Any, Any]:
        """``(labels, scores)``, both ``(Nq,)``: the predicted label (``unknown_label`` where
        rejected) and the distance (or similarity) to the best match behind it, also for
        rejected queries. Tensors for tensor input, numpy arrays otherwise."""
        classes = self._enrolled_classes()
        if len(classes) == 0:
            raise ValueError("no class is enrolled; call enroll() first")
        self._check_params()  # threshold & co. may have been changed with set_params
        q = _embeddings(queries, "queries")
        if q.shape[1] != self.n_features_in_:
            raise ValueError(
                f"queries have dimension {q.shape[1]} but the enrolled embeddings have "
                f"{self.n_features_in_}"
            )
        q = q.to(self._device, self._dtype)
        labels = torch.empty(len(q), dtype=torch.long, device=self._device)
        scores = torch.empty(len(q), dtype=torch.float64, device=self._device)
        for start, chunk in _query_chunks(q, len(self._references)):
            class_index, score = self._match(chunk)
            labels[start : start + len(chunk)] = classes[class_index]
            scores[start : start + len(chunk)] = score.double()
        labels[self._rejected(scores)] = self.unknown_label
        return _like(labels, queries), _like(scores, queries)

    def score(self, queries: Any, labels: Any, sample_weight: Any = None) -> float:
        """Accuracy of :meth:`predict` (a rejected query is right only if its true label is
        ``unknown_label``)."""
        predicted = as_tensor(self.predict(queries), "queries").cpu().numpy()
        truth = as_tensor(labels, "labels").cpu().numpy()
        if truth.shape != predicted.shape:
            raise ValueError(f"labels must have shape {predicted.shape}, got {truth.shape}")
        return float(np.average(predicted == truth, weights=sample_weight))

    # -- helpers ------------------------------------------------------------------------------
    def _check_params(self) -> None:
        """Validate the constructor arguments (subclasses extend this)."""
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number or None, got {self.threshold}")
        if isinstance(self.unknown_label, bool) or not isinstance(
            self.unknown_label, int | np.integer
        ):
            raise ValueError(f"unknown_label must be an int, got {self.unknown_label!r}")

    def _enrolled_classes(self) -> Tensor:
        if not hasattr(self, "classes_"):
            raise NotFittedError(
                f"This {type(self).__name__} has no enrolled class; call fit() or enroll() first"
            )
        return torch.from_numpy(self.classes_).to(self._device)

    def _rejected(self, scores: Tensor) -> Tensor:
        if self.threshold is None:
            return torch.zeros_like(scores, dtype=torch.bool)
        if self.distance_.is_inverted:
            return scores < self.threshold
        return scores > self.threshold


# --------------------------------------------------------------------------------------------
# Nearest class mean
# --------------------------------------------------------------------------------------------
class PrototypeClassifier(_EnrolledClassifier):
    """Nearest class mean ("prototype") classifier over embeddings.

    Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", 2017. A class's
    prototype is the mean of its enrolled embeddings, taken in the space the distance compares
    (after its normalisation, if it normalises); enrolling more examples updates the mean
    exactly (running sums in float64). A query gets the label of the closest prototype (ties:
    the smaller label), or ``unknown_label`` when it is farther than ``threshold`` (for a
    similarity: less similar).

    Args:
        distance: a deepmetric distance; default Euclidean on the raw embeddings,
            ``LpDistance(normalize_embeddings=False)``. ``CosineSimilarity()`` for cosine.
        threshold: reject queries whose best score is beyond it; ``None`` never rejects.
            Read at prediction time, so ``set_params(threshold=...)`` needs no re-enrolment.
        unknown_label: the label of rejected queries (must not be used by any class).

    Shapes: ``fit``/``enroll``: embeddings ``(N, D)``, integer labels ``(N,)``;
    ``predict``: ``(Nq, D)`` -> ``(Nq,)``; torch tensors or numpy arrays.

    Attributes (after fitting): ``classes_`` (sorted labels, a numpy array, as in
    scikit-learn), tensors ``prototypes_`` ``(C, D)`` and ``counts_`` ``(C,)`` (examples per
    class), ``n_features_in_``.
    """

    def __init__(
        self,
        distance: BaseDistance | None = None,
        threshold: float | None = None,
        unknown_label: int = -1,
    ) -> None:
        self.distance = distance
        self.threshold = threshold
        self.unknown_label = unknown_label

    def _add(self, embeddings: Tensor, labels: Tensor) -> None:
        rows = self.distance_.maybe_normalize(embeddings).double()
        counts = torch.ones_like(labels)
        if len(self.classes_):  # each enrolled class joins in as one row: (its sum, its count)
            labels = torch.cat([torch.from_numpy(self.classes_).to(self._device), labels])
            rows = torch.cat([self._sums, rows])
            counts = torch.cat([self.counts_, counts])
        classes, where = torch.unique(labels, return_inverse=True)
        sums = rows.new_zeros(len(classes), rows.shape[1]).index_add_(0, where, rows)
        self._set_state(classes, sums, counts.new_zeros(len(classes)).index_add_(0, where, counts))

    def _keep_classes(self, keep: Tensor) -> None:
        classes = torch.from_numpy(self.classes_).to(self._device)
        self._set_state(classes[keep], self._sums[keep], self.counts_[keep])

    def _set_state(self, classes: Tensor, sums: Tensor, counts: Tensor) -> None:
        self.classes_ = classes.cpu().numpy()
        self._sums = sums
        self.counts_ = counts
        self.prototypes_ = (sums / counts.unsqueeze(1)).to(self._dtype)
        rows = self.distance_.maybe_normalize(self.prototypes_)
        self._references = _References(rows, self.distance_)

    def _match(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        score, class_index = self._references.nearest(queries, k=1)
        return class_index.squeeze(1), score.squeeze(1)


# --------------------------------------------------------------------------------------------
# k nearest neighbours
# --------------------------------------------------------------------------------------------
class KNNClassifier(_EnrolledClassifier):
    """k-nearest-neighbour vote over enrolled embeddings.

    Cover & Hart, "Nearest Neighbor Pattern Classification", 1967. The ``n_neighbors`` closest
    enrolled examples (fewer if fewer are enrolled) vote for their labels, each with weight 1
    (``weights="uniform"``) or ``1 / d`` (``weights="distance"``; for a similarity ``d = 1 - s``,
    the cosine distance, so the distance must normalise its embeddings; an exact match, ``d =
    0``, outvotes everything else). Ties go to the smaller label, as in scikit-learn's
    ``KNeighborsClassifier``. The score of a query is its distance (or similarity) to the
    closest neighbour of the winning class; beyond ``threshold`` it is ``unknown_label``.

    Args:
        n_neighbors: ``k``.
        weights: ``"uniform"`` or ``"distance"``, as in scikit-learn.
        distance: a deepmetric distance; default Euclidean on the raw embeddings.
        threshold: reject queries whose score is beyond it; ``None`` never rejects. Read at
            prediction time, so ``set_params(threshold=...)`` needs no re-enrolment.
        unknown_label: the label of rejected queries.

    Shapes: ``fit``/``enroll``: embeddings ``(N, D)``, integer labels ``(N,)``;
    ``predict``: ``(Nq, D)`` -> ``(Nq,)``; torch tensors or numpy arrays.

    Attributes (after fitting): ``classes_`` (sorted labels, a numpy array), tensors
    ``embeddings_`` ``(N, D)`` and ``labels_`` ``(N,)`` (the enrolled examples; normalised if
    the distance normalises, as they are compared), ``n_features_in_``.
    """

    def __init__(
        self,
        n_neighbors: int = 1,
        weights: Literal["uniform", "distance"] = "uniform",
        distance: BaseDistance | None = None,
        threshold: float | None = None,
        unknown_label: int = -1,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.distance = distance
        self.threshold = threshold
        self.unknown_label = unknown_label

    def _check_params(self) -> None:
        super()._check_params()
        if isinstance(self.n_neighbors, bool) or not isinstance(self.n_neighbors, int | np.integer):
            raise ValueError(f"n_neighbors must be an int, got {self.n_neighbors!r}")
        if self.n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {self.n_neighbors}")
        if self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform' or 'distance', got {self.weights!r}")
        distance = self.distance_
        if (
            self.weights == "distance"
            and distance.is_inverted
            and not distance.normalize_embeddings
        ):
            raise ValueError(
                "weights='distance' with a similarity needs normalised embeddings "
                "(d = 1 - similarity is a distance only for unit vectors)"
            )

    def _add(self, embeddings: Tensor, labels: Tensor) -> None:
        embeddings = self.distance_.maybe_normalize(embeddings)
        if len(self.classes_):
            embeddings = torch.cat([self.embeddings_, embeddings])
            labels = torch.cat([self.labels_, labels])
        self._set_state(embeddings, labels)

    def _keep_classes(self, keep: Tensor) -> None:
        kept_examples = keep[self._class_index]
        self._set_state(self.embeddings_[kept_examples], self.labels_[kept_examples])

    def _set_state(self, embeddings: Tensor, labels: Tensor) -> None:
        classes, self._class_index = torch.unique(labels, return_inverse=True)
        self.classes_ = classes.cpu().numpy()
        self.embeddings_ = embeddings
        self.labels_ = labels
        self._references = _References(embeddings, self.distance_)

    def _match(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        k = min(self.n_neighbors, len(self._references))
        near, index = self._references.nearest(queries, k)  # closest first
        neighbour_class = self._class_index[index]
        votes = near.new_zeros(len(queries), len(self.classes_))
        votes.scatter_add_(1, neighbour_class, self._vote_weights(near))
        winner = votes.argmax(dim=1)  # the first maximum: the smaller label on ties
        # score: the closest neighbour of the winning class (the first one in ``near``)
        first_of_winner = (neighbour_class == winner.unsqueeze(1)).int().argmax(dim=1)
        return winner, near.gather(1, first_of_winner.unsqueeze(1)).squeeze(1)

    def _vote_weights(self, near: Tensor) -> Tensor:
        if self.weights == "uniform":
            return torch.ones_like(near)
        d = 1 - near if self.distance_.is_inverted else near
        exact = d <= 0
        has_exact = exact.any(dim=1, keepdim=True)
        return torch.where(has_exact, exact.to(d.dtype), 1 / d.clamp_min(torch.finfo(d.dtype).tiny))


# --------------------------------------------------------------------------------------------
# N-way K-shot episodes
# --------------------------------------------------------------------------------------------
def one_shot_accuracy(
    support_emb: Any,
    support_labels: Any,
    query_emb: Any,
    query_labels: Any,
    distance: BaseDistance | None = None,
) -> float:
    """Accuracy of one N-way K-shot episode with prototypes (Snell et al., 2017).

    The support set ``(N·K, D)`` holds K examples of each of N classes; every query
    ``(Q, D)`` must belong to one of them. With ``K = 1`` this is one-shot nearest-neighbour
    classification (Vinyals et al., "Matching Networks for One Shot Learning", 2016).
    """
    classifier = PrototypeClassifier(distance=distance).fit(support_emb, support_labels)
    truth = as_tensor(query_labels, "query_labels").cpu().numpy()
    unseen = np.setdiff1d(truth, classifier.classes_)
    if len(unseen):
        raise ValueError(f"query_labels contain classes absent from the support set: {unseen}")
    return classifier.score(query_emb, query_labels)
