"""The loss formulas of :mod:`deepmetric.functional`.

* each row rule's values and closed-form gradient against autograd through the same formula
  written plainly here with dense ``(B, R)`` masks (the references below), from labels, from a
  miner's masks, with and without a separate reference set, with empty rows;
* the engine's dense path (:func:`deepmetric.pairwise.row_losses` with a distance it does not
  fuse) against autograd through those references on the distance's matrix, and
  ``gradcheck`` of it in float64 (not for circle, whose weights are held constant).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric import distances, functional, pairwise
from deepmetric.pairwise import PairBlocks, RowBlock, label_masks, prepare_batch

# -- the formulas written plainly, differentiated by autograd ------------------------------------


def _logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """``log Σ exp(x)`` over the masked entries of each row; ``-inf`` for an empty row (its
    gradient 0, not NaN)."""
    empty = ~mask.any(dim=1, keepdim=True)
    x = x.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    return torch.logsumexp(x, dim=1).masked_fill(empty.squeeze(1), float("-inf"))


def circle_reference(
    sim: Tensor, pos_mask: Tensor, neg_mask: Tensor, m: float, gamma: float
) -> Tensor:
    """Sun et al., 2020: softplus of the two log-sum-exps, the weights ``α`` held constant."""
    alpha_p = (1 + m - sim.detach()).clamp_min(0)
    alpha_n = (sim.detach() + m).clamp_min(0)
    pos = _logsumexp(-gamma * alpha_p * (sim - (1 - m)), pos_mask)
    neg = _logsumexp(gamma * alpha_n * (sim - m), neg_mask)
    both = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    z = torch.where(both, pos + neg, 0.0)
    return torch.where(both, F.softplus(z), 0.0)


def multi_similarity_reference(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    alpha: float,
    beta: float,
    base: float,
    distance: distances.BaseDistance,
) -> Tensor:
    """Wang et al., 2019: ``log(1 + Σ exp)`` of each set, over its temperature."""
    sign = 1.0 if distance.is_inverted else -1.0  # a distance: the comparisons flip

    def log1p_sum(x: Tensor, mask: Tensor) -> Tensor:  # log(1 + Σ_mask exp(x))
        with_one = torch.cat([x.masked_fill(~mask, float("-inf")), torch.zeros_like(x[:, :1])], 1)
        return torch.logsumexp(with_one, dim=1)

    pos = log1p_sum(-alpha * sign * (mat - base), pos_mask) / alpha
    neg = log1p_sum(beta * sign * (mat - base), neg_mask) / beta
    return pos + neg


def generalized_lifted_reference(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    pos_margin: float,
    neg_margin: float,
    distance: distances.BaseDistance,
) -> Tensor:
    """Hermans et al., 2017: relu of the two log-sum-exps, an empty one counting 0."""
    sign = -1.0 if distance.is_inverted else 1.0
    pos = _logsumexp(sign * (mat - pos_margin), pos_mask).nan_to_num(neginf=0.0)
    neg = _logsumexp(sign * (neg_margin - mat), neg_mask).nan_to_num(neginf=0.0)
    return F.relu(pos + neg)


def supervised_contrastive_reference(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    temperature: float,
    distance: distances.BaseDistance,
) -> Tensor:
    """Khosla et al., 2020: the mean over a row's positives of ``-log softmax`` over its
    positives and negatives; 0 for a row with no positive."""
    logits = (mat if distance.is_inverted else -mat) / temperature
    log_prob = logits - _logsumexp(logits, pos_mask | neg_mask).unsqueeze(1)
    n_pos = pos_mask.sum(dim=1)
    mean = torch.where(pos_mask, log_prob, 0.0).sum(dim=1) / n_pos.clamp_min(1)
    return torch.where(n_pos > 0, -mean, 0.0)


def nca_reference(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    scale: float,
    distance: distances.BaseDistance,
) -> Tensor:
    """Goldberger et al., 2005: ``-log`` of the softmax mass of a row's positives among its
    positives and negatives (0 for a row with no positive)."""
    logits = scale * (mat if distance.is_inverted else -mat)
    has_pos = pos_mask.any(dim=1)
    pos = torch.where(has_pos, _logsumexp(logits, pos_mask), 0.0)
    return torch.where(has_pos, _logsumexp(logits, pos_mask | neg_mask) - pos, 0.0)


def ranked_list_reference(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    margin: float,
    alpha: float,
    imbalance: float,
    Tp: float,
    Tn: float,
) -> Tensor:
    """Wang et al., 2019 (PML's reading): weighted mean violation of the active entries."""
    eps = 1e-5 * mat.shape[1]
    pos_active = pos_mask & (mat > alpha - margin) & (mat > 0)
    neg_active = neg_mask & (mat < alpha) & (mat > 0)
    pos_v = torch.where(pos_active, mat - (alpha - margin), 0.0)
    neg_v = torch.where(neg_active, alpha - mat, 0.0)
    pos_w = torch.exp(Tp * pos_v) * pos_active
    neg_w = torch.exp(Tn * neg_v) * neg_active
    loss_p = (pos_w * pos_v).sum(1) / (pos_w.sum(1) + eps)
    loss_n = (neg_w * neg_v).sum(1) / (neg_w.sum(1) + eps)
    return (1 - imbalance) * loss_p + imbalance * loss_n


# -- the rules and their references, with the same options -------------------------------------

Reference = Callable[[Tensor, Tensor, Tensor], Tensor]
Rule = Callable[[RowBlock], tuple[Tensor, Tensor]]


def _cases() -> dict[str, tuple[Reference, Rule, distances.BaseDistance]]:
    cos, lp = distances.CosineSimilarity(), distances.LpDistance()
    cases: dict[str, tuple[Reference, Rule, distances.BaseDistance]] = {
        "circle": (
            lambda m, p, n: circle_reference(m, p, n, 0.25, 16),
            lambda b: functional.circle_rows(b, 0.25, 16),
            cos,
        )
    }
    for name, d in (("sim", cos), ("dist", lp)):
        cases[f"multi-similarity-{name}"] = (
            lambda m, p, n, d=d: multi_similarity_reference(m, p, n, 2, 10, 0.5, d),
            lambda b, d=d: functional.multi_similarity_rows(b, 2, 10, 0.5, d),
            d,
        )
        cases[f"nca-{name}"] = (
            lambda m, p, n, d=d: nca_reference(m, p, n, 2.5, d),
            lambda b, d=d: functional.nca_rows(b, 2.5, d),
            d,
        )
        cases[f"supervised-contrastive-{name}"] = (
            lambda m, p, n, d=d: supervised_contrastive_reference(m, p, n, 0.3, d),
            lambda b, d=d: functional.supervised_contrastive_rows(b, 0.3, d),
            d,
        )
        cases[f"generalized-lifted-{name}"] = (
            lambda m, p, n, d=d: generalized_lifted_reference(m, p, n, 0.2, 0.9, d),
            lambda b, d=d: functional.generalized_lifted_structure_rows(b, 0.2, 0.9, d),
            d,
        )
    for tp in (0.0, 1.5):
        cases[f"ranked-list-Tp{tp}"] = (
            lambda m, p, n, tp=tp: ranked_list_reference(m, p, n, 0.4, 1.2, 0.3, tp, 2.0),
            lambda b, tp=tp: functional.ranked_list_rows(b, 0.4, 1.2, 0.3, tp, 2.0),
            lp,
        )
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("pairs", ["labels", "labels-with-ref", "miner-masks"])
def test_row_rule_matches_autograd_of_its_formula(name: str, pairs: str) -> None:
    reference, rule, _ = CASES[name]
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (10,), generator=g)
    labels[0] = 9  # a query with no positive: an empty set
    same_source = pairs != "labels-with-ref"
    ref_labels = labels if same_source else torch.randint(0, 4, (12,), generator=g)
    # entries in (0, 1.6): every rule has active and inactive entries there
    mat = torch.rand(len(labels), len(ref_labels), generator=g, dtype=torch.float64) * 1.6
    pos_mask, neg_mask = label_masks(labels, ref_labels, same_source)
    if pairs == "miner-masks":  # a miner keeps some pairs: row 1 has no negative left
        pos_mask &= torch.rand(pos_mask.shape, generator=g) < 0.7
        neg_mask &= torch.rand(neg_mask.shape, generator=g) < 0.5
        neg_mask[1] = False
    rows, cols = torch.where(pos_mask)
    from_labels = pairs != "miner-masks"
    diagonal = 0 if same_source else None
    block = RowBlock(mat.clone(), rows, cols, diagonal, None if from_labels else neg_mask)

    losses, grad = rule(block)

    leaf = mat.clone().requires_grad_(True)
    expected = reference(leaf, pos_mask, neg_mask)
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    torch.testing.assert_close(losses, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(block.mat, mat)  # a rule leaves its block's matrix alone


# -- the engine's dense path: a distance it does not fuse ---------------------------------------

DENSE_DISTANCES: dict[str, Callable[[], distances.BaseDistance]] = {
    "l1": lambda: distances.LpDistance(p=1),
    "lp-power-3": lambda: distances.LpDistance(power=3, normalize_embeddings=False),
    "dot-squared": lambda: distances.DotProductSimilarity(power=2),
}


def _dense_cases() -> list[tuple[str, str]]:
    cases = []
    for name, (_, _, d) in CASES.items():
        for distance in DENSE_DISTANCES:
            if DENSE_DISTANCES[distance]().is_inverted == d.is_inverted:
                cases.append((name, distance))
    return cases


def _with_distance(name: str, distance: distances.BaseDistance) -> tuple[Reference, Rule]:
    """The case's reference and rule, reading the matrix in the direction of ``distance``."""
    reference, rule, d = CASES[name]
    if name.startswith("multi-similarity"):
        return (
            lambda m, p, n: multi_similarity_reference(m, p, n, 2, 10, 0.5, distance),
            lambda b: functional.multi_similarity_rows(b, 2, 10, 0.5, distance),
        )
    if name.startswith("nca"):
        return (
            lambda m, p, n: nca_reference(m, p, n, 2.5, distance),
            lambda b: functional.nca_rows(b, 2.5, distance),
        )
    if name.startswith("supervised-contrastive"):
        return (
            lambda m, p, n: supervised_contrastive_reference(m, p, n, 0.3, distance),
            lambda b: functional.supervised_contrastive_rows(b, 0.3, distance),
        )
    if name.startswith("generalized-lifted"):
        return (
            lambda m, p, n: generalized_lifted_reference(m, p, n, 0.2, 0.9, distance),
            lambda b: functional.generalized_lifted_structure_rows(b, 0.2, 0.9, distance),
        )
    return reference, rule


@pytest.mark.parametrize(("name", "distance_name"), _dense_cases())
@pytest.mark.parametrize("with_ref", [False, True])
def test_dense_path_matches_autograd_and_passes_gradcheck(
    name: str, distance_name: str, with_ref: bool
) -> None:
    distance = DENSE_DISTANCES[distance_name]()
    assert pairwise.fused_matrix_kind(distance) is None  # the dense path
    reference, rule = _with_distance(name, distance)
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(9, 4, generator=g, dtype=torch.float64) * 0.6
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0])
    ref = torch.randn(7, 4, generator=g, dtype=torch.float64) * 0.6
    ref_labels = torch.tensor([0, 1, 2, 3, 3, 1, 0])

    def losses(e: Tensor, r: Tensor) -> Tensor:
        batch = prepare_batch(
            e, labels, None, r if with_ref else None, ref_labels if with_ref else None
        )
        return pairwise.row_losses(batch, distance, rule, PairBlocks(batch))

    e, r = emb.clone().requires_grad_(True), ref.clone().requires_grad_(with_ref)
    ours = losses(e, r)
    ours.sum().backward()
    e2 = emb.clone().requires_grad_(True)
    r2 = ref.clone()
    mat = distance(e2, r2 if with_ref else None)
    masks = label_masks(labels, ref_labels if with_ref else labels, not with_ref)
    expected = reference(mat, *masks)
    expected.sum().backward()
    torch.testing.assert_close(ours.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e.grad, e2.grad, rtol=1e-8, atol=1e-10)
    if name == "circle":  # (its weights are held constant: not the numerical derivative)
        return
    # distinct row weights: each row's own gradient, not only their sum
    assert torch.autograd.gradcheck(
        lambda e, r: losses(e, r) * torch.arange(1.0, 10.0, dtype=torch.float64),
        (emb.clone().requires_grad_(True), ref.clone().requires_grad_(with_ref)),
        eps=1e-6,
        atol=1e-6,
    )


# -- term rules: elementwise losses of listed tuples ---------------------------------------------


@pytest.mark.parametrize("smooth_loss", [False, True])
@pytest.mark.parametrize("inverted", [False, True])
def test_triplet_margin_gradient_matches_autograd(smooth_loss: bool, inverted: bool) -> None:
    distance = distances.CosineSimilarity() if inverted else distances.LpDistance()
    g = torch.Generator().manual_seed(7)
    # violations on both sides of 0, and beyond softplus's threshold of 20
    ap = torch.cat([torch.rand(50, generator=g, dtype=torch.float64) * 2, torch.tensor([30.0])])
    an = torch.cat([torch.rand(50, generator=g, dtype=torch.float64) * 2, torch.tensor([-1.0])])
    if inverted:
        ap, an = an, ap
    losses, grad_ap = functional.triplet_margin(ap, an, 0.3, smooth_loss, distance)

    ap_leaf, an_leaf = ap.clone().requires_grad_(True), an.clone().requires_grad_(True)
    violation = (an_leaf - ap_leaf if inverted else ap_leaf - an_leaf) + 0.3
    expected = F.softplus(violation) if smooth_loss else F.relu(violation)
    grads = torch.autograd.grad(expected.sum(), (ap_leaf, an_leaf))
    torch.testing.assert_close(losses, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ap, grads[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(-grad_ap, grads[1], rtol=1e-12, atol=1e-12)
    assert 0 < int((violation > 0).sum()) < len(violation)  # both sides of the hinge


@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("inverted", [False, True])
def test_contrastive_pairs_gradient_matches_autograd(positive: bool, inverted: bool) -> None:
    distance = distances.CosineSimilarity() if inverted else distances.LpDistance()
    g = torch.Generator().manual_seed(8)
    dists = torch.rand(60, generator=g, dtype=torch.float64) * 2 - (0.5 if inverted else 0.0)
    losses, grad = functional.contrastive_pairs(dists, 0.6, positive, distance)

    leaf = dists.clone().requires_grad_(True)
    # positive pairs are pulled within the margin, negatives pushed beyond it
    pulled = leaf - 0.6 if positive else 0.6 - leaf
    expected = F.relu(-pulled if inverted else pulled)
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    torch.testing.assert_close(losses, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert 0 < int((losses > 0).sum()) < len(losses)  # both sides of the hinge


@pytest.mark.parametrize("name", ["multi-similarity-dist", "ranked-list-Tp0.0"])
def test_dense_path_gives_first_derivatives_only(name: str) -> None:
    """The rule's gradient is a constant of the backward pass: a second derivative through it
    would be silently wrong, so asking for one raises."""
    _, rule = _with_distance(name, distances.LpDistance(p=1))
    emb = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    batch = prepare_batch(emb, torch.tensor([0, 0, 1, 1, 2, 2, 0, 1]), None, None, None)
    losses = pairwise.row_losses(batch, distances.LpDistance(p=1), rule, PairBlocks(batch))
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(losses.sum(), emb, create_graph=True)


@pytest.mark.parametrize("inverted", [False, True])
def test_npairs_rows_match_autograd_of_the_cross_entropy(inverted: bool) -> None:
    distance = distances.DotProductSimilarity() if inverted else distances.LpDistance()
    g = torch.Generator().manual_seed(9)
    mat = torch.rand(7, 7, generator=g, dtype=torch.float64) * 3
    pair = torch.arange(7)
    losses, grad = functional.npairs_rows(RowBlock(mat.clone(), pair, pair, None, None), distance)

    leaf = mat.clone().requires_grad_(True)
    expected = F.cross_entropy(leaf if inverted else -leaf, pair, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    torch.testing.assert_close(losses, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


# -- the classification formulas against plain loops over the samples and classes -----------------


def _classification_case(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(6, 4)`` cosines in ``(-1, 1)``, labels covering classes 0-2 (class 3 has no sample),
    and miner-like weights in ``(0, 1]``."""
    g = torch.Generator().manual_seed(seed)
    cosine = torch.rand(6, 4, generator=g, dtype=torch.float64) * 1.9 - 0.95
    labels = torch.tensor([0, 2, 1, 0, 2, 2])
    weights = torch.rand(6, generator=g, dtype=torch.float64) * 0.9 + 0.1
    return cosine, labels, weights


def _plain_cross_entropy(logits: list[float], label: int) -> float:
    return math.log(sum(math.exp(z) for z in logits)) - logits[label]


@pytest.mark.parametrize("inverted", [False, True])
def test_normalized_softmax_losses_match_a_plain_loop(inverted: bool) -> None:
    distance = distances.CosineSimilarity() if inverted else distances.LpDistance()
    sims, labels, weights = _classification_case(1)
    got = functional.normalized_softmax_losses(sims, labels, 0.3, distance, weights)
    sign = 1.0 if inverted else -1.0
    for i in range(len(sims)):
        logits = [sign * float(s) / 0.3 for s in sims[i]]
        expected = float(weights[i]) * _plain_cross_entropy(logits, int(labels[i]))
        assert float(got[i]) == pytest.approx(expected, rel=1e-12)


def _plain_large_margin(c: float, m: int) -> float:
    theta = math.acos(c)
    k = math.floor(theta * m / math.pi)
    return (-1) ** k * math.cos(m * theta) - 2 * k


def _plain_arc(c: float, m: float) -> float:
    theta = math.acos(c)
    return math.cos(theta + m) if theta <= math.pi - m else c - m * math.sin(m)


@pytest.mark.parametrize(
    ("name", "margin", "plain"),
    [
        ("large_margin", 3, _plain_large_margin),
        ("cosface", 0.35, lambda c, m: c - m),
        ("arcface", 0.5, _plain_arc),
        ("arcface_past_pi_minus_m", 2.8, _plain_arc),  # most targets take the fallback
    ],
)
def test_margin_softmax_losses_match_a_plain_loop(
    name: str, margin: float, plain: Callable[[float, float], float]
) -> None:
    cosine, labels, weights = _classification_case(2)
    targets = {
        "large_margin": lambda c: functional.large_margin_target(c, int(margin)),
        "cosface": lambda c: functional.additive_cosine_margin(c, margin),
    }
    target = targets.get(name, lambda c: functional.additive_angular_margin(c, margin))
    scale = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).unsqueeze(1) * 3  # a per-row scale
    got = functional.margin_softmax_losses(
        cosine, labels, target, lambda logits: logits * scale, weights
    )
    for i in range(len(cosine)):
        y = int(labels[i])
        row = [float(c) for c in cosine[i]]
        row[y] = plain(row[y], margin)
        logits = [z * float(scale[i, 0]) for z in row]
        expected = float(weights[i]) * _plain_cross_entropy(logits, y)
        assert float(got[i]) == pytest.approx(expected, rel=1e-10)


def test_margin_softmax_losses_pass_gradcheck() -> None:
    cosine, labels, weights = _classification_case(3)
    cosine.requires_grad_(True)
    for target in (
        lambda c: functional.large_margin_target(c, 4),
        lambda c: functional.additive_angular_margin(c, 0.5),
    ):
        assert torch.autograd.gradcheck(
            lambda c, t=target: functional.margin_softmax_losses(
                c, labels, t, lambda z: z * 2.0, weights
            ),
            (cosine,),
        )


@pytest.mark.parametrize("inverted", [False, True])
def test_proxy_nca_losses_match_a_plain_loop(inverted: bool) -> None:
    distance = distances.CosineSimilarity() if inverted else distances.LpDistance(power=2)
    mat, labels, weights = _classification_case(4)
    got = functional.proxy_nca_losses(mat, labels, 2.5, distance, weights)
    sign = 1.0 if inverted else -1.0
    for i in range(len(mat)):
        logits = [sign * 2.5 * float(d) for d in mat[i]]
        expected = float(weights[i]) * _plain_cross_entropy(logits, int(labels[i]))
        assert float(got[i]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("inverted", [False, True])
def test_proxy_anchor_losses_match_a_plain_loop(inverted: bool) -> None:
    distance = distances.CosineSimilarity() if inverted else distances.LpDistance()
    sim, labels, weights = _classification_case(5)
    margin, alpha = 0.1, 8.0
    pos, neg = functional.proxy_anchor_losses(sim, labels, 4, margin, alpha, weights, distance)
    for j in range(4):
        pos_sum = neg_sum = 0.0
        for i in range(len(sim)):
            s, w = float(sim[i, j]), float(weights[i])
            if inverted:  # a similarity: positives pulled above the margin, negatives below -m
                pull, push = margin - s, s + margin
            else:  # a distance: the same margins measured the other way round
                pull, push = s - margin, -margin - s
            if int(labels[i]) == j:
                pos_sum += math.exp(alpha * pull + w - 1)
            else:
                neg_sum += math.exp(alpha * push + w - 1)
        assert float(pos[j]) == pytest.approx(math.log1p(pos_sum), rel=1e-12, abs=1e-15)
        assert float(neg[j]) == pytest.approx(math.log1p(neg_sum), rel=1e-12)
    assert float(pos[3]) == 0.0  # class 3 has no sample: log(1 + 0)
