"""The embeddings' gradients of a sum weighted over the matrix's entries, for the Euclidean
and inner-product kinds: dense (a whole weight matrix), by blocks of rows, and sparse (a list
of entries). Hand-written backward passes give first derivatives only."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .matrix import (
    MatrixKind,
    row_blocks,
)


def first_order_only() -> None:
    """Raise ``RuntimeError`` inside a hand-written backward pass that is asked to build a graph
    (``create_graph=True``, for a second derivative): its gradient is computed from values saved
    without one, so a second derivative through it would be silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "deepmetric's closed-form gradients (the per-row pair losses, and the fast paths "
            "of the other matrix-based pair losses) give first derivatives only "
            "(create_graph=True is not supported)"
        )


def embedding_weight_(kind: MatrixKind, grad_mat: Tensor, mat: Tensor) -> Tensor:
    """Turn ``d loss / d mat`` into the weight ``w`` the embeddings' gradient is made of (see
    :class:`_BlockwiseRowLosses`), in place: ``g / d`` for a distance ``d`` (0 where ``d = 0``:
    the gradient of a zero distance is zero), ``2 g`` for a squared distance, ``g`` for an inner
    product."""
    if kind is MatrixKind.EUCLIDEAN:
        # g / 0 is ±inf or NaN: exactly the entries to zero (g is finite, d > 0 elsewhere)
        return grad_mat.div_(mat).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if kind is MatrixKind.SQUARED_EUCLIDEAN:
        return grad_mat.mul_(2.0)
    return grad_mat


def embedding_grads(
    kind: MatrixKind,
    query: Tensor,
    ref: Tensor,
    weight: Tensor,
    row_scale: Tensor,
    same_source: bool,
    need: tuple[bool, bool],
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of ``Σ_ij v_ij m_ij`` with respect to the queries and the references, where
    ``m`` is the matrix of ``kind`` and ``v_ij = row_scale_i w_ij`` (``w`` from
    :func:`embedding_weight_`):

    * Euclidean kinds: ``∂/∂q_i = Σ_j v_ij (q_i - r_j)``, ``∂/∂r_j = Σ_i v_ij (r_j - q_i)``;
    * inner product: ``∂/∂q_i = Σ_j v_ij r_j``, ``∂/∂r_j = Σ_i v_ij q_i``.

    When the references are the queries (``same_source``) both roles are one gradient, returned
    first: one matrix product with ``s = v + vᵀ`` instead of one per role. Each block of rows is
    added by :func:`add_block_embedding_grads_`, where the formulas are written.

    Shapes: ``query`` ``(B, D)``, ``ref`` ``(R, D)``, ``weight`` ``(B, R)``, ``row_scale``
    ``(B,)``; ``need`` says which gradients to compute.
    """
    scale = row_scale.unsqueeze(1)
    if same_source:
        grad = torch.zeros_like(query)
        for start, stop in row_blocks(len(query), len(ref), query.device):
            s = weight[start:stop] * scale[start:stop]
            s += (weight[:, start:stop] * scale).t()
            add_block_embedding_grads_(kind, query, ref, start, s, grad, None)
        return grad, None
    grad_query = torch.zeros_like(query) if need[0] else None
    grad_ref = torch.zeros_like(ref) if need[1] else None
    for start, stop in row_blocks(len(query), len(ref), query.device):
        v = weight[start:stop] * scale[start:stop]
        add_block_embedding_grads_(kind, query, ref, start, v, grad_query, grad_ref)
    return grad_query, grad_ref


def add_block_embedding_grads_(
    kind: MatrixKind,
    query: Tensor,
    ref: Tensor,
    start: int,
    weight: Tensor,
    grad_query: Tensor | None,
    grad_ref: Tensor | None,
    symmetric: bool = False,
) -> None:
    """Add the gradient of ``Σ_ij w_ij m_ij`` over the rows ``start:start + c`` of the matrix,
    ``w`` being their ``(c, R)`` weight (:func:`embedding_weight_`), with the formulas of
    :func:`embedding_grads`. When the references are the queries, pass the one gradient as both
    ``grad_query`` and ``grad_ref``; if moreover the whole weight matrix is symmetric
    (``symmetric``), both roles of these rows are added to ``grad_query`` at once, with one
    matrix product: ``2 Σ_j w_ij (x_i - x_j)`` (or ``2 Σ_j w_ij x_j``).
    """
    query_block = query[start : start + len(weight)]
    euclidean = kind is not MatrixKind.INNER_PRODUCT
    if grad_query is not None:
        scale = 2.0 if symmetric else 1.0
        block = grad_query[start : start + len(weight)]
        if euclidean:
            block.addmm_(weight, ref, alpha=-scale)
            block.addcmul_(weight.sum(dim=1, keepdim=True), query_block, value=scale)
        else:
            block.addmm_(weight, ref, alpha=scale)
    if grad_ref is not None and not symmetric:
        if euclidean:
            grad_ref.addmm_(weight.t(), query_block, alpha=-1.0)
            grad_ref.addcmul_(weight.sum(dim=0).unsqueeze(1), ref)
        else:
            grad_ref.addmm_(weight.t(), query_block)


def sparse_product(
    rows: Tensor, cols: Tensor, weight: Tensor, n_rows: int, dense: Tensor
) -> Tensor:
    """The ``(n_rows, D)`` product of the sparse matrix with entries ``weight_k`` at
    ``(rows_k, cols_k)`` (``(n,)`` each, repeated entries adding up) with the ``(R, D)`` matrix
    ``dense``: row ``i`` is ``Σ_{k: rows_k = i} weight_k dense[cols_k]``.

    The entries are sorted by row into a compressed-row (CSR) matrix, whose product is a
    library kernel (MKL on the CPU, cuSPARSE on CUDA): 3 to 10 times faster than scattering
    gathered rows with ``index_add_`` or than a COO product, which coalesces first.
    """
    if len(rows) > 1 and not bool((rows[1:] >= rows[:-1]).all()):  # (lists are often sorted)
        order = torch.argsort(rows, stable=True)
        cols, weight = cols.index_select(0, order), weight.index_select(0, order)
    row_starts = rows.new_zeros(n_rows + 1)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=row_starts[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": its product is not
        warnings.simplefilter("ignore", UserWarning)
        # the indices are in range by construction: no (slow) invariant checks
        matrix = torch.sparse_csr_tensor(
            row_starts, cols, weight, (n_rows, len(dense)), check_invariants=False
        )
    return matrix @ dense


def add_pair_embedding_grads_(
    kind: MatrixKind,
    query: Tensor,
    ref: Tensor,
    rows: Tensor,
    cols: Tensor,
    weight: Tensor,
    grad_query: Tensor | None,
    grad_ref: Tensor | None,
    symmetric: bool = False,
) -> None:
    """:func:`add_block_embedding_grads_` for a list of entries ``(rows_k, cols_k)`` of the
    matrix with weights ``weight_k`` (``(n,)`` each): the weight matrix is sparse, and the work
    is proportional to the number of entries (:func:`sparse_product`, no gathered copies of the
    embeddings). When ``grad_query`` and ``grad_ref`` are one tensor (the references are the
    queries) and the entries not :attr:`~PairBlocks.symmetric`, both roles are added with one
    product over the entries and their transposes."""
    if len(rows) == 0:
        return
    euclidean = kind is not MatrixKind.INNER_PRODUCT
    sign = -1.0 if euclidean else 1.0
    # a symmetric weight matrix: the references' role equals the queries', added twice
    scale = 2.0 if symmetric else 1.0
    if grad_query is not None and grad_ref is grad_query and not symmetric:  # one for both roles
        rows, cols = torch.cat([rows, cols]), torch.cat([cols, rows])
        weight = torch.cat([weight, weight])
        grad_ref = None
    if grad_query is not None:
        grad_query.add_(sparse_product(rows, cols, weight, len(query), ref), alpha=sign * scale)
        if euclidean:
            row_sums = weight.new_zeros(len(query)).index_add_(0, rows, weight)
            grad_query.addcmul_(row_sums.unsqueeze(1), query, value=scale)
    if grad_ref is not None and not symmetric:
        grad_ref.add_(sparse_product(cols, rows, weight, len(ref), query), alpha=sign)
        if euclidean:
            col_sums = weight.new_zeros(len(ref)).index_add_(0, cols, weight)
            grad_ref.addcmul_(col_sums.unsqueeze(1), ref)


class _Elementwise(torch.autograd.Function):
    """Values of an elementwise rule whose derivative the rule states (see
    :func:`elementwise_terms`)."""

    @staticmethod
    def forward(
        ctx: Any,
        rule: Callable[..., tuple[Tensor, Tensor]],
        signs: tuple[float, ...],
        *inputs: Tensor,
    ) -> Tensor:
        values, grad = rule(*inputs)
        ctx.save_for_backward(grad)
        ctx.signs = signs
        return values

    @staticmethod
    def backward(ctx: Any, grad_values: Tensor) -> tuple[Tensor | None, ...]:
        first_order_only()
        (grad,) = ctx.saved_tensors
        grad = grad * grad_values
        return None, None, *(grad if sign == 1 else grad * sign for sign in ctx.signs)


def elementwise_terms(
    rule: Callable[..., tuple[Tensor, Tensor]], inputs: tuple[Tensor, ...], signs: tuple[float, ...]
) -> Tensor:
    """The values of ``rule(*inputs)`` with the gradient it states: ``rule`` returns the values
    and their elementwise derivative ``g`` (all of the inputs' one shape); the derivative with
    respect to ``inputs[k]`` is ``signs[k] · g`` (e.g. a triplet loss: ``+g`` for ``d(a, p)``,
    ``-g`` for ``d(a, n)``). For the term rules of :mod:`deepmetric.functional` on listed
    tuples: the gradient reaches the inputs' graphs (their distances), first order only; only
    ``g`` is kept for the backward pass."""
    values = _Elementwise.apply(rule, signs, *inputs)
    assert isinstance(values, Tensor)
    return values
