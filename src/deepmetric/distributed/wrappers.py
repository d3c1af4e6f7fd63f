"""Losses and miners over the global batch of a ``torch.distributed`` job (DDP, torchrun).

Each process holds a shard of the global batch; a pair-based loss wants every pair of the
*global* batch. :class:`DistributedLossWrapper` and :class:`DistributedMinerWrapper` (PML's names
and call signatures) all-gather the embeddings and labels (shards may have different sizes) and
compute the loss or mine on the gathered batch, in rank order. Only ``torch.distributed``
collectives are used; with no process group, or a world of one process, the wrapped loss or
miner is called as it is.

**The promise** (``efficient=False``, the default). On every rank the returned loss *value* is
the loss ``L`` of the global batch (the shards concatenated in rank order), and after DDP has
averaged the gradients, the model's gradients are those of one process computing ``L`` on the
global batch. The scaling this needs, and where it goes: with ``W`` ranks, rank ``r`` computes
``L`` from the gathered embeddings, but only its own slice carries a graph (the others arrive
through a collective), so its backward pass yields ``g_r = Σ_{i in shard r} dL/de_i · de_i/dθ``.
The exact gradient is ``Σ_r g_r``; DDP computes ``(1/W) Σ_r g_r``. So the gradient entering the
local slice is multiplied by ``W`` (:func:`scale_gradient`; the forward value is untouched), and
DDP's average becomes the exact sum. PML instead returns ``W * L``: its value is ``W`` times the
loss, and so is the gradient of every loss parameter. Here a loss parameter (proxies, ArcFace's
``W``, MarginLoss's ``beta``) sees the whole gathered batch on every rank, unscaled: its gradient
is already the exact global one, identical on all ranks, and averaging it changes nothing. Let
DDP average it anyway (it keeps the copies bit-identical even with non-deterministic kernels);
DDP refuses a module without parameters, so this is for losses that have some::

    model = DDP(model)
    loss_fn = DDP(DistributedLossWrapper(ArcFaceLoss(num_classes, embedding_size)))
    # (or one DDP around a module holding both the model and the loss)
    miner = DistributedMinerWrapper(MultiSimilarityMiner())
    embeddings = model(x)                    # this rank's shard
    loss = loss_fn(embeddings, labels, miner(embeddings, labels))
    loss.backward()                          # averaged by DDP: the gradient of the global loss

The mined tuple indexes the global batch and is the same on every rank (a random miner needs the
same random state on every rank for that).

**efficient=True.** Each rank compares its own samples (queries) with the gathered batch
(references), with each query's own copy removed from its positives: ``B_r × N`` distances
instead of ``N × N``, and no backward collective. The value is this rank's loss ``L_r`` (it
differs between ranks); there is no scaling. After DDP averages, the gradient is that of
``(1/W) Σ_r L_r`` with these terms kept and dropped: kept (exact) are the terms where a sample
is the *query*, and where it is the reference of a query of the same rank; dropped are the terms
where it is the reference of a query on another rank (they would need that rank's graph). For a
loss that is a mean over its queries (MultiSimilarity, generalized lifted structure, ...), the
average of the ``L_r`` weighted by shard size is the global loss (with equal shards, the plain
average that DDP's gradient follows). The proxy and classification losses have no references:
use ``efficient=False`` (exact for them).

Initialise the process group with a timeout (``init_process_group(..., timeout=timedelta(...))``):
if a process dies, the others then fail with an error instead of waiting forever. Inputs are
validated on every rank *before* the collectives move data, and a problem on one rank raises
``ValueError`` on all of them (no rank is left waiting).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..losses.base import BaseMetricLossFunction
from ..losses.cross_batch_memory import (
    CrossBatchMemory,
    loss_excluding_self,
    mine_excluding_self,
    supports_ref_emb,
)
from ..miners import BaseMiner, IndicesTuple
from .gather import (
    exchange_shapes,
    gather_labels,
    gather_rows,
    gather_with_local,
    input_problem,
    world_size,
)


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """``x`` itself in the forward pass; ``factor`` times the incoming gradient in the backward
    pass (``x + (factor - 1)(x - x.detach())``: the added term is exactly zero)."""
    if factor == 1:
        return x
    return x + (factor - 1) * (x - x.detach())


class DistributedLossWrapper(nn.Module):
    """A loss over the global batch of a ``torch.distributed`` job (see the module docstring for
    the gradient promise and the ``efficient`` trade-off).

    Call as the wrapped loss: ``(B_r, D)`` embeddings and ``(B_r,)`` labels of this rank's shard
    (sizes may differ between ranks) -> scalar. ``indices_tuple`` indexes the global batch
    (``efficient=False``) or this rank's queries against the global batch (``efficient=True``), as
    :class:`DistributedMinerWrapper` with the same ``efficient`` returns. ``ref_emb`` /
    ``ref_labels`` are gathered too. ``enqueue_mask`` is for a wrapped :class:`CrossBatchMemory`,
    which then sees the global batch (every rank keeps the same memory).

    The idea of gathering embeddings for a metric loss follows PML's ``DistributedLossWrapper``
    (Musgrave, Belongie & Lim, "PyTorch Metric Learning", 2020).

    Args:
        loss: a deepmetric loss, or a :class:`CrossBatchMemory`.
        efficient: compare this rank's samples with the global batch instead of computing the
            whole global loss on every rank (pair-based losses only; not with
            :class:`CrossBatchMemory`).
    """

    def __init__(self, loss: BaseMetricLossFunction | CrossBatchMemory, efficient: bool = False):
        super().__init__()
        if not isinstance(loss, BaseMetricLossFunction | CrossBatchMemory):
            raise ValueError(
                "loss must be a deepmetric loss or a CrossBatchMemory, got " + type(loss).__name__
            )
        if efficient and isinstance(loss, CrossBatchMemory):
            raise ValueError("CrossBatchMemory is not supported with efficient=True")
        if efficient and not supports_ref_emb(loss):
            raise ValueError(
                f"efficient=True compares queries with references, which {type(loss).__name__} "
                "does not support; use efficient=False (exact for it)"
            )
        self.loss = loss
        self.efficient = efficient

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        enqueue_mask: Tensor | None = None,
    ) -> Tensor:
        """This rank's shard -> the loss (see the class docstring)."""
        if isinstance(self.loss, CrossBatchMemory):
            if ref_emb is not None or ref_labels is not None:
                raise ValueError("CrossBatchMemory does not take ref_emb or ref_labels")
            if world_size() == 1:
                return self.loss(embeddings, labels, indices_tuple, enqueue_mask)
        else:
            if enqueue_mask is not None:
                raise ValueError("enqueue_mask is only for a wrapped CrossBatchMemory")
            if world_size() == 1:
                return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)

        problem = input_problem(embeddings, labels, ref_emb, ref_labels, enqueue_mask)
        sizes, ref_sizes = exchange_shapes(
            problem, embeddings, labels, ref_emb, ref_labels, enqueue_mask
        )
        if self.efficient:
            return self._efficient_loss(
                embeddings, labels, indices_tuple, ref_emb, ref_labels, sizes, ref_sizes
            )

        factor = dist.get_world_size()
        all_emb, _ = gather_with_local(scale_gradient(embeddings, factor), sizes)
        all_labels = gather_labels(labels, sizes)
        if isinstance(self.loss, CrossBatchMemory):
            assert all_labels is not None
            all_mask = None
            if enqueue_mask is not None:
                all_mask = torch.cat(gather_rows(enqueue_mask.to(torch.uint8), sizes)).bool()
            return self.loss(all_emb, all_labels, indices_tuple, all_mask)
        all_ref, all_ref_labels = None, None
        if ref_emb is not None:
            all_ref, _ = gather_with_local(scale_gradient(ref_emb, factor), ref_sizes)
            all_ref_labels = gather_labels(ref_labels, ref_sizes)
        return self.loss(all_emb, all_labels, indices_tuple, all_ref, all_ref_labels)

    def _efficient_loss(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices_tuple: tuple[Tensor, ...] | None,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        sizes: list[int],
        ref_sizes: list[int],
    ) -> Tensor:
        assert isinstance(self.loss, BaseMetricLossFunction)
        if ref_emb is not None:  # a separate reference set: nothing to exclude
            all_ref, _ = gather_with_local(ref_emb, ref_sizes)
            return self.loss(
                embeddings, labels, indices_tuple, all_ref, gather_labels(ref_labels, ref_sizes)
            )
        all_emb, offset = gather_with_local(embeddings, sizes)
        self_index = offset + torch.arange(len(embeddings), device=embeddings.device)
        return loss_excluding_self(
            self.loss,
            embeddings,
            labels,
            indices_tuple,
            all_emb,
            gather_labels(labels, sizes),
            self_index,
        )


class DistributedMinerWrapper(nn.Module):
    """A miner over the global batch of a ``torch.distributed`` job.

    ``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` with this rank's shard returns:

    * ``efficient=False``: the wrapped miner's tuple on the gathered global batch (indices into
      it, in rank order; the same on every rank for a deterministic miner), for
      ``DistributedLossWrapper(loss)``;
    * ``efficient=True``: anchors indexing this rank's shard, partners indexing the global batch,
      each anchor's own copy excluded before mining, for
      ``DistributedLossWrapper(loss, efficient=True)``.

    With no process group or one process, the wrapped miner is called as it is.

    Args:
        miner: a deepmetric miner.
        efficient: mine this rank's anchors against the global batch.
    """

    def __init__(self, miner: BaseMiner, efficient: bool = False) -> None:
        super().__init__()
        if not isinstance(miner, BaseMiner):
            raise ValueError(f"miner must be a deepmetric miner, got {type(miner).__name__}")
        self.miner = miner
        self.efficient = efficient

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> IndicesTuple:
        """This rank's shard -> an index tuple (see the class docstring)."""
        if world_size() == 1:
            return self.miner(embeddings, labels, ref_emb, ref_labels)
        problem = input_problem(embeddings, labels, ref_emb, ref_labels)
        if problem is None and labels is None:
            problem = "miners need labels"
        sizes, ref_sizes = exchange_shapes(problem, embeddings, labels, ref_emb, ref_labels, None)
        assert labels is not None
        all_emb = torch.cat(gather_rows(embeddings, sizes))
        all_labels = gather_labels(labels, sizes)
        assert all_labels is not None
        all_ref, all_ref_labels = None, None
        if ref_emb is not None:
            all_ref = torch.cat(gather_rows(ref_emb, ref_sizes))
            all_ref_labels = gather_labels(ref_labels, ref_sizes)

        if not self.efficient:
            return self.miner(all_emb, all_labels, all_ref, all_ref_labels)
        if all_ref is not None:
            return self.miner(embeddings, labels, all_ref, all_ref_labels)
        offset = sum(sizes[: dist.get_rank()])
        self_index = offset + torch.arange(len(embeddings), device=embeddings.device)
        return mine_excluding_self(self.miner, embeddings, labels, all_emb, all_labels, self_index)
