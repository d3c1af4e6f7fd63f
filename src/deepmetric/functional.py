"""Each loss's formula, written once: pure functions on tensors, as :mod:`torch.nn.functional`
is to :mod:`torch.nn`.

The loss classes of :mod:`deepmetric.losses` hold options, a distance and a reducer, and make
one call into the pair engine (:mod:`deepmetric.pairwise`) with one of these functions; the
engine decides how the matrix is computed (a block of rows at a time for the distances it
fuses, whole through the distance's autograd otherwise) and how the gradient reaches the
embeddings. Nothing here knows about blocks, reducers or fast paths.

**Term rules** (:func:`triplet_margin`, :func:`contrastive_pairs`) are elementwise: the losses
of tuples from their distances, and the losses' derivative with respect to those distances,
which the engine turns into the embeddings' gradient (through the distances' autograd for
listed tuples, scattered onto the matrix or its blocks when they are streamed).

**Autograd formulas** are differentiated by autograd: the positive-pair rules
(:func:`lifted_structure_pairs`, :func:`ntxent_pairs`: each positive pair's loss from the whole
matrix and the negatives of its rows, see :func:`deepmetric.pairwise.positive_pair_losses`) and
the margin loss's halves (:func:`margin_halves`, see
:func:`deepmetric.pairwise.separable_triplet_losses`).

**Row rules** (``*_rows``, :func:`npairs_rows` among them) are the per-query losses: a
function of one :class:`RowBlock` (rows of the ``(B, R)`` matrix with their positive and
negative pairs) that returns the ``(c,)`` losses of its rows and, in closed form, their
``(c, R)`` gradient with respect to the block's matrix. A row's loss depends on that row only.
Bind the options and hand the rule to :func:`deepmetric.pairwise.row_losses`::

    losses = row_losses(batch, distance, lambda block: circle_rows(block, 0.25, 256), pairs)

**Classification formulas** (:func:`normalized_softmax_losses`, :func:`margin_softmax_losses`
with its target margins, :func:`proxy_nca_losses`, :func:`proxy_anchor_losses`) take the
``(B, C)`` matrix between the embeddings and one learnt vector per class (classifier weights or
proxies) and are differentiated by autograd.

``distance`` arguments only say which way the matrix runs: for a distance (smaller is closer)
the formulas are written as stated; for a similarity (``distance.is_inverted``) every margin is
measured the other way round (:meth:`~deepmetric.distances.BaseDistance.margin`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .distances import BaseDistance
from .pairwise import RowBlock, masked_logsumexp, row_softmax_, sparse_softmax

__all__ = [
    "additive_angular_margin",
    "additive_cosine_margin",
    "circle_rows",
    "contrastive_pairs",
    "large_margin_target",
    "lifted_structure_pairs",
    "margin_softmax_losses",
    "margin_halves",
    "triplet_margin",
    "tuplet_margin_pairs",
    "generalized_lifted_structure_rows",
    "multi_similarity_rows",
    "nca_rows",
    "npairs_rows",
    "normalized_softmax_logits",
    "normalized_softmax_losses",
    "ntxent_pairs",
    "proxy_anchor_losses",
    "proxy_nca_losses",
    "ranked_list_rows",
    "soft_triple_class_similarities",
    "soft_triple_losses",
    "supervised_contrastive_rows",
    "weighted_cross_entropy",
]

# F.softplus (and PML's nn.Softplus) is the identity above this, with a slope of exactly 1.
_SOFTPLUS_THRESHOLD = 20.0
# PML adds this to the weight of every column of a row before summing the ranked list weights.
_WEIGHT_EPS = 1e-5


def circle_rows(block: RowBlock, m: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Circle loss of each query row (Sun, Cheng, Zhang, Zhang, Zheng, Wang & Wei, 2020).

    With similarities ``s``, ``O_p = 1 + m``, ``O_n = -m``, ``Δ_p = 1 - m``, ``Δ_n = m`` and the
    self-paced weights ``α_p = relu(O_p - s_p)``, ``α_n = relu(s_n - O_n)``, held constant (no
    gradient flows through them, as in the paper and PML)::

        z_i    = log Σ_p exp(-γ α_p (s_ip - Δ_p)) + log Σ_n exp(γ α_n (s_in - Δ_n))
        loss_i = softplus(z_i)

    and 0 for a query without a positive or without a negative. Gradient: with ``w`` the
    softmax weights of each log-sum-exp, ``sigmoid(z_i) · w · (-γ α_p)`` at a positive and
    ``sigmoid(z_i) · w · γ α_n`` at a negative; 0 elsewhere and in rows without both.

    Args:
        block: rows of a similarity matrix (``block.mat`` ``(c, R)``) and their pairs.
        m: the relaxation margin.
        gamma: the scale ``γ``.

    Returns:
        ``(c,)`` losses and their ``(c, R)`` gradient with respect to ``block.mat``.
    """
    sim, rows, cols = block.mat, block.pos_rows, block.pos_cols
    weight_n = (sim + m).clamp_min_(0)
    neg_exponent = (sim - m).mul_(weight_n).mul_(gamma)
    neg_lse, grad = row_softmax_(block.fill_non_negatives_(neg_exponent, -math.inf), with_one=False)
    pos_sim = sim[rows, cols]
    weight_p = ((1 + m) - pos_sim).clamp_min_(0)
    pos_lse, pos_weight = sparse_softmax(
        -gamma * weight_p * (pos_sim - (1 - m)), rows, len(sim), with_one=False
    )
    z = pos_lse + neg_lse  # -inf for a row without a positive or without a negative
    has_both = torch.isfinite(z)
    losses = torch.where(has_both, F.softplus(z), 0.0)
    slope = torch.where(z > _SOFTPLUS_THRESHOLD, 1.0, torch.sigmoid(z)) * has_both
    grad.mul_(weight_n.mul_(gamma * slope.unsqueeze(1)))
    grad[rows, cols] = pos_weight * (-gamma * weight_p * slope[rows])  # positives: were 0
    return losses, grad


def multi_similarity_rows(
    block: RowBlock, alpha: float, beta: float, base: float, distance: BaseDistance
) -> tuple[Tensor, Tensor]:
    """Multi-similarity loss of each query row (Wang, Han, Huang, Dong & Scott, 2019).

    For query ``i`` with similarities ``s`` to its positives ``P_i`` and negatives ``N_i``::

        loss_i = 1/α · log(1 + Σ_{p ∈ P_i} exp(-α (s_ip - base)))
               + 1/β · log(1 + Σ_{n ∈ N_i} exp( β (s_in - base)))

    (for a distance the signs flip: positives are penalised above ``base``, negatives below); an
    empty set contributes ``log 1 = 0``. Gradient: with ``w`` the softmax weights of each
    log-sum-exp (the ``1`` included), ``-w_ij`` at a positive and ``+w_ij`` at a negative (signs
    flipped for a distance).

    Args:
        block: rows of the matrix (``block.mat`` ``(c, R)``) and their pairs.
        alpha, beta: the positive and negative temperatures.
        base: the similarity both sets are measured from.
        distance: the distance that produced the matrix (its direction).

    Returns:
        ``(c,)`` losses and their ``(c, R)`` gradient with respect to ``block.mat``.
    """
    mat, rows, cols = block.mat, block.pos_rows, block.pos_cols
    sign = 1.0 if distance.is_inverted else -1.0
    neg_exponent = block.fill_non_negatives_(distance.margin(base, mat).mul_(beta), -math.inf)
    neg_lse, grad = row_softmax_(neg_exponent, with_one=True)
    grad.mul_(sign)
    pos_exponent = distance.margin(mat[rows, cols], base) * alpha
    pos_lse, pos_weight = sparse_softmax(pos_exponent, rows, len(mat), with_one=True)
    grad[rows, cols] = -sign * pos_weight  # positives are not negatives: these entries were 0
    return pos_lse / alpha + neg_lse / beta, grad


def _softmax_over_pairs(block: RowBlock, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The logits ``z = scale · mat`` of a block at its ``(P,)`` positive pairs, and the row-wise
    log-sum-exp of ``z`` over each row's positives and negatives with its ``(c, R)`` softmax
    weights (0 at every other entry: the diagonal, a query's own copy, unpaired entries)."""
    rows, cols = block.pos_rows, block.pos_cols
    logits = block.mat * scale
    pos_logits = logits[rows, cols]
    block.fill_non_negatives_(logits, -math.inf)[rows, cols] = pos_logits
    lse, weights = row_softmax_(logits, with_one=False)
    return pos_logits, lse, weights


def supervised_contrastive_rows(
    block: RowBlock, temperature: float, distance: BaseDistance
) -> tuple[Tensor, Tensor]:
    """Supervised contrastive loss of each query row (Khosla, Teterwak, Wang, Sarna, Tian,
    Isola, Maschinot, Liu & Krishnan, 2020): the mean over its positives of the cross-entropy of
    picking that positive among the row's positives and negatives::

        loss_i = log Σ_{j ∈ P_i ∪ N_i} exp(z_ij) - 1/|P_i| Σ_{p ∈ P_i} z_ip,   z = s / τ

    with ``s`` the similarities (``-d`` for a distance); 0 for a row with no positive. Gradient
    with respect to ``z``: the softmax ``w`` of the row over ``P_i ∪ N_i`` less ``1/|P_i|`` at
    each positive (0 in a row with no positive).

    Args:
        block: rows of the matrix (``block.mat`` ``(c, R)``) and their pairs.
        temperature: ``τ``.
        distance: the distance that produced the matrix (its direction).

    Returns:
        ``(c,)`` losses and their ``(c, R)`` gradient with respect to ``block.mat``.
    """
    mat, rows, cols = block.mat, block.pos_rows, block.pos_cols
    scale = (1.0 if distance.is_inverted else -1.0) / temperature  # d z / d mat
    pos_logits, lse, grad = _softmax_over_pairs(block, scale)
    n_pos = torch.bincount(rows, minlength=len(mat)).to(mat.dtype)
    has_pos = n_pos > 0
    pos_mean = torch.zeros_like(n_pos).index_add_(0, rows, pos_logits) / n_pos.clamp_min(1)
    losses = torch.where(has_pos, lse - pos_mean, 0.0)
    grad[rows, cols] -= 1 / n_pos[rows]
    grad.mul_((has_pos.to(mat.dtype) * scale).unsqueeze(1))  # (a bool times a float is float32)
    return losses, grad


def generalized_lifted_structure_rows(
    block: RowBlock, pos_margin: float, neg_margin: float, distance: BaseDistance
) -> tuple[Tensor, Tensor]:
    """Generalised lifted structure loss of each query row (Hermans, Beyer & Leibe, 2017,
    after Oh Song, Xiang, Jegelka & Savarese, 2016)::

        loss_i = relu(log Σ_{j pos} exp(d_ij - m+) + log Σ_{k neg} exp(m- - d_ik))

    where each log-sum-exp is 0 when its set is empty, as in PML (margins the other way round
    for a similarity). Gradient: where a row's loss is positive, the softmax weight ``w`` of
    each entry in its log-sum-exp, ``+w`` at a positive and ``-w`` at a negative distance
    (signs flipped for a similarity); 0 elsewhere.

    Args:
        block: rows of the matrix (``block.mat`` ``(c, R)``) and their pairs.
        pos_margin, neg_margin: the margins ``m+`` and ``m-``.
        distance: the distance that produced the matrix (its direction).

    Returns:
        ``(c,)`` losses and their ``(c, R)`` gradient with respect to ``block.mat``.
    """
    mat, rows, cols = block.mat, block.pos_rows, block.pos_cols
    sign = 1.0 if distance.is_inverted else -1.0  # d(negative exponent) / d mat
    neg_exponent = block.fill_non_negatives_(distance.margin(neg_margin, mat), -math.inf)
    neg_lse, grad = row_softmax_(neg_exponent, with_one=False)
    pos_exponent = distance.margin(mat[rows, cols], pos_margin)
    pos_lse, pos_weight = sparse_softmax(pos_exponent, rows, len(mat), with_one=False)
    # an empty set contributes 0, as in PML
    total = pos_lse.nan_to_num(neginf=0.0) + neg_lse.nan_to_num(neginf=0.0)
    losses = F.relu(total)
    active = (total > 0).to(mat.dtype)
    grad.mul_((sign * active).unsqueeze(1))
    grad[rows, cols] = -sign * active[rows] * pos_weight  # positives: these entries were 0
    return losses, grad


def ranked_list_rows(
    block: RowBlock, margin: float, alpha: float, imbalance: float, Tp: float, Tn: float
) -> tuple[Tensor, Tensor]:
    """Ranked list loss of each query row (Wang, Hua, Kodirov, Hu, Garnier & Robertson, 2019).

    A positive ``d_ip`` is active when ``d_ip > α - margin`` and a negative ``d_in`` when
    ``d_in < α``; as in PML only entries with ``d > 0`` count (the matrix is read as raw
    numbers, also for a similarity). With violations ``v_p = d_ip - (α - margin)``,
    ``v_n = α - d_in`` and weights ``w = exp(T v)`` (``T = Tp`` or ``Tn``; differentiated
    through, as in PML)::

        L_P = Σ_active w_p v_p / (Σ_active w_p + R·1e-5)
        L_N = Σ_active w_n v_n / (Σ_active w_n + R·1e-5)
        loss_i = (1 - imbalance) L_P + imbalance L_N

    Gradient: for one part, with ``Z`` its denominator, ``∂L/∂v_j = w_j (T v_j + 1 - T L) / Z``
    at the active entries, and ``∂v/∂d`` is ``+1`` for a positive, ``-1`` for a negative.

    Args:
        block: rows of the matrix (``block.mat`` ``(c, R)``) and their pairs.
        margin, alpha, imbalance, Tp, Tn: as in :class:`~deepmetric.losses.RankedListLoss`.

    Returns:
        ``(c,)`` losses and their ``(c, R)`` gradient with respect to ``block.mat``.
    """
    mat, rows, cols = block.mat, block.pos_rows, block.pos_cols
    eps_sum = _WEIGHT_EPS * mat.shape[1]
    # negatives, dense: active (1.0) where 0 < d < alpha; v = alpha - d there, 0 elsewhere
    neg_violation = alpha - mat
    neg_active = neg_violation.sign().clamp_min_(0).mul_(mat.sign().clamp_min_(0))
    block.fill_non_negatives_(neg_active, 0.0)
    neg_violation.mul_(neg_active)
    neg_weight = torch.mul(neg_violation, Tn).exp_().mul_(neg_active)
    neg_norm = neg_weight.sum(dim=1) + eps_sum
    loss_n = (neg_weight * neg_violation).sum(dim=1) / neg_norm
    # ∂L_N/∂d = -w (Tn v + 1 - Tn L_N) / Z, built in the buffers of v and w
    factor = neg_violation.mul_(Tn).add_((1 - Tn * loss_n).unsqueeze(1))
    grad = neg_weight.mul_(factor).mul_((-imbalance / neg_norm).unsqueeze(1))
    # positives, a list: v = d - (alpha - margin) where active
    positive_bound = alpha - margin
    pos_dist = mat[rows, cols]
    pos_active = (pos_dist > positive_bound) & (pos_dist > 0)
    pos_violation = torch.where(pos_active, pos_dist - positive_bound, 0.0)
    pos_weight = torch.exp(Tp * pos_violation) * pos_active
    pos_norm = torch.zeros_like(loss_n).index_add_(0, rows, pos_weight) + eps_sum
    loss_p = torch.zeros_like(loss_n).index_add_(0, rows, pos_weight * pos_violation) / pos_norm
    pos_factor = Tp * pos_violation + (1 - Tp * loss_p)[rows]
    grad[rows, cols] = (1 - imbalance) * pos_weight * pos_factor / pos_norm[rows]
    return (1 - imbalance) * loss_p + imbalance * loss_n, grad


def triplet_margin(
    ap: Tensor, an: Tensor, margin: float, smooth_loss: bool, distance: BaseDistance
) -> tuple[Tensor, Tensor]:
    """Triplet margin losses (Schroff, Kalenichenko & Philbin, FaceNet, 2015)::

        loss = relu(d(a, p) - d(a, n) + margin)        (softplus when ``smooth_loss``)

    (for a similarity: ``relu(s(a, n) - s(a, p) + margin)``). Gradient with respect to
    ``d(a, p)``: relu's step (1 where the loss is positive) or softplus's ``sigmoid``, with the
    sign of the direction; with respect to ``d(a, n)`` its negative.

    Args:
        ap: anchor-positive distances, any shape.
        an: anchor-negative distances, broadcasting against ``ap``.
        margin: the margin.
        smooth_loss: softplus instead of relu.
        distance: the distance that produced them (its direction).

    Returns:
        the losses and ``∂loss/∂ap`` (``∂loss/∂an = -∂loss/∂ap``), both of the broadcast shape.
    """
    violation = distance.margin(ap, an).add_(margin)  # (a new tensor: the slope is made in it)
    if smooth_loss:
        # (PyTorch's softplus backward rounds its slope to 1 above 20: 2e-9 away in float64)
        losses = F.softplus(violation)
        slope = violation.sigmoid_()
    else:
        losses = F.relu(violation)
        slope = violation.gt_(0)  # 1.0 where the loss is positive, else 0.0
    # ∂violation/∂ap: +1 for a distance, -1 for a similarity
    return losses, slope.neg_() if distance.is_inverted else slope


def contrastive_pairs(
    dists: Tensor, margin: float, positive: bool, distance: BaseDistance
) -> tuple[Tensor, Tensor]:
    """Contrastive losses of pairs (Hadsell, Chopra & LeCun, 2006)::

        positive pair: relu(d - m+)        negative pair: relu(m- - d)

    (for a similarity: ``relu(m+ - s)`` and ``relu(s - m-)``). A negative pair beyond its
    margin has a zero loss and a zero gradient, which the engine relies on to skip them.
    Gradient with respect to ``d``: 1 where the loss is positive, with the sign of the
    direction.

    Args:
        dists: the pairs' distances (or similarities), any shape.
        margin: ``m+`` for positive pairs, ``m-`` for negative pairs.
        positive: whether the pairs are positive.
        distance: the distance that produced them (its direction).

    Returns:
        the losses and ``∂loss/∂d``, both shaped like ``dists``.
    """
    violation = distance.margin(dists, margin) if positive else distance.margin(margin, dists)
    losses = F.relu(violation)
    slope = violation.gt_(0)  # (in the new tensor) 1.0 where the loss is positive, else 0.0
    # ∂violation/∂d: +1 for a positive distance or a negative similarity, else -1
    return losses, slope if positive != distance.is_inverted else slope.neg_()


def margin_halves(
    ap: Tensor, an: Tensor, beta: Tensor, margin: float, distance: BaseDistance
) -> tuple[Tensor, Tensor]:
    """The two halves of the margin loss (Wu, Manmatha, Smola & Krähenbühl, 2017), whose sum
    is a triplet's loss::

        positive half: relu(d(a, p) - β + margin)      negative half: relu(β - d(a, n) + margin)

    (the other way round for a similarity). Differentiated by autograd (with respect to the
    distances and to a learnt ``β``).

    Args:
        ap: anchor-positive distances.
        an: anchor-negative distances, broadcasting against ``ap``.
        beta: each anchor's boundary, broadcasting against both: per triplet, or a ``(B, 1)``
            column against the whole ``(B, R)`` matrix.
        margin: the slack on either side of ``β``.
        distance: the distance that produced them (its direction).

    Returns:
        the positive and the negative halves.
    """
    pos = F.relu(distance.margin(ap, beta) + margin)
    neg = F.relu(distance.margin(beta, an) + margin)
    return pos, neg


def lifted_structure_pairs(
    mat: Tensor,
    anchors: Tensor,
    positives: Tensor,
    neg_weight: Tensor,
    pos_margin: float,
    neg_margin: float,
    distance: BaseDistance,
) -> Tensor:
    """Lifted structure loss of each positive pair (Oh Song, Xiang, Jegelka & Savarese, 2016).

    For a positive pair ``(i, j)``::

        loss = relu(log Σ_{(k, l) negative, k ∈ {i, j}} exp(m- - d(k, l)) + d(i, j) - m+)² / 2

    (margins measured the other way round for a similarity; the sum is 0 when the pair has no
    negative pair). As in PML, the negatives of ``j`` are the negative pairs whose *query* index
    is ``j``, even when ``j`` indexes a separate reference set.

    The log-sum-exp over each query row's negatives is computed once per row, and each
    positive pair combines the two rows it needs (PML compares every positive pair with every
    negative pair: a ``P × N`` matrix). Differentiated by autograd.

    Args:
        mat: ``(B, R)`` distance matrix.
        anchors, positives: ``(P,)`` indices of the positive pairs into its rows and columns.
        neg_weight: ``(B, R)`` boolean mask or count of the negative pairs.
        pos_margin, neg_margin: the margins ``m+`` and ``m-``.
        distance: the distance that produced ``mat`` (for the direction of the margins).

    Returns:
        ``(P,)`` losses.
    """
    n_query = mat.shape[0]
    # log Σ exp(remaining negative margin) over each query row's negative pairs: (B,)
    row_lse, row_has_neg = masked_logsumexp(distance.margin(neg_margin, mat), neg_weight)
    # each positive pair uses the rows of its two indices; a row counts once if both are equal
    second_is_row = (positives < n_query) & (positives != anchors)
    second_row = positives.clamp_max(n_query - 1)
    both_rows = torch.stack([row_lse[anchors], row_lse[second_row]], dim=1)
    keep = torch.stack([row_has_neg[anchors], row_has_neg[second_row] & second_is_row], dim=1)
    neg_term, _ = masked_logsumexp(both_rows, keep, dim=1, empty_value=0.0)
    remaining_pos_margin = distance.margin(mat[anchors, positives], pos_margin)
    # each positive pair appears twice, (i, j) and (j, i): hence the 1/2
    return F.relu(neg_term + remaining_pos_margin) ** 2 / 2


def ntxent_pairs(
    mat: Tensor,
    anchors: Tensor,
    positives: Tensor,
    neg_weight: Tensor,
    temperature: float,
    distance: BaseDistance,
) -> Tensor:
    """NT-Xent (InfoNCE) loss of each positive pair (Chen, Kornblith, Norouzi & Hinton, 2020;
    van den Oord, Li & Vinyals, 2018). Differentiated by autograd.

    With logits ``s = sim / temperature`` (``sim = -distance`` for a distance), the loss of the
    positive pair ``(i, j)`` is the cross-entropy of picking ``j`` among ``j`` and the negatives
    of ``i``::

        loss = -log(exp(s_ij) / (exp(s_ij) + Σ_{k neg of i} exp(s_ik)) + tiny)

    where ``tiny`` is the dtype's smallest normal number, as in PML (it caps the loss).

    Args:
        mat: ``(B, R)`` distance or similarity matrix.
        anchors, positives: ``(P,)`` indices of the positive pairs.
        neg_weight: ``(B, R)`` boolean mask or count of the negative pairs.
        temperature: the softmax temperature.
        distance: the distance that produced ``mat``.

    Returns:
        ``(P,)`` losses.
    """
    logits = (mat if distance.is_inverted else -mat) / temperature
    # log Σ exp over each anchor row's negatives, computed once per row: (B,)
    neg_lse, _ = masked_logsumexp(logits, neg_weight, empty_value=float("-inf"))
    pos_logits = logits[anchors, positives]
    log_denominator = torch.logaddexp(pos_logits, neg_lse[anchors])
    tiny = torch.finfo(mat.dtype).tiny
    return -torch.log(torch.exp(pos_logits - log_denominator) + tiny)


def tuplet_margin_pairs(
    mat: Tensor,
    anchors: Tensor,
    positives: Tensor,
    neg_weight: Tensor,
    margin: float,
    scale: float,
) -> Tensor:
    """Tuplet margin loss of each positive pair (Yu & Tao, 2019), on a cosine matrix::

        loss = log(1 + Σ_{n negative of i} exp(s · (cos θ_in - cos(θ_ij - m))))

    for the positive pair ``(i, j)``, with ``θ`` the angles, ``m`` the margin in radians and
    ``s`` the scale; 0 when ``i`` has no negative pair. The log-sum-exp over each row's
    negatives is computed once per row (PML forms a positive-by-negative matrix). The cosines
    are clamped to ``[-1, 1]`` before ``acos``, whose derivative is infinite beyond.
    Differentiated by autograd.

    Args:
        mat: ``(B, R)`` cosine similarities.
        anchors, positives: ``(P,)`` indices of the positive pairs into its rows and columns.
        neg_weight: ``(B, R)`` boolean mask or count of the negative pairs.
        margin: ``m``, radians.
        scale: ``s``.

    Returns:
        ``(P,)`` losses.
    """
    neg_lse, _ = masked_logsumexp(scale * mat, neg_weight, dim=1, empty_value=-math.inf)
    pos_angle = torch.acos(mat[anchors, positives].clamp(-1.0, 1.0))
    exponent = neg_lse[anchors] - scale * torch.cos(pos_angle - margin)
    return torch.logaddexp(torch.zeros_like(exponent), exponent)


def npairs_rows(block: RowBlock, distance: BaseDistance) -> tuple[Tensor, Tensor]:
    """N-pair loss of each row (Sohn, 2016): the cross-entropy of picking the row's positive
    among all the entries of its row::

        loss_i = log Σ_j exp(s_ij) - s_ip

    with logits ``s`` the similarities (``-d`` for a distance). For N-pairs the matrix is the
    ``(N, N)`` anchors against the positives of ``N`` pairs, pair ``i``'s positive being row
    ``i``'s one positive entry and the other pairs' positives its negatives. Gradient with
    respect to the logits: the softmax ``w`` of the row less 1 at the positive (``-`` that for
    a distance).

    Args:
        block: rows of the matrix (``block.mat`` ``(c, R)``) with exactly one positive entry
            each, listed in row order (``block.pos_rows`` is ``0, 1, ..., c - 1``).
        distance: the distance that produced the matrix (its direction).

    Returns:
        ``(c,)`` losses and their ``(c, R)`` gradient with respect to ``block.mat``.
    """
    mat, positive = block.mat, block.pos_cols.unsqueeze(1)
    log_softmax = torch.log_softmax(mat if distance.is_inverted else -mat, dim=1)
    losses = log_softmax.gather(1, positive).squeeze(1).neg_()
    grad = log_softmax.exp_()  # (in the log-softmax's memory)
    grad.scatter_add_(1, positive, grad.new_full(positive.shape, -1.0))
    return losses, grad if distance.is_inverted else grad.neg_()


def nca_rows(block: RowBlock, scale: float, distance: BaseDistance) -> tuple[Tensor, Tensor]:
    """Neighbourhood components analysis loss of each query row (Goldberger, Roweis, Hinton &
    Salakhutdinov, 2005): minus the log-probability that a softmax over the row picks a sample
    of the query's own label::

        loss_i = log Σ_{j ∈ P_i ∪ N_i} exp(z_ij) - log Σ_{p ∈ P_i} exp(z_ip),   z = scale · s

    with ``s`` the similarities (``-d`` for a distance; PML's default is the squared Euclidean
    distance) and ``P_i``, ``N_i`` the row's same-label and other-label entries (the query
    itself and its own copy are in neither); 0 for a row with no positive. Gradient with
    respect to ``z``: the softmax of the row over ``P_i ∪ N_i`` less the softmax over ``P_i``
    at the positives (0 in a row with no positive).

    Args:
        block: rows of the matrix (``block.mat`` ``(c, R)``) and their pairs.
        scale: the softmax scale.
        distance: the distance that produced the matrix (its direction).

    Returns:
        ``(c,)`` losses and their ``(c, R)`` gradient with respect to ``block.mat``.
    """
    mat, rows, cols = block.mat, block.pos_rows, block.pos_cols
    dz_dmat = scale if distance.is_inverted else -scale
    pos_logits, all_lse, grad = _softmax_over_pairs(block, dz_dmat)
    pos_lse, pos_weight = sparse_softmax(pos_logits, rows, len(mat), with_one=False)
    grad[rows, cols] -= pos_weight
    has_pos = torch.isfinite(pos_lse)
    losses = torch.where(has_pos, all_lse - pos_lse, 0.0)
    return losses, grad.mul_((has_pos.to(mat.dtype) * dz_dmat).unsqueeze(1))


# -- classification formulas: one vector per class (classifier weights or proxies) ---------------
#
# These take the ``(B, C)`` matrix between the embeddings and the class vectors, computed by the
# loss (in full precision); the per-sample losses are then weighted by the miner's weights ``w``
# (all ones without a miner).


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """``(B,)`` per-sample losses ``-log softmax(logits)[i, y_i] · w_i`` of ``(B, C)`` logits
    against ``(B,)`` labels in ``[0, C)``, with ``(B,)`` weights ``w``."""
    return F.cross_entropy(logits, labels, reduction="none") * weights


def normalized_softmax_logits(sims: Tensor, temperature: float, distance: BaseDistance) -> Tensor:
    """NormFace's logits (Wang, Xiang, Cheng & Yuille, 2017): ``s_ij / T`` for the ``(B, C)``
    similarities to the L2-normalised class weights, ``-d_ij / T`` for a distance."""
    logits = sims / temperature
    return logits if distance.is_inverted else -logits


def normalized_softmax_losses(
    sims: Tensor, labels: Tensor, temperature: float, distance: BaseDistance, weights: Tensor
) -> Tensor:
    """NormFace loss of each sample (Wang, Xiang, Cheng & Yuille, 2017)::

        loss_i = w_i · (log Σ_j exp(s_ij / T) - s_iy_i / T)

    with ``s`` the ``(B, C)`` similarities of the embeddings to the L2-normalised class weights
    (``-d`` for a distance, :func:`normalized_softmax_logits`), ``(B,)`` labels ``y`` and
    weights ``w``. Returns the ``(B,)`` losses.
    """
    return weighted_cross_entropy(
        normalized_softmax_logits(sims, temperature, distance), labels, weights
    )


def target_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """``(B,)``: each sample's entry of the ``(B, C)`` logits for its own class."""
    return logits.gather(1, labels.unsqueeze(1)).squeeze(1)


def with_target_logits(logits: Tensor, labels: Tensor, target: Tensor) -> Tensor:
    """A copy of the ``(B, C)`` logits with each sample's own-class entry replaced by the
    ``(B,)`` ``target``."""
    return logits.scatter(1, labels.unsqueeze(1), target.unsqueeze(1))


def margin_softmax_losses(
    cosine: Tensor,
    labels: Tensor,
    target_margin: Callable[[Tensor], Tensor],
    scale: Callable[[Tensor], Tensor],
    weights: Tensor,
) -> Tensor:
    """Softmax with a margin on the target class, the family of L-softmax (Liu, Wen, Yu & Yang,
    2016), SphereFace (Liu et al., 2017), CosFace (Wang et al., 2018) and ArcFace (Deng, Guo,
    Xue & Zafeiriou, 2019)::

        z_ij   = scale(cos θ_ij)          for j ≠ y_i
        z_iy_i = scale(ψ(cos θ_iy_i))     the target: penalised by the margin ψ
        loss_i = w_i · (log Σ_j exp(z_ij) - z_iy_i)

    Args:
        cosine: ``(B, C)`` cosines between the embeddings and the class weights.
        labels: ``(B,)`` classes in ``[0, C)``.
        target_margin: ``ψ``, ``(B,)`` target cosines -> ``(B,)`` penalised target logits
            (:func:`large_margin_target`, :func:`additive_cosine_margin`,
            :func:`additive_angular_margin`).
        scale: ``(B, C)`` logits -> ``(B, C)`` scaled logits (a constant for CosFace and
            ArcFace, ``|x_i|`` for SphereFace, ``|x_i| |W_j|`` for L-softmax, each times the
            loss's ``scale``).
        weights: ``(B,)`` per-sample weights.

    Returns:
        ``(B,)`` losses.
    """
    target = target_margin(target_logits(cosine, labels))
    logits = scale(with_target_logits(cosine, labels, target))
    return weighted_cross_entropy(logits, labels, weights)


def cos_of_multiple_angle(cosine: Tensor, m: int) -> Tensor:
    """``cos(m θ)`` from ``cos θ``: the Chebyshev polynomial ``T_m``, by its recurrence
    ``T_{n+1} = 2 c T_n - T_{n-1}`` (the same polynomial as L-softmax's binomial expansion)."""
    previous, current = torch.ones_like(cosine), cosine
    for _ in range(m - 1):
        previous, current = current, 2 * cosine * current - previous
    return current if m >= 1 else previous


def large_margin_target(cos_target: Tensor, m: int) -> Tensor:
    """L-softmax's and SphereFace's target logit (Liu, Wen, Yu & Yang, 2016, eq. 6; Liu et al.,
    2017): ``ψ(θ) = (-1)^k cos(m θ) - 2k`` with ``k = floor(θ m / π)``, which decreases
    monotonically in ``θ``. ``(B,)`` target cosines -> ``(B,)`` logits; ``k`` carries no
    gradient."""
    with torch.no_grad():
        theta = torch.acos(cos_target.clamp(-1, 1))
        k = torch.floor(theta / (math.pi / m))
        sign = 1 - 2 * torch.remainder(k, 2)
    return sign * cos_of_multiple_angle(cos_target, m) - 2 * k


def additive_cosine_margin(cos_target: Tensor, margin: float) -> Tensor:
    """CosFace's target logit (Wang, Wang, Zhou, Ji, Gong, Zhou, Li & Liu, 2018):
    ``ψ(θ) = cos θ - m``. ``(B,)`` target cosines -> ``(B,)`` logits."""
    return cos_target - margin


def _safe_sin_from_cos(cosine: Tensor) -> Tensor:
    """``sin θ = sqrt(1 - cos² θ)`` for ``θ`` in ``[0, π]``, with a zero (not infinite) gradient
    where ``cos θ = ±1``."""
    squared = (1 - cosine) * (1 + cosine)
    at_pole = squared <= 0
    return torch.sqrt(squared.masked_fill(at_pole, 1.0)).masked_fill(at_pole, 0.0)


def additive_angular_margin(cos_target: Tensor, margin: float) -> Tensor:
    """ArcFace's target logit (Deng, Guo, Xue & Zafeiriou, 2019): ``cos(θ + m)`` while
    ``θ <= π - m``, else ``cos θ - m sin m`` (the insightface / PML rule that keeps the logit
    decreasing in ``θ``). ``(B,)`` target cosines -> ``(B,)`` logits; ``margin`` in radians.

    ``cos(θ + m)`` is expanded as ``cos θ cos m - sin θ sin m`` with a gradient-safe ``sin θ``
    instead of going through ``acos`` (whose derivative is infinite at ``θ = 0`` and ``θ = π``,
    PML issue 209): the value is the same, the gradient is finite everywhere, and at exactly
    ``θ = 0`` the gradient is that of ``cos θ cos m``. The branch is chosen exactly as PML does
    (``acos(cos θ) <= π - m``), without gradient.
    """
    cosine = cos_target.clamp(-1, 1)
    with torch.no_grad():
        use_arc = torch.acos(cosine) <= math.pi - margin
    cos_plus_margin = cosine * math.cos(margin) - _safe_sin_from_cos(cosine) * math.sin(margin)
    fallback = cosine - margin * math.sin(margin)
    return torch.where(use_arc, cos_plus_margin, fallback)


def soft_triple_class_similarities(sims: Tensor, centers_per_class: int, gamma: float) -> Tensor:
    """SoftTriple's similarity to each class (Qian, Shang, Sun, Hu, Li & Jin, 2019): the
    softmax-weighted mean of the similarities to the class's ``K`` centres::

        S_ic = Σ_k softmax_k(s_ick / γ) · s_ick

    ``(B, C·K)`` similarities to the centres, class ``c``'s in columns ``c·K .. c·K + K - 1``
    -> ``(B, C)``.
    """
    per_centre = sims.view(len(sims), sims.shape[1] // centers_per_class, centers_per_class)
    weight = torch.softmax(per_centre / gamma, dim=2)
    return (weight * per_centre).sum(dim=2)


def soft_triple_losses(
    class_sims: Tensor, labels: Tensor, la: float, margin: float, weights: Tensor
) -> Tensor:
    """SoftTriple loss of each sample (Qian, Shang, Sun, Hu, Li & Jin, 2019)::

        loss_i = w_i · cross_entropy(λ · (S_i - δ · onehot(y_i)), y_i)

    with ``S`` the ``(B, C)`` class similarities (:func:`soft_triple_class_similarities`),
    ``λ`` the scale ``la``, ``δ`` the margin and ``(B,)`` weights ``w``. Returns ``(B,)``.
    """
    margins = torch.zeros_like(class_sims)
    margins[torch.arange(len(labels), device=labels.device), labels] = margin
    return weighted_cross_entropy(la * (class_sims - margins), labels, weights)


def proxy_nca_losses(
    mat: Tensor, labels: Tensor, softmax_scale: float, distance: BaseDistance, weights: Tensor
) -> Tensor:
    """ProxyNCA loss of each sample (Movshovitz-Attias, Toshev, Leung, Ioffe & Singh, 2017)::

        loss_i = w_i · (log Σ_j exp(-τ d_ij) + τ d_iy_i)

    the negative log of the softmax probability of the sample's own proxy, with ``d`` the
    ``(B, C)`` distances to the proxies and ``τ`` the ``softmax_scale`` (logits ``+τ s`` for a
    similarity ``s``), ``(B,)`` labels ``y`` and weights ``w``. Returns the ``(B,)`` losses.
    """
    logits = mat * softmax_scale
    if not distance.is_inverted:
        logits = -logits
    return weighted_cross_entropy(logits, labels, weights)


def _log1p_sum_exp(x: Tensor, keep: Tensor) -> Tensor:
    """Column-wise ``log(1 + sum_{i: keep[i, j]} exp(x[i, j]))`` of a ``(B, C)`` matrix, stably
    (``0`` for a column with nothing kept)."""
    x = x.masked_fill(~keep, float("-inf"))
    one = x.new_zeros(1, x.shape[1])  # the "1 +": exp(0)
    return torch.logsumexp(torch.cat([x, one]), dim=0)


def proxy_anchor_losses(
    sim: Tensor,
    labels: Tensor,
    num_classes: int,
    margin: float,
    alpha: float,
    weights: Tensor,
    distance: BaseDistance,
) -> tuple[Tensor, Tensor]:
    """Proxy Anchor loss's terms of each proxy (Kim, Kim, Cho & Kwak, 2020)::

        pos_j = log(1 + Σ_{i: y_i = j} exp(α (m - s_ij) + w_i - 1))
        neg_j = log(1 + Σ_{i: y_i ≠ j} exp(α (s_ij + m) + w_i - 1))

    from the ``(B, C)`` similarities ``s`` of the samples to the proxies (the margins are
    measured the other way round for a distance), ``(B,)`` labels ``y`` in ``[0, C)`` and the
    ``(B,)`` miner weights ``w`` (1 without a miner, entering the exponent as in PML). The loss
    is the mean of ``pos`` over the proxies with a positive plus the mean of ``neg`` over all.

    Returns:
        the ``(C,)`` positive terms and the ``(C,)`` negative terms.
    """
    pos_mask = F.one_hot(labels, num_classes).bool()
    log_w = (weights - 1).unsqueeze(1)
    pos_exp = distance.margin(sim, margin)
    neg_exp = distance.margin(-margin, sim)
    pos = _log1p_sum_exp(alpha * pos_exp + log_w, pos_mask)
    neg = _log1p_sum_exp(alpha * neg_exp + log_w, ~pos_mask)
    return pos, neg
