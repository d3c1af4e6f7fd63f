"""The N-pair engine (:func:`deepmetric.pairwise.npairs_losses`): each path (the inner-product
closed form, any other distance's matrix) against a plain loop that picks the pairs and
autograd through the distance's matrix of the picked rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric import distances, functional, pairwise
from deepmetric.pairwise import prepare_batch


def _first_pairs(labels: Tensor, ref_labels: Tensor, same: bool) -> tuple[Tensor, Tensor]:
    """Per label, the first (anchor, positive) pair in row-major order, ordered by label."""
    chosen: dict[int, tuple[int, int]] = {}
    for i in range(len(labels)):
        for j in range(len(ref_labels)):
            if labels[i] == ref_labels[j] and not (same and i == j):
                chosen.setdefault(int(labels[i]), (i, j))
    pairs = [chosen[k] for k in sorted(chosen)]
    return torch.tensor([a for a, _ in pairs]), torch.tensor([p for _, p in pairs])


@pytest.mark.parametrize(
    "distance",
    [
        distances.DotProductSimilarity(),  # the closed form, normalised
        distances.DotProductSimilarity(normalize_embeddings=False),  # the closed form, raw
        distances.LpDistance(),  # the distance's matrix
        distances.LpDistance(p=1, normalize_embeddings=False),
    ],
    ids=["dot_normalized", "dot_raw", "euclidean", "l1"],
)
@pytest.mark.parametrize("with_ref", [False, True])
def test_npairs_losses_match_a_loop_and_autograd(
    distance: distances.BaseDistance, with_ref: bool
) -> None:
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 1, 0, 1, 3, 2, 0, 4, 2, 1, 5, 0])
    ref = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ref_labels = torch.tensor([1, 0, 3, 0, 5, 1, 6, 2, 3])
    if with_ref:
        batch = prepare_batch(emb, labels, None, ref, ref_labels)
    else:
        batch = prepare_batch(emb, labels, None, None, None)
    losses, anchors = pairwise.npairs_losses(
        batch, distance, lambda block: functional.npairs_rows(block, distance)
    )
    weights = torch.linspace(0.5, 1.5, len(losses), dtype=torch.float64)
    got_grads = torch.autograd.grad((losses * weights).sum(), (emb, ref), allow_unused=True)

    other, other_labels = (ref, ref_labels) if with_ref else (emb, labels)
    expected_anchors, positives = _first_pairs(labels, other_labels, not with_ref)
    mat = distance(emb[expected_anchors], other[positives])
    logits = mat if distance.is_inverted else -mat
    expected = F.cross_entropy(logits, torch.arange(len(mat)), reduction="none")
    expected_grads = torch.autograd.grad((expected * weights).sum(), (emb, ref), allow_unused=True)

    assert torch.equal(anchors, expected_anchors)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(got_grads, expected_grads, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            assert got is not None
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_npairs_losses_without_a_positive_pair_are_empty() -> None:
    emb = torch.randn(4, 3, dtype=torch.float64)
    batch = prepare_batch(emb, torch.tensor([0, 1, 2, 3]), None, None, None)
    distance = distances.DotProductSimilarity()
    losses, anchors = pairwise.npairs_losses(
        batch, distance, lambda block: functional.npairs_rows(block, distance)
    )
    assert losses.shape == (0,) and anchors.shape == (0,)
