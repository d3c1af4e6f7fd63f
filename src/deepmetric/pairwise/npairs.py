"""One positive pair per label, and the losses of a row rule over those pairs' own ``(N, N)``
matrix (each anchor against every kept positive): the N-pair loss's engine (Sohn, 2016)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distances import BaseDistance, _to_float32, unit_rows, unit_rows_grad
from .batch import Batch
from .blocks import RowBlock, pairs_are_the_labels
from .gradients import add_block_embedding_grads_, first_order_only
from .masks import to_pairs
from .matrix import MatrixKind, as_compared, fused_matrix_kind
from .rows import RowRule, matrix_row_losses


def first_pair_per_label(
    anchors: Tensor, positives: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Keep one positive pair per anchor label: the first in the given order, as PML does.

    ``(P,)`` anchor and positive indices and ``(B,)`` labels -> ``(N,)`` anchors and positives,
    one pair for each of the ``N`` distinct labels, ordered by label.
    """
    unique_labels, label_slot = torch.unique(labels[anchors], sorted=True, return_inverse=True)
    order = torch.arange(len(anchors), device=anchors.device)
    first = torch.full((len(unique_labels),), len(anchors), device=anchors.device)
    first = first.scatter_reduce(0, label_slot, order, reduce="amin")
    return anchors[first], positives[first]


def first_pair_per_label_from_labels(
    labels: Tensor, ref_labels: Tensor, same_source: bool
) -> tuple[Tensor, Tensor]:
    """:func:`first_pair_per_label` over every positive pair of the labels (row-major), found
    from the sorted labels alone: a label's first pair is its first query, with its second
    sample (the references are the queries) or its first reference; labels without a positive
    pair are left out.

    ``(B,)`` labels, ``(R,)`` reference labels -> ``(N,)`` anchors and positives, by label.
    """
    order = torch.argsort(labels, stable=True)  # equal labels keep ascending indices
    sorted_labels = labels.index_select(0, order)  # (index_select: cheaper than [order])
    starts_group = torch.ones_like(sorted_labels, dtype=torch.bool)
    torch.ne(sorted_labels[1:], sorted_labels[:-1], out=starts_group[1:])
    if same_source:
        # a label's second query follows its first: a pair unless the next group starts there
        ends_group = torch.ones_like(starts_group)
        ends_group[:-1] = starts_group[1:]
        firsts = torch.where(starts_group & ~ends_group)[0]
        return order.index_select(0, firsts), order.index_select(0, firsts + 1)
    firsts = torch.where(starts_group)[0]  # positions of each label's first query
    group_labels = sorted_labels.index_select(0, firsts)
    if len(ref_labels) == 0:
        empty = torch.empty(0, dtype=torch.long, device=labels.device)
        return empty, empty.clone()
    ref_order = torch.argsort(ref_labels, stable=True)
    sorted_ref = ref_labels.index_select(0, ref_order)
    ref_firsts = torch.searchsorted(sorted_ref, group_labels).clamp_max_(len(ref_labels) - 1)
    has_pair = torch.where(sorted_ref.index_select(0, ref_firsts) == group_labels)[0]
    return (
        order.index_select(0, firsts.index_select(0, has_pair)),
        ref_order.index_select(0, ref_firsts.index_select(0, has_pair)),
    )


def npairs_losses(batch: Batch, distance: BaseDistance, rule: RowRule) -> tuple[Tensor, Tensor]:
    """The ``(N,)`` losses of a row ``rule`` over one positive pair per label, and their
    ``(N,)`` anchors.

    The pair kept for each label is the first positive pair (row-major over the batch, or in
    the order of ``batch.indices_tuple``) whose anchor has that label
    (:func:`first_pair_per_label`). Anchor ``i`` is then compared with the ``N`` kept
    positives: the rule receives the ``(N, N)`` matrix whose row ``i`` has its positive in
    column ``i`` and the other labels' positives as negatives
    (:func:`~deepmetric.functional.npairs_rows` is such a rule). ``batch.labels`` are required.

    The engine picks how the matrix is computed:

    * inner products (normalised with ``p = 2``, or not normalised): gathered rows, one matrix
      product, and the rows' gradient in closed form (:class:`_InnerProductRows`);
    * any other distance: the distance's matrix of the gathered rows, through its autograd
      (:func:`matrix_row_losses`).

    Both give first derivatives only (``create_graph=True`` raises in the backward pass).
    """
    assert batch.labels is not None
    if pairs_are_the_labels(batch):
        assert batch.ref_labels is not None
        anchors, positives = first_pair_per_label_from_labels(
            batch.labels, batch.ref_labels, batch.same_source
        )
    else:
        if batch.indices_tuple is None:
            anchors, positives = torch.where(batch.masks()[0])
        else:
            anchors, positives, _, _ = to_pairs(batch.indices_tuple)
        anchors, positives = first_pair_per_label(anchors, positives, batch.labels)
    n = len(anchors)
    if n == 0:
        return batch.embeddings.new_zeros(0), anchors
    if fused_matrix_kind(distance) is MatrixKind.INNER_PRODUCT and (
        distance.p == 2 or not distance.normalize_embeddings
    ):
        with torch.autocast(batch.embeddings.device.type, enabled=False):
            query = _to_float32(batch.embeddings)
            ref = query if batch.same_source else _to_float32(batch.ref_emb)
            losses = _InnerProductRows.apply(query, ref, anchors, positives, distance, rule)
        assert isinstance(losses, Tensor)
        return losses, anchors
    # the rows were validated with the batch: compare them without checking them again
    if batch.same_source:  # one gather (and one scatter in the backward pass) for both
        both = torch.cat([anchors, positives])  # index_select: a cheaper gather than [both]
        rows = as_compared(distance, batch.embeddings.index_select(0, both))
        query, ref = rows[:n], rows[n:]
    else:
        query = as_compared(distance, batch.embeddings.index_select(0, anchors))
        ref = as_compared(distance, batch.ref_emb.index_select(0, positives))
    with torch.autocast(query.device.type, enabled=False):
        mat = distance.compute_powered_mat(query, ref)
    pair = torch.arange(n, device=mat.device)  # row i's positive: column i
    return matrix_row_losses(mat, pair, pair, rule), anchors


class _InnerProductRows(torch.autograd.Function):
    """``(B, D)`` queries, ``(R, D)`` references (the same tensor when the references are the
    queries), ``(N,)`` anchors and positives -> the ``(N,)`` losses of a row rule over the
    inner products of the gathered (and, if the inner-product ``distance`` normalises,
    L2-normalised) rows.

    The same values as gathering, normalising and comparing through autograd, with the backward
    in closed form: the rule's gradient ``G`` with respect to the similarities, scaled by each
    row's incoming gradient, gives the rows' gradients ``G r`` and ``Gᵀ q`` (then through
    :func:`~deepmetric.distances.unit_rows_grad`). No graph of a dozen small operations is
    kept: at B = 512 this is a quarter of the step.
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        ref: Tensor,
        anchors: Tensor,
        positives: Tensor,
        distance: BaseDistance,
        rule: RowRule,
    ) -> Tensor:
        same = query is ref
        both = torch.cat([anchors, positives])
        if same:  # one gather (and one scatter in the backward pass) for both roles
            rows = query.index_select(0, both)
        else:
            rows = torch.cat([query.index_select(0, anchors), ref.index_select(0, positives)])
        norm = None
        if distance.normalize_embeddings:
            rows, norm = unit_rows(rows)
        n = len(anchors)
        pair = torch.arange(n, device=rows.device)  # row i's positive: column i
        block = RowBlock(rows[:n] @ rows[n:].t(), pair, pair, None, None)
        losses, grad_sim = rule(block)
        ctx.save_for_backward(both, rows, grad_sim, *(() if norm is None else (norm,)))
        ctx.same_tensor = same
        ctx.shapes = query.shape, ref.shape
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        first_order_only()
        both, rows, grad_sim, *norm = ctx.saved_tensors
        n = len(grad_sim)
        grad_sim = grad_sim * grad_losses.unsqueeze(1)  # (not in place: a retained graph reuses it)
        grad_rows = torch.zeros_like(rows)
        # inner products of the anchors' rows with the positives': G r and Gᵀ q
        add_block_embedding_grads_(
            MatrixKind.INNER_PRODUCT, rows[:n], rows[n:], 0, grad_sim, grad_rows[:n], grad_rows[n:]
        )
        if norm:
            grad_rows = unit_rows_grad(grad_rows, rows, norm[0])
        query_shape, ref_shape = ctx.shapes
        if ctx.same_tensor:
            grad = grad_rows.new_zeros(query_shape).index_add_(0, both, grad_rows)
            return grad, None, None, None, None, None
        grad_query = grad_rows.new_zeros(query_shape).index_add_(0, both[:n], grad_rows[:n])
        grad_ref = grad_rows.new_zeros(ref_shape).index_add_(0, both[n:], grad_rows[n:])
        return grad_query, grad_ref, None, None, None, None
