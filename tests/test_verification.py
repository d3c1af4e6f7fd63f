"""Verification: hand-computed ROC/AUC/EER/TPR@FPR cases, a brute-force threshold sweep,
the Verifier's calibration, pair sampling, the plot and input validation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmetric import verification
from deepmetric.distances import CosineSimilarity
from deepmetric.verification import (
    Verifier,
    evaluate_verification,
    make_pairs,
    pair_distances,
    plot_verification,
)

# --------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------


def test_hand_computed_example() -> None:
    # genuine distances 0.1 0.2 0.6, impostor 0.4 0.8 0.9; accept when d <= t
    #   t:    -inf  0.1  0.2  0.4  0.6  0.8  0.9
    #   TPR:  0     1/3  2/3  2/3  1    1    1
    #   FPR:  0     0    0    1/3  1/3  2/3  1
    # AUC = P(genuine < impostor) = (3 + 3 + 2) / 9; FNR = FPR = 1/3 at t = 0.4;
    # accuracy is 5/6 at t = 0.2 and at t = 0.6 (the stricter one is reported)
    d = np.array([0.1, 0.2, 0.6, 0.4, 0.8, 0.9])
    same = np.array([True, True, True, False, False, False])
    r = evaluate_verification(d, same, target_fprs=(0.1, 0.5))
    np.testing.assert_allclose(r.thresholds, [-np.inf, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9])
    np.testing.assert_allclose(r.tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(r.fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert r.auc == pytest.approx(8 / 9)
    assert r.eer == pytest.approx(1 / 3) and r.eer_threshold == pytest.approx(0.4)
    assert r.best_accuracy == pytest.approx(5 / 6) and r.best_threshold == pytest.approx(0.2)
    assert r.tpr_at_fpr == pytest.approx({0.1: 2 / 3, 0.5: 1.0})
    assert r.threshold_at_fpr == pytest.approx({0.1: 0.2, 0.5: 0.6})
    np.testing.assert_array_equal(r.genuine, [0.1, 0.2, 0.6])
    np.testing.assert_array_equal(r.impostor, [0.4, 0.8, 0.9])
    summary = r.summary()
    assert summary["auc"] == pytest.approx(8 / 9) and summary["tpr_at_fpr_0.1"] == 2 / 3


def test_scikit_learn_documentation_roc_example_as_similarities() -> None:
    # roc_curve's docstring example: y = [1, 1, 2, 2], scores = [0.1, 0.4, 0.35, 0.8]
    # -> fpr [0, 0, .5, .5, 1], tpr [0, .5, .5, 1, 1], thresholds [inf, .8, .4, .35, .1], AUC .75
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    same = np.array([0, 0, 1, 1])
    r = evaluate_verification(scores, same, is_similarity=True)
    np.testing.assert_allclose(r.fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(r.tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(r.thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert r.auc == pytest.approx(0.75)
    assert r.eer == pytest.approx(0.5) and r.eer_threshold == pytest.approx(0.4)
    assert r.best_accuracy == pytest.approx(0.75) and r.best_threshold == pytest.approx(0.8)
    np.testing.assert_array_equal(r.accept(scores, 0.4), [False, True, False, True])


def test_perfectly_separable_distances() -> None:
    d = np.array([0.1, 0.3, 0.2, 0.7, 0.9, 0.8])
    same = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    r = evaluate_verification(d, same, target_fprs=(1e-3, 1e-2))
    assert r.auc == 1.0 and r.eer == 0.0 and r.best_accuracy == 1.0
    assert r.eer_threshold == pytest.approx(0.3) and r.best_threshold == pytest.approx(0.3)
    assert r.tpr_at_fpr == {1e-3: 1.0, 1e-2: 1.0}
    assert r.threshold_at_fpr[1e-3] == pytest.approx(0.3)


def test_eer_interpolated_inside_a_step() -> None:
    # genuine 0.1 0.5 0.6, impostor 0.2 0.3: at t=0.2 FNR=2/3, FPR=1/2; at t=0.3 FNR=2/3, FPR=1
    # -> FNR (constant 2/3 on this step) meets FPR at 2/3; the nearer ROC point is t = 0.2
    d = np.array([0.1, 0.5, 0.6, 0.2, 0.3])
    same = np.array([1, 1, 1, 0, 0], dtype=bool)
    r = evaluate_verification(d, same)
    assert r.eer == pytest.approx(2 / 3) and r.eer_threshold == pytest.approx(0.2)


def test_all_scores_tied() -> None:
    r = evaluate_verification(np.full(4, 0.5), np.array([1, 0, 1, 0], dtype=bool))
    assert r.auc == 0.5 and r.eer == pytest.approx(0.5) and r.eer_threshold == 0.5
    assert r.best_accuracy == 0.5 and r.best_threshold == -np.inf  # accept nothing
    assert r.tpr_at_fpr[1e-2] == 0.0


# --------------------------------------------------------------------------------------------
# Against a brute-force sweep over thresholds
# --------------------------------------------------------------------------------------------
def _sweep(d: np.ndarray, same: np.ndarray) -> list[tuple[float, float, float]]:
    """(threshold, TPR, FPR) for "accept when d <= t", every distinct t, by counting."""
    rows = [(-np.inf, 0.0, 0.0)]
    for t in sorted(set(d.tolist())):
        accepted = [x <= t for x in d]
        tp = sum(a and s for a, s in zip(accepted, same, strict=True))
        fp = sum(a and not s for a, s in zip(accepted, same, strict=True))
        rows.append((t, tp / same.sum(), fp / (~same).sum()))
    return rows


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 40),
    levels=st.integers(2, 50),  # few levels -> many ties between genuine and impostor
    seed=st.integers(0, 2**16),
)
def test_against_brute_force_sweep(n: int, levels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    same[0], same[1] = True, False
    d = rng.integers(0, levels, size=n) / levels + np.where(same, 0.0, 0.2)
    r = evaluate_verification(d, same, target_fprs=(0.1, 0.3))
    genuine, impostor = d[same], d[~same]
    wins = sum((g < i) + 0.5 * (g == i) for g in genuine for i in impostor)
    assert r.auc == pytest.approx(wins / (len(genuine) * len(impostor)))
    sweep = _sweep(d, same)
    n_g, n_i = same.sum(), (~same).sum()
    accuracies = [(tpr * n_g + (1 - fpr) * n_i) / n for _, tpr, fpr in sweep]
    assert r.best_accuracy == pytest.approx(max(accuracies))
    best_t = sweep[int(np.argmax(accuracies))][0]
    assert r.best_threshold == best_t
    decisions = d <= r.best_threshold
    assert np.mean(decisions == same) == pytest.approx(r.best_accuracy)
    for target in (0.1, 0.3):
        allowed = [tpr for _, tpr, fpr in sweep if fpr <= target]
        assert r.tpr_at_fpr[target] == pytest.approx(max(allowed))
        accepted = d <= r.threshold_at_fpr[target]
        assert np.mean(accepted[~same]) <= target + 1e-12
        assert np.mean(accepted[same]) == pytest.approx(r.tpr_at_fpr[target])
    # the EER lies between the best "min(FPR, FNR)" and the best "max(FPR, FNR)"
    lower = max(min(fpr, 1 - tpr) for _, tpr, fpr in sweep)
    upper = min(max(fpr, 1 - tpr) for _, tpr, fpr in sweep)
    assert lower - 1e-12 <= r.eer <= upper + 1e-12
    assert 0.0 <= r.eer <= 1.0 and 0.0 <= r.auc <= 1.0


# --------------------------------------------------------------------------------------------
# Verifier and pair distances
# --------------------------------------------------------------------------------------------
def _identities(n_ids: int, per_id: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_ids), per_id)
    x = rng.normal(size=(n_ids, dim))[labels] + 0.35 * rng.normal(size=(len(labels), dim))
    return x, labels


def test_pair_distances_against_a_loop() -> None:
    x, _ = _identities(5, 3, 4, seed=0)
    first, second = np.array([0, 3, 14, 7]), np.array([1, 3, 2, 8])
    expected = [np.linalg.norm(x[i] - x[j]) for i, j in zip(first, second, strict=True)]
    np.testing.assert_allclose(pair_distances(x, first, second), expected, rtol=1e-6, atol=1e-9)
    cos = pair_distances(torch.from_numpy(x), first, second, distance=CosineSimilarity())
    expected_cos = [
        x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j])
        for i, j in zip(first, second, strict=True)
    ]
    np.testing.assert_allclose(cos, expected_cos, rtol=1e-6)


@pytest.mark.parametrize("cosine", [False, True])
def test_verifier_calibrates_and_verifies(cosine: bool) -> None:
    x, labels = _identities(30, 4, 8, seed=1)
    first, second, same = make_pairs(labels, 150, 400, seed=0)
    distance = CosineSimilarity() if cosine else None
    verifier = Verifier(distance=distance).fit(x[first], x[second], same)
    decided, scores = verifier.verify(x[first], x[second])
    assert decided.dtype == bool and scores.shape == (550,)
    # on its own calibration pairs the verifier reproduces the best accuracy
    assert np.mean(decided == same) == pytest.approx(verifier.result_.best_accuracy)
    assert verifier.result_.best_accuracy > 0.9 and verifier.result_.auc > 0.95
    assert verifier.result_.is_similarity == cosine
    # same as scoring the pairs ourselves
    expected = evaluate_verification(
        pair_distances(x, first, second, distance=distance), same, is_similarity=cosine
    )
    assert verifier.threshold_ == pytest.approx(expected.best_threshold)
    # torch input on held-out identities
    y, y_labels = _identities(10, 4, 8, seed=2)
    f2, s2, same2 = make_pairs(y_labels, 40, 40, seed=1)
    decided2, _ = verifier.verify(torch.from_numpy(y[f2]), torch.from_numpy(y[s2]))
    assert np.mean(decided2 == same2) > 0.8


def test_verifier_at_a_target_false_accept_rate() -> None:
    x, labels = _identities(30, 4, 8, seed=3)
    first, second, same = make_pairs(labels, 150, 400, seed=0)
    verifier = Verifier(target_fpr=0.01).fit(x[first], x[second], same)
    decided, _ = verifier.verify(x[first], x[second])
    assert np.mean(decided[~same]) <= 0.01
    assert np.mean(decided[same]) == pytest.approx(verifier.result_.tpr_at_fpr[0.01])
    assert verifier.threshold_ == verifier.result_.threshold_at_fpr[0.01]


# --------------------------------------------------------------------------------------------
# make_pairs
# --------------------------------------------------------------------------------------------
def _check_pairs(
    labels: np.ndarray, first: np.ndarray, second: np.ndarray, same: np.ndarray
) -> None:
    assert first.dtype == np.int64 and second.dtype == np.int64 and same.dtype == bool
    assert (first < second).all()
    np.testing.assert_array_equal(labels[first] == labels[second], same)
    assert len(set(zip(first.tolist(), second.tolist(), strict=True))) == len(first)  # distinct


@pytest.mark.parametrize("enumerate_limit", [verification.ENUMERATE_LIMIT, 0])
def test_make_pairs(monkeypatch: pytest.MonkeyPatch, enumerate_limit: int) -> None:
    # limit 0 forces random drawing (both paths must give valid pairs)
    monkeypatch.setattr(verification, "ENUMERATE_LIMIT", enumerate_limit)
    labels = np.repeat(np.arange(40), np.arange(40) % 5 + 1)  # class sizes 1..5
    first, second, same = make_pairs(labels, 60, 200, seed=3)
    assert same.sum() == 60 and (~same).sum() == 200
    _check_pairs(labels, first, second, same)
    again = make_pairs(torch.from_numpy(labels), 60, 200, seed=3)
    for a, b in zip(again, (first, second, same), strict=True):
        np.testing.assert_array_equal(a, b)
    other = make_pairs(labels, 60, 200, seed=4)
    assert not np.array_equal(other[0], first)


def test_make_pairs_can_take_every_pair() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])  # 3 + 1 genuine pairs, 15 - 4 = 11 impostor pairs
    first, second, same = make_pairs(labels, 4, 11, seed=0)
    _check_pairs(labels, first, second, same)
    assert len(first) == 15


def test_make_pairs_draws_genuine_pairs_uniformly(monkeypatch: pytest.MonkeyPatch) -> None:
    # classes of 2 and 5 samples: 1 + 10 genuine pairs; the small class's pair has p = 1/11
    monkeypatch.setattr(verification, "ENUMERATE_LIMIT", 0)
    labels = np.array([0, 0, 1, 1, 1, 1, 1])
    counts = Counter(
        tuple(make_pairs(labels, 1, 0, seed=s)[0].tolist()) == (0,) for s in range(1100)
    )
    # expected 100 +- 9.5 (binomial); allow 4 standard deviations
    assert abs(counts[True] - 100) < 40


def test_make_pairs_value_errors() -> None:
    labels = np.array([0, 0, 1])
    with pytest.raises(ValueError, match="only 1 same-label pairs exist"):
        make_pairs(labels, 2, 0)
    with pytest.raises(ValueError, match="only 2 different-label pairs exist"):
        make_pairs(labels, 0, 3)
    with pytest.raises(ValueError, match="n_genuine must be a non-negative int"):
        make_pairs(labels, -1, 0)
    with pytest.raises(ValueError, match="1-D"):
        make_pairs(np.zeros((2, 2)), 1, 1)


# --------------------------------------------------------------------------------------------
# count_pairs and evaluate_labelled_set
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels", [[0, 0, 0, 1, 1, 2], [3], [], [5, 5, 5, 5], list(range(7))])
def test_count_pairs_against_a_loop(labels: list[int]) -> None:
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]
    expected = (sum(a == b for a, b in pairs), sum(a != b for a, b in pairs))
    assert verification.count_pairs(np.array(labels, dtype=np.int64)) == expected
    assert verification.count_pairs(torch.tensor(labels, dtype=torch.long)) == expected


def test_labelled_set_with_every_pair_against_brute_force() -> None:
    # 4 identities x 5 samples: 40 genuine and 150 impostor pairs, all taken (cap 1000)
    x, labels = _identities(4, 5, 6, seed=7)
    result = verification.evaluate_labelled_set(x, labels, max_pairs=1000, target_fprs=(0.1,))
    genuine, impostor = [], []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            d = float(np.linalg.norm(x[i] - x[j]))
            (genuine if labels[i] == labels[j] else impostor).append(d)
    np.testing.assert_allclose(np.sort(result.genuine), np.sort(genuine), rtol=1e-6)
    np.testing.assert_allclose(np.sort(result.impostor), np.sort(impostor), rtol=1e-6)
    wins = sum((g < i) + 0.5 * (g == i) for g in genuine for i in impostor)
    assert result.auc == pytest.approx(wins / (len(genuine) * len(impostor)))
    correct = [
        sum(g <= t for g in genuine) + sum(i > t for i in impostor)
        for t in [-np.inf, *genuine, *impostor]
    ]
    assert result.best_accuracy == pytest.approx(max(correct) / 190)


def test_labelled_set_caps_the_pairs_and_is_seeded() -> None:
    x, labels = _identities(10, 6, 4, seed=1)  # 150 genuine, 1620 impostor pairs
    result = verification.evaluate_labelled_set(x, labels, max_pairs=100, seed=5)
    assert len(result.genuine) == 100 and len(result.impostor) == 100
    first, second, same = make_pairs(labels, 100, 100, seed=5)
    expected = evaluate_verification(pair_distances(x, first, second), same)
    assert result.auc == expected.auc and result.best_threshold == expected.best_threshold
    # fewer genuine pairs than the cap: all of them, and the cap of impostors
    capped = verification.evaluate_labelled_set(x, labels, max_pairs=500, seed=5)
    assert len(capped.genuine) == 150 and len(capped.impostor) == 500
    cosine = verification.evaluate_labelled_set(x, labels, 100, distance=CosineSimilarity())
    assert cosine.is_similarity and cosine.auc > 0.9


def test_labelled_set_value_errors() -> None:
    x = np.eye(3)
    with pytest.raises(ValueError, match="a class with two or more samples"):
        verification.evaluate_labelled_set(x, np.array([0, 1, 2]), max_pairs=10)
    with pytest.raises(ValueError, match="at least two classes"):
        verification.evaluate_labelled_set(x, np.array([1, 1, 1]), max_pairs=10)
    with pytest.raises(ValueError, match="max_pairs must be a positive int"):
        verification.evaluate_labelled_set(x, np.array([0, 0, 1]), max_pairs=0)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------
def test_plot_writes_a_png(tmp_path: Path) -> None:
    x, labels = _identities(20, 4, 8, seed=4)
    first, second, same = make_pairs(labels, 100, 300, seed=0)
    result = evaluate_verification(pair_distances(x, first, second), same)
    path = plot_verification(result, tmp_path / "verification.png")
    assert path.stat().st_size > 10_000
    image = matplotlib.image.imread(path)
    assert image.shape == (420, 1100, 4)  # 11 x 4.2 inches at 100 dpi, RGBA
    assert image[..., :3].std() > 0.05  # not a blank canvas
    # a degenerate result (best threshold -inf) still plots
    tied = evaluate_verification(np.full(4, 0.5), np.array([1, 0, 1, 0], dtype=bool))
    assert plot_verification(tied, str(tmp_path / "tied.png")).stat().st_size > 0


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_value_errors() -> None:
    d = np.array([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="at least one genuine"):
        evaluate_verification(d, np.array([True, True, True]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        evaluate_verification(np.array([0.1, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="same must have shape"):
        evaluate_verification(d, np.array([True, False]))
    with pytest.raises(ValueError, match="same must be boolean"):
        evaluate_verification(d, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="distances must be 1-D"):
        evaluate_verification(d.reshape(3, 1), np.array([True, False, True]))
    with pytest.raises(ValueError, match="floating point"):
        evaluate_verification(np.array([1, 2]), np.array([True, False]))
    with pytest.raises(ValueError, match="target_fprs must be in"):
        evaluate_verification(d, np.array([True, False, True]), target_fprs=(0.0,))
    with pytest.raises(ValueError, match="index outside"):
        pair_distances(np.eye(3), np.array([0]), np.array([3]))
    with pytest.raises(ValueError, match="same length"):
        pair_distances(np.eye(3), np.array([0, 1]), np.array([2]))
    with pytest.raises(ValueError, match="same shape"):
        Verifier().fit(np.eye(3), np.eye(2), np.array([True, False]))
    with pytest.raises(ValueError, match="not calibrated"):
        Verifier().verify(np.eye(2), np.eye(2))
    with pytest.raises(ValueError, match="BaseDistance"):
        Verifier(distance="cosine").fit(np.eye(2), np.eye(2), np.array([True, False]))  # type: ignore[arg-type]
