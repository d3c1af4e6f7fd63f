"""NPairsLoss (:mod:`deepmetric.losses.npairs`): loop references, the closed-form backward
against autograd, half precision and second derivatives, labels required."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from deepmetric import distances
from deepmetric.losses.npairs import NPairsLoss
from tests.losses.lifted_npairs_ntxent_cases import cosine, grads_wrt_both, shuffled_batch
from tests.parity import value_and_grad


def loop_npairs(emb: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor) -> Tensor:
    """Sohn's N-pair loss with PML's default similarity (the dot product of L2-normalised
    embeddings, i.e. the cosine); per label the first (anchor, positive) pair in
    row-major order; anchors from ``emb``, positives from ``ref``."""
    chosen: dict[int, tuple[int, int]] = {}
    for i in range(len(emb)):
        for j in range(len(ref)):
            same_sample = ref is emb and i == j
            if labels[i] == ref_labels[j] and not same_sample and int(labels[i]) not in chosen:
                chosen[int(labels[i])] = (i, j)
    pairs = [chosen[k] for k in sorted(chosen)]
    losses = []
    for i, (a, _) in enumerate(pairs):
        logits = torch.stack([cosine(emb[a], ref[q]) for _, q in pairs])
        losses.append(-(logits[i] - torch.logsumexp(logits, 0)))
    return torch.stack(losses).mean()


def test_npairs_matches_loop() -> None:
    emb, labels = shuffled_batch(n_classes=5, per_class=3, dim=5, seed=23)
    v1, g1 = value_and_grad(NPairsLoss(), emb, labels)
    v2, g2 = value_and_grad(lambda e, lab: loop_npairs(e, lab, e, lab), emb, labels)
    assert v1 == pytest.approx(v2, rel=1e-10)
    torch.testing.assert_close(g1, g2)


def test_npairs_ref_emb_matches_loop() -> None:
    """PML rejects ref_emb for NPairsLoss; here positives come from the reference set."""
    emb, labels = shuffled_batch(n_classes=5, per_class=2, dim=5, seed=24)
    g = torch.Generator().manual_seed(25)
    ref = torch.randn(14, 5, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, 7, (14,), generator=g)
    v1, ge1, gr1 = grads_wrt_both(NPairsLoss(), emb, labels, ref, ref_labels)
    e, r = emb.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    expected = loop_npairs(e, labels, r, ref_labels)
    expected.backward()
    assert v1 == pytest.approx(float(expected.detach()), rel=1e-10)
    torch.testing.assert_close(ge1, e.grad)
    torch.testing.assert_close(gr1, r.grad)


class _AutogradDotProduct(distances.DotProductSimilarity):
    """A subclass: NPairsLoss compares its rows through autograd, not its closed form."""


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_ref", [False, True])
def test_npairs_closed_form_backward_matches_autograd(normalize: bool, with_ref: bool) -> None:
    """The inner-product fast path against the same loss through autograd (a distance
    subclass), with and without normalisation and a reference set, and a miner's tuple whose
    pairs share samples (a sample that is both an anchor and another pair's positive)."""
    emb, labels = shuffled_batch(n_classes=6, per_class=3, dim=5, seed=26)
    g = torch.Generator().manual_seed(27)
    ref = torch.randn(15, 5, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, 6, (15,), generator=g)
    fast = NPairsLoss(distance=distances.DotProductSimilarity(normalize_embeddings=normalize))
    slow = NPairsLoss(distance=_AutogradDotProduct(normalize_embeddings=normalize))
    if with_ref:
        v1, ge1, gr1 = grads_wrt_both(fast, emb, labels, ref, ref_labels)
        v2, ge2, gr2 = grads_wrt_both(slow, emb, labels, ref, ref_labels)
        torch.testing.assert_close(gr1, gr2)
    else:
        same = torch.where(labels[:, None] == labels[None])
        keep = same[0] != same[1]
        anchors, positives = same[0][keep].flip(0), same[1][keep].flip(0)  # last pairs first
        # a pair of another label whose positive is the first pair's anchor
        other = int(torch.where(labels != labels[anchors[0]])[0][0])
        anchors = torch.cat([torch.tensor([other]), anchors])
        positives = torch.cat([anchors[1:2], positives])
        empty = torch.empty(0, dtype=torch.long)
        tup = (anchors, positives, empty, empty)
        v1, ge1 = value_and_grad(fast, emb, labels, tup)
        v2, ge2 = value_and_grad(slow, emb, labels, tup)
    assert v1 == pytest.approx(v2, rel=1e-12)
    torch.testing.assert_close(ge1, ge2)


def test_npairs_half_precision_and_second_derivatives() -> None:
    emb, labels = shuffled_batch(n_classes=6, per_class=3, dim=8, seed=28)
    half = emb.to(torch.bfloat16).requires_grad_(True)
    loss = NPairsLoss()(half, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad is not None
    assert half.grad.dtype == torch.bfloat16
    expected, expected_grad = value_and_grad(NPairsLoss(), half.detach().float(), labels)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(half.grad.float(), expected_grad, rtol=0.02, atol=1e-3)
    e = emb.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(NPairsLoss()(e, labels), e, create_graph=True)


def test_npairs_requires_labels() -> None:
    tup = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="labels"):
        NPairsLoss()(torch.randn(4, 3), None, tup)
