"""Per-row losses over the matrix with the closed-form gradient a row rule states (one block of
rows at a time for the fused distances, the whole matrix for the others); and the
log-sum-exps the loss formulas are written with (with their gradient for the row rules, masked
and weighted for autograd)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..distances import BaseDistance
from .batch import Batch
from .blocks import (
    PairBlocks,
    RowBlock,
)
from .gradients import (
    embedding_grads,
    embedding_weight_,
    first_order_only,
)
from .matrix import (
    MatrixBlocks,
    MatrixKind,
    full_precision,
    fused_matrix_kind,
    normalized_inputs,
)

RowRule = Callable[[RowBlock], tuple[Tensor, Tensor]]


class _BlockwiseRowLosses(torch.autograd.Function):
    """``(B, D)`` queries and ``(R, D)`` references -> ``(B,)`` per-row losses of ``rule``; the
    forward pass keeps the ``(B, R)`` weight of :func:`embedding_weight_` for the backward pass
    (:func:`embedding_grads` with the incoming gradient as row scale)."""

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        ref: Tensor,
        pairs: PairBlocks,
        kind: MatrixKind,
        rule: RowRule,
        need_grad: bool,
    ) -> Tensor:
        losses = query.new_empty(len(query))
        weight = query.new_empty(len(query), len(ref)) if need_grad else None
        matrix = MatrixBlocks(kind, query, ref, pairs.same_source)
        for start, stop in matrix.bounds():
            mat = matrix.rows(start, stop)
            block_losses, grad_mat = rule(pairs.block(mat, start, stop))
            losses[start:stop] = block_losses
            if weight is not None:
                weight[start:stop] = embedding_weight_(kind, grad_mat, mat)
        ctx.kind, ctx.same_source = kind, pairs.same_source
        ctx.save_for_backward(query, ref, weight)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        first_order_only()
        query, ref, weight = ctx.saved_tensors
        with full_precision(query.device):
            grads = embedding_grads(
                ctx.kind, query, ref, weight, grad_losses, ctx.same_source, ctx.needs_input_grad[:2]
            )
        return *grads, None, None, None, None


class _DenseRowLosses(torch.autograd.Function):
    """The ``(B, R)`` matrix of any distance -> ``(B,)`` per-row losses of ``rule``, applied to
    the whole matrix at once (``block_of`` makes the :class:`RowBlock` of the matrix); the
    backward pass scales the ``(B, R)`` gradient the rule stated by the incoming gradient of
    each row. The matrix keeps its own autograd graph (the distance's), so the gradient reaches
    the embeddings through it."""

    @staticmethod
    def forward(
        ctx: Any, mat: Tensor, block_of: Callable[[Tensor], RowBlock], rule: RowRule
    ) -> Tensor:
        losses, grad_mat = rule(block_of(mat))
        ctx.save_for_backward(grad_mat if ctx.needs_input_grad[0] else None)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, None, None]:
        first_order_only()
        (grad_mat,) = ctx.saved_tensors
        return grad_mat * grad_losses.unsqueeze(1), None, None


def matrix_row_losses(mat: Tensor, pos_rows: Tensor, pos_cols: Tensor, rule: RowRule) -> Tensor:
    """Per-row losses ``(B,)`` of ``rule`` over a whole ``(B, R)`` matrix computed by the caller
    (through autograd), whose positive pairs are the listed ``(P,)`` entries (row-major) and
    whose negatives are all the others; with the gradient ``rule`` states, first order only."""
    with full_precision(mat.device):
        losses = _DenseRowLosses.apply(
            mat, lambda m: RowBlock(m, pos_rows, pos_cols, None, None), rule
        )
    assert isinstance(losses, Tensor)
    return losses


def row_losses(batch: Batch, distance: BaseDistance, rule: RowRule, pairs: PairBlocks) -> Tensor:
    """Per-query losses ``(B,)`` of ``rule`` over the ``distance`` matrix of ``batch``, with the
    gradient that ``rule`` states (one formula, whichever way the matrix is computed).

    ``rule`` receives a :class:`RowBlock` and returns the ``(c,)`` losses of its rows and their
    ``(c, R)`` gradient with respect to its ``mat`` (which it must not modify); a row's loss may
    depend on that row only. The row rules of :mod:`deepmetric.functional` are such rules.

    The engine picks how the matrix is computed:

    * a distance it fuses (:func:`fused_matrix_kind`): one block of rows at a time, never the
      whole ``(B, R)`` matrix with a graph, and the embeddings' gradient written in closed form
      (:func:`embedding_grads`);
    * any other distance: its whole matrix, through its own autograd, and the rule applied to it
      once.

    Both give first derivatives only (``create_graph=True`` raises in the backward pass).
    ``pairs`` naming a pair as both a positive and a negative is a ``ValueError``: a row rule
    reads each entry as one or the other.
    """
    if pairs.contradicting:
        raise ValueError(
            "indices_tuple names the same pair as both a positive and a negative (a pair is "
            "either, not both positive and negative): drop it from one of the two lists"
        )
    kind = fused_matrix_kind(distance)
    if kind is None:
        mat = distance(batch.embeddings, batch.ref_emb)
        with full_precision(mat.device):
            losses = _DenseRowLosses.apply(mat, lambda m: pairs.block(m, 0, len(m)), rule)
    else:
        query, ref = normalized_inputs(distance, batch)
        need_grad = torch.is_grad_enabled() and (query.requires_grad or ref.requires_grad)
        with full_precision(query.device):
            losses = _BlockwiseRowLosses.apply(query, ref, pairs, kind, rule, need_grad)
    assert isinstance(losses, Tensor)
    return losses


def row_softmax_(x: Tensor, with_one: bool) -> tuple[Tensor, Tensor]:
    """Row-wise ``log Σ_j exp(x_j)`` and the softmax weights behind it (its gradient),
    overwriting ``x`` with the weights; entries of ``x`` that are ``-inf`` are left out.

    With ``with_one`` a constant ``exp(0) = 1`` joins every sum (``log(1 + Σ exp(x_j))``, 0 for
    an empty row); without, an empty row gives ``-inf``. The weights ``exp(x_j) / sum`` are 0 at
    the left-out entries and in empty rows.

    Shapes: ``x`` ``(c, R)`` -> ``(c,)`` log-sum-exps, ``(c, R)`` weights (``x``).
    """
    if x.shape[1] == 0:
        shift = x.new_full((len(x), 1), float("-inf"))
    else:
        shift = x.amax(dim=1, keepdim=True)
    shift = shift.clamp_min_(0) if with_one else shift.nan_to_num_(neginf=0.0)
    x.sub_(shift).exp_()
    total = x.sum(dim=1, keepdim=True)
    if with_one:
        total += torch.exp(-shift)
    lse = (total.log() + shift).squeeze(1)
    x.div_(total.clamp_min_(torch.finfo(x.dtype).tiny))
    return lse, x


def sparse_softmax(x: Tensor, rows: Tensor, n_rows: int, with_one: bool) -> tuple[Tensor, Tensor]:
    """:func:`row_softmax_` for entries given as a list: ``x[k]`` sits in row ``rows[k]``.

    Returns the ``(n_rows,)`` log-sum-exps (``log(1 + Σ exp)`` with ``with_one``, else ``-inf``
    for an empty row) and the ``(n,)`` softmax weights of the entries. The work is proportional
    to the number of entries, not to the width of the matrix.
    """
    shift = x.new_full((n_rows,), float("-inf"))
    shift.scatter_reduce_(0, rows, x, reduce="amax")
    shift = shift.clamp_min_(0) if with_one else shift.nan_to_num_(neginf=0.0)
    exps = torch.exp(x - shift[rows])
    total = torch.zeros_like(shift).index_add_(0, rows, exps)
    if with_one:
        total += torch.exp(-shift)
    lse = total.log() + shift
    return lse, exps / total[rows]


def masked_logsumexp(
    x: Tensor, weight: Tensor, dim: int = -1, empty_value: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``log Σ_j w_j exp(x_j)`` along ``dim`` over the entries with ``w_j > 0``.

    Args:
        x: values, any shape.
        weight: same shape; a boolean mask (weight 1 where True) or non-negative counts.
        dim: the dimension to reduce.
        empty_value: the result where no entry is selected (e.g. ``0`` or ``-inf``).

    Returns:
        ``(value, nonempty)``: the reduced values and a boolean tensor, True where at least one
        entry was selected. Gradients are finite everywhere.
    """
    keep = weight if weight.dtype == torch.bool else weight > 0
    if weight.dtype != torch.bool:
        # w·exp(x) = exp(x + log w); unselected entries become -inf below
        x = x + weight.clamp_min(1).log().to(x.dtype)
    nonempty = keep.any(dim=dim)
    z = x.masked_fill(~keep, float("-inf"))
    # an empty row is filled with finite dummies so that logsumexp's backward stays finite; its
    # result is replaced by empty_value below (and passes no gradient back to x)
    z = z.masked_fill(~nonempty.unsqueeze(dim), 0.0)
    value = torch.logsumexp(z, dim=dim).masked_fill(~nonempty, empty_value)
    return value, nonempty
