"""The distances of a list of pairs, without the matrix."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..distances import BaseDistance
from .batch import Batch
from .gradients import (
    add_pair_embedding_grads_,
    embedding_weight_,
    first_order_only,
)
from .matrix import (
    MatrixKind,
    fused_matrix_kind,
    normalized_inputs,
    row_blocks,
)

# One pair's distance computed on its own (gathering two rows, and scattering their gradient)
# costs about as much as this many entries of the whole matrix (measured on CPU, B = 512 and 2048,
# forward and backward through a loss).
PAIR_COST_IN_ENTRIES = 32


def few_pairs(batch: Batch, n_pairs: int) -> bool:
    """Whether the distances of ``n_pairs`` listed pairs are cheaper to compute one by one (see
    :func:`pair_distances`) than as the whole ``(B, R)`` matrix."""
    return n_pairs * PAIR_COST_IN_ENTRIES <= len(batch.embeddings) * len(batch.ref_emb)


# Gathered entries per chunk of listed pairs on the CPU: a chunk's two gathered (chunk, D) blocks
# of rows stay within 512 KiB each, whatever the number of threads (measured at B=512 with 3.6k
# pairs: as fast as one chunk of all pairs, 8% faster than 256 KiB chunks, 25% than 128 KiB).
PAIR_CHUNK_ELEMENTS = 1 << 17


def pair_chunks(n_pairs: int, dim: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the chunks of ``n_pairs`` listed pairs whose rows of ``dim``
    entries are gathered at once: about :data:`PAIR_CHUNK_ELEMENTS` entries on the CPU, the
    blocks of :func:`row_blocks` on an accelerator."""
    if device.type != "cpu":
        yield from row_blocks(n_pairs, dim, device)
        return
    step = max(1, PAIR_CHUNK_ELEMENTS // max(1, dim))
    for start in range(0, n_pairs, step):
        yield start, min(start + step, n_pairs)


class _PairDistances(torch.autograd.Function):
    """``(B, D)`` queries, ``(R, D)`` references and ``(n,)`` index pairs -> the ``(n,)``
    distances of a :class:`MatrixKind` between ``query[rows_k]`` and ``ref[cols_k]``, computed
    directly from the differences (no matrix product), a chunk of pairs at a time so that the
    gathered ``(chunk, D)`` rows stay small; the backward pass is sparse products
    (:func:`add_pair_embedding_grads_`)."""

    @staticmethod
    def forward(
        ctx: Any, query: Tensor, ref: Tensor, rows: Tensor, cols: Tensor, kind: MatrixKind
    ) -> Tensor:
        dists = query.new_empty(len(rows))
        for start, stop in pair_chunks(len(rows), query.shape[1], query.device):
            q = query.index_select(0, rows[start:stop])  # (faster than query[rows] on CPU)
            r = ref.index_select(0, cols[start:stop])
            if kind is MatrixKind.INNER_PRODUCT:
                dists[start:stop] = (q * r).sum(dim=1)
            else:
                dists[start:stop] = q.sub_(r).square_().sum(dim=1)
        if kind is MatrixKind.EUCLIDEAN:
            dists.sqrt_()
        ctx.kind = kind
        ctx.same_tensor = query is ref
        ctx.save_for_backward(query, ref, rows, cols, dists)
        return dists

    @staticmethod
    def backward(ctx: Any, grad_dists: Tensor) -> tuple[Tensor | None, ...]:
        first_order_only()
        query, ref, rows, cols, dists = ctx.saved_tensors
        kind: MatrixKind = ctx.kind
        need_query, need_ref = ctx.needs_input_grad[:2]
        grad_query = torch.zeros_like(query) if need_query else None
        grad_ref = torch.zeros_like(ref) if need_ref else None
        if ctx.same_tensor and grad_query is not None:
            # the references are the queries: one gradient takes both roles (autograd would
            # otherwise add a second (B, D) gradient to it)
            grad_ref = grad_query
        weight = embedding_weight_(kind, grad_dists.clone(), dists)
        add_pair_embedding_grads_(kind, query, ref, rows, cols, weight, grad_query, grad_ref)
        if ctx.same_tensor and grad_query is not None:
            return grad_query, None, None, None, None
        return grad_query, grad_ref, None, None, None


def pair_distances(distance: BaseDistance, batch: Batch, rows: Tensor, cols: Tensor) -> Tensor:
    """``(n,)`` distances between ``batch.embeddings[rows_k]`` and ``batch.ref_emb[cols_k]``,
    through autograd, as ``distance`` measures them; for a few pairs (see :func:`few_pairs`) this
    is much cheaper than the whole matrix. Fusable distances are computed a chunk of pairs at a
    time with a hand-written backward; any other through
    :meth:`~deepmetric.distances.BaseDistance.pairwise_distance`."""
    kind = fused_matrix_kind(distance)
    if kind is None:
        return distance.pairwise_distance(batch.embeddings[rows], batch.ref_emb[cols])
    query, ref = normalized_inputs(distance, batch)
    dists = _PairDistances.apply(query, ref, rows, cols, kind)  # (no matrix product to autocast)
    assert isinstance(dists, Tensor)
    return dists
