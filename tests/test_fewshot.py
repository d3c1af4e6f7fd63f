"""Few-shot classifiers: prototypes against a loop, kNN against scikit-learn, enrolment,
rejection, N-way K-shot accuracy, scikit-learn conventions and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import KNeighborsClassifier

from deepmetric import fewshot
from deepmetric.distances import (
    BaseDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
)
from deepmetric.fewshot import KNNClassifier, PrototypeClassifier, one_shot_accuracy


def _blobs(n_classes: int, per_class: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around random centres (float64), labels with gaps (0, 3, 6, ...)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes) * 3, per_class)
    x = centres[labels // 3] + rng.normal(size=(len(labels), dim))
    return x, labels


# --------------------------------------------------------------------------------------------
# Prototypes: against an obvious loop
# --------------------------------------------------------------------------------------------
def _loop_prototype_predict(
    support: np.ndarray, labels: np.ndarray, queries: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Slow reference: average each class (normalised rows when the metric normalises), then
    compare every query with every prototype."""

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    classes = sorted(set(labels.tolist()))
    protos = []
    for c in classes:
        normalised = kind in ("unit_euclidean", "cosine")
        rows = [unit(r) if normalised else r for r in support[labels == c]]
        protos.append(np.mean(rows, axis=0))
    predicted, scores = [], []
    for q in queries:
        if kind == "euclidean":
            values = [float(np.linalg.norm(q - p)) for p in protos]
            best = int(np.argmin(values))
        elif kind == "unit_euclidean":
            values = [float(np.linalg.norm(unit(q) - unit(p))) for p in protos]
            best = int(np.argmin(values))
        elif kind == "squared_euclidean":
            values = [float(np.sum((q - p) ** 2)) for p in protos]
            best = int(np.argmin(values))
        elif kind == "manhattan":
            values = [float(np.abs(q - p).sum()) for p in protos]
            best = int(np.argmin(values))
        elif kind == "dot":
            values = [float(q @ p) for p in protos]
            best = int(np.argmax(values))
        else:  # cosine similarity
            values = [float(unit(q) @ unit(p)) for p in protos]
            best = int(np.argmax(values))
        predicted.append(classes[best])
        scores.append(values[best])
    return np.array(predicted), np.array(scores)


DISTANCES: dict[str, BaseDistance] = {
    "euclidean": LpDistance(normalize_embeddings=False),
    "unit_euclidean": LpDistance(),
    "cosine": CosineSimilarity(),
    "squared_euclidean": LpDistance(normalize_embeddings=False, power=2),
    "manhattan": LpDistance(normalize_embeddings=False, p=1),  # ranked on the full matrix
    "dot": DotProductSimilarity(normalize_embeddings=False),
}


@pytest.mark.parametrize("kind", list(DISTANCES))
def test_prototype_classifier_matches_loop(kind: str) -> None:
    support, labels = _blobs(n_classes=6, per_class=4, dim=5, seed=1)
    queries, _ = _blobs(n_classes=6, per_class=5, dim=5, seed=2)
    clf = PrototypeClassifier(distance=DISTANCES[kind]).fit(support, labels)
    predicted, scores = clf.predict_with_scores(queries)
    expected_labels, expected_scores = _loop_prototype_predict(support, labels, queries, kind)
    np.testing.assert_array_equal(predicted, expected_labels)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(clf.classes_, np.arange(6) * 3)
    assert isinstance(predicted, np.ndarray) and predicted.dtype == np.int64


def test_default_prototype_is_class_mean_and_float32_and_torch_io() -> None:
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]], dtype=torch.float32)
    labels = torch.tensor([5, 5, 1])
    clf = PrototypeClassifier().fit(support, labels)
    torch.testing.assert_close(clf.prototypes_, torch.tensor([[10.0, 10.0], [1.0, 0.0]]))
    torch.testing.assert_close(clf.counts_, torch.tensor([1, 2]))
    predicted, scores = clf.predict_with_scores(torch.tensor([[1.0, 3.0], [9.0, 6.0]]))
    assert isinstance(predicted, torch.Tensor)
    torch.testing.assert_close(predicted, torch.tensor([5, 1]))
    torch.testing.assert_close(scores, torch.tensor([3.0, 4.123105625617661], dtype=torch.float64))


def test_repeated_enrolment_equals_one_fit() -> None:
    x, y = _blobs(n_classes=5, per_class=6, dim=4, seed=3)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    once = PrototypeClassifier().fit(x, y)
    parts = PrototypeClassifier()
    for chunk in np.array_split(np.arange(len(y)), 4):  # new classes and known ones each time
        parts.enroll(x[chunk], y[chunk])
    np.testing.assert_array_equal(parts.classes_, once.classes_)
    torch.testing.assert_close(parts.prototypes_, once.prototypes_)
    torch.testing.assert_close(parts.counts_, torch.full((5,), 6))
    knn_once = KNNClassifier(n_neighbors=3).fit(x, y)
    knn_parts = KNNClassifier(n_neighbors=3)
    for chunk in np.array_split(np.arange(len(y)), 3):
        knn_parts.enroll(x[chunk], y[chunk])
    np.testing.assert_array_equal(knn_parts.predict(x + 0.1), knn_once.predict(x + 0.1))


def test_fit_forgets_previous_enrolments() -> None:
    clf = PrototypeClassifier().fit(np.eye(3), np.array([0, 1, 2]))
    clf.fit(np.eye(3)[:2], np.array([7, 8]))
    np.testing.assert_array_equal(clf.classes_, [7, 8])


@pytest.mark.parametrize("cls", [PrototypeClassifier, KNNClassifier])
def test_remove_class(cls: type[PrototypeClassifier] | type[KNNClassifier]) -> None:
    x, y = _blobs(n_classes=4, per_class=5, dim=3, seed=4)
    clf = cls().fit(x, y)
    clf.remove_class(3)
    without = cls().fit(x[y != 3], y[y != 3])
    np.testing.assert_array_equal(clf.classes_, [0, 6, 9])
    assert 3 not in set(clf.predict(x).tolist())
    np.testing.assert_array_equal(clf.predict(x), without.predict(x))
    with pytest.raises(ValueError, match="class 3 is not enrolled"):
        clf.remove_class(3)
    for label in (0, 6, 9):
        clf.remove_class(label)
    with pytest.raises(ValueError, match="no class is enrolled"):
        clf.predict(x)
    clf.enroll(x[:2], np.array([42, 42]))  # an emptied classifier can be refilled
    np.testing.assert_array_equal(clf.predict(x[:1]), [42])


# --------------------------------------------------------------------------------------------
# kNN: against scikit-learn's KNeighborsClassifier on the same embeddings
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
def test_knn_matches_scikit_learn(k: int, weights: str, metric: str) -> None:
    support, labels = _blobs(n_classes=5, per_class=6, dim=4, seed=5)
    queries, _ = _blobs(n_classes=5, per_class=12, dim=4, seed=6)
    distance = {
        "euclidean": LpDistance(normalize_embeddings=False),
        "cosine": CosineSimilarity(),
        "manhattan": LpDistance(normalize_embeddings=False, p=1),
    }[metric]
    ours = KNNClassifier(n_neighbors=k, weights=weights, distance=distance)  # type: ignore[arg-type]
    ours.fit(support, labels)
    theirs = KNeighborsClassifier(n_neighbors=k, weights=weights, metric=metric, algorithm="brute")
    theirs.fit(support, labels)
    np.testing.assert_array_equal(ours.predict(queries), theirs.predict(queries))
    assert ours.score(queries, theirs.predict(queries)) == 1.0


def test_knn_score_is_nearest_neighbour_of_the_winner() -> None:
    # 1-D: class 0 at 0.5 and 0.6, class 1 at 2 and 5; the 3 nearest to 1.5 are 2, 0.6, 0.5:
    # class 0 wins 2:1 and the score is the distance to 0.6, not to the nearer 2 of class 1
    support = np.array([[0.5], [0.6], [2.0], [5.0]])
    labels = np.array([0, 0, 1, 1])
    predicted, scores = (
        KNNClassifier(n_neighbors=3).fit(support, labels).predict_with_scores(np.array([[1.5]]))
    )
    np.testing.assert_array_equal(predicted, [0])
    np.testing.assert_allclose(scores, [0.9])


def test_knn_exact_match_outvotes_everything_with_distance_weights() -> None:
    support = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.1], [1.0, -0.1]])
    labels = np.array([0, 1, 1, 1])
    clf = KNNClassifier(n_neighbors=4, weights="distance").fit(support, labels)
    np.testing.assert_array_equal(clf.predict(np.array([[0.0, 0.0]])), [0])
    sk = KNeighborsClassifier(n_neighbors=4, weights="distance").fit(support, labels)
    np.testing.assert_array_equal(sk.predict(np.array([[0.0, 0.0]])), [0])


def test_knn_uses_all_examples_when_fewer_than_k() -> None:
    clf = KNNClassifier(n_neighbors=50).fit(np.array([[0.0], [1.0], [1.2]]), np.array([4, 2, 2]))
    np.testing.assert_array_equal(clf.predict(np.array([[0.0]])), [2])  # 2 votes against 1


# --------------------------------------------------------------------------------------------
# Rejection
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PrototypeClassifier, KNNClassifier])
def test_rejection_threshold_for_a_distance(
    cls: type[PrototypeClassifier] | type[KNNClassifier],
) -> None:
    support = np.array([[0.0], [10.0]])
    clf = cls(threshold=3.0).fit(support, np.array([0, 1]))
    queries = np.array([[0.5], [5.2], [13.0], [6.9]])
    predicted, scores = clf.predict_with_scores(queries)
    np.testing.assert_array_equal(predicted, [0, -1, 1, -1])
    np.testing.assert_allclose(scores, [0.5, 4.8, 3.0, 3.1])  # also for rejected queries
    assert clf.score(queries, np.array([0, -1, 1, 1])) == 0.75  # unknown is right if truly unknown
    clf.set_params(threshold=None)
    np.testing.assert_array_equal(clf.predict(queries), [0, 1, 1, 1])


def test_rejection_threshold_for_a_similarity_and_custom_unknown_label() -> None:
    support = np.array([[1.0, 0.0], [0.0, 1.0]])
    clf = PrototypeClassifier(distance=CosineSimilarity(), threshold=0.9, unknown_label=99)
    clf.fit(support, np.array([0, 1]))
    queries = np.array([[1.0, 0.1], [1.0, 1.0], [0.2, 3.0]])
    predicted, scores = clf.predict_with_scores(queries)
    np.testing.assert_array_equal(predicted, [0, 99, 1])  # cos 45 degrees = 0.707 < 0.9
    np.testing.assert_allclose(scores, [1 / np.sqrt(1.01), np.sqrt(0.5), 3 / np.sqrt(9.04)])


# --------------------------------------------------------------------------------------------
# N-way K-shot episodes
# --------------------------------------------------------------------------------------------
def test_one_shot_accuracy_hand_computed() -> None:
    support = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    queries = np.array([[1.0, 1.0], [6.0, 0.0], [4.0, 4.0], [0.0, 9.0]])
    # nearest: 0, 1, 0 (4,4 is closest to the origin), 2
    accuracy = one_shot_accuracy(support, np.array([0, 1, 2]), queries, np.array([0, 1, 2, 2]))
    assert accuracy == 0.75


def test_k_shot_accuracy_with_one_example_is_one_nearest_neighbour() -> None:
    support, labels = _blobs(n_classes=5, per_class=1, dim=8, seed=7)
    queries, query_labels = _blobs(n_classes=5, per_class=10, dim=8, seed=7)
    sk = KNeighborsClassifier(n_neighbors=1).fit(support, labels)
    expected = float(np.mean(sk.predict(queries) == query_labels))
    got = one_shot_accuracy(
        torch.from_numpy(support), torch.from_numpy(labels), queries, query_labels
    )
    assert got == pytest.approx(expected)
    assert 0.0 < got <= 1.0


def test_one_shot_accuracy_rejects_query_classes_outside_the_support() -> None:
    with pytest.raises(ValueError, match="absent from the support set"):
        one_shot_accuracy(np.eye(2), np.array([0, 1]), np.eye(2), np.array([0, 5]))


# --------------------------------------------------------------------------------------------
# scikit-learn conventions, devices, dtypes, chunking
# --------------------------------------------------------------------------------------------
def test_get_params_set_params_clone() -> None:
    clf = KNNClassifier(n_neighbors=3, weights="distance", distance=CosineSimilarity())
    assert clf.get_params()["n_neighbors"] == 3
    clf.fit(np.eye(3), np.array([0, 1, 2]))
    copy = clone(clf)
    assert copy.get_params()["weights"] == "distance"
    assert isinstance(copy.distance, CosineSimilarity) and copy.distance is not clf.distance
    assert not hasattr(copy, "classes_")  # a clone is not fitted
    with pytest.raises(NotFittedError):
        copy.predict(np.eye(3))
    assert copy.set_params(n_neighbors=1) is copy and copy.n_neighbors == 1


def test_half_precision_is_enrolled_in_float32() -> None:
    x = torch.randn(6, 4).half()
    clf = PrototypeClassifier().fit(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert clf.prototypes_.dtype == torch.float32
    predicted = clf.predict(x)
    assert predicted.dtype == torch.int64 and predicted.shape == (6,)


def test_chunked_queries_give_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    support, labels = _blobs(n_classes=4, per_class=5, dim=3, seed=8)
    queries, _ = _blobs(n_classes=4, per_class=9, dim=3, seed=9)
    clf = KNNClassifier(n_neighbors=3, weights="distance").fit(support, labels)
    whole = clf.predict_with_scores(queries)
    monkeypatch.setattr(fewshot, "CHUNK_ELEMENTS", 7)  # 1 query per chunk
    chunked = clf.predict_with_scores(queries)
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-12)  # matmul rounding only


# --------------------------------------------------------------------------------------------
# Robustness: random small batches, duplicates, extreme scales
# --------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 64),
    n_classes=st.integers(1, 8),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    duplicate=st.booleans(),
    cosine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_batches_give_finite_valid_answers(
    n: int, n_classes: int, scale: float, duplicate: bool, cosine: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)) * scale
    if duplicate:
        x[:] = x[0]
    y = rng.integers(0, n_classes, size=n)
    distance = CosineSimilarity() if cosine else LpDistance(normalize_embeddings=False)
    for clf in (
        PrototypeClassifier(distance=distance),
        KNNClassifier(n_neighbors=3, weights="distance", distance=distance),
    ):
        predicted, scores = clf.fit(x, y).predict_with_scores(x)
        assert np.isfinite(scores).all()
        assert set(predicted.tolist()) <= set(y.tolist())
    # a query identical to the only enrolled example: distance ~0 (cosine similarity ~1)
    one = KNNClassifier(distance=distance).fit(x[:1], y[:1])
    assert one.predict_with_scores(x[:1])[1][0] == pytest.approx(
        1.0 if cosine else 0.0, abs=1e-6 * max(scale, 1.0)
    )


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_value_errors() -> None:
    x, y = np.eye(3), np.array([0, 1, 2])
    with pytest.raises(ValueError, match="reserved for rejected queries"):
        PrototypeClassifier().fit(x, np.array([0, -1, 2]))
    with pytest.raises(ValueError, match="integer dtype"):
        PrototypeClassifier().fit(x, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="3 entries but there are 2"):
        PrototypeClassifier().fit(x[:2], y)
    with pytest.raises(ValueError, match="NaN or Inf"):
        PrototypeClassifier().fit(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="floating-point"):
        PrototypeClassifier().fit(np.eye(3, dtype=np.int64), y)
    with pytest.raises(ValueError, match="2-D"):
        PrototypeClassifier().fit(np.zeros(3), y)
    with pytest.raises(ValueError, match="at least one example"):
        PrototypeClassifier().fit(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    clf = PrototypeClassifier().fit(x, y)
    with pytest.raises(ValueError, match="dimension 2 but the enrolled ones have 3"):
        clf.enroll(np.eye(2), np.array([0, 1]))
    with pytest.raises(ValueError, match="queries have dimension 2"):
        clf.predict(np.eye(2))
    with pytest.raises(ValueError, match="labels must have shape"):
        clf.score(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="BaseDistance"):
        PrototypeClassifier(distance="cosine").fit(x, y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_neighbors must be >= 1"):
        KNNClassifier(n_neighbors=0).fit(x, y)
    with pytest.raises(ValueError, match="n_neighbors must be an int"):
        KNNClassifier(n_neighbors=2.5).fit(x, y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights must be"):
        KNNClassifier(weights="inverse").fit(x, y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs normalised embeddings"):
        KNNClassifier(
            weights="distance", distance=DotProductSimilarity(normalize_embeddings=False)
        ).fit(x, y)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        PrototypeClassifier(threshold=float("nan")).fit(x, y)
    with pytest.raises(ValueError, match="unknown_label must be an int"):
        PrototypeClassifier(unknown_label="unknown").fit(x, y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_neighbors must be >= 1"):  # checked again at predict
        KNNClassifier().fit(x, y).set_params(n_neighbors=0).predict(x)
    with pytest.raises(NotFittedError):  # a ValueError subclass
        KNNClassifier().predict(x)
    assert issubclass(NotFittedError, ValueError)
