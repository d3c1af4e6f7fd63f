"""Cross-batch memory (Wang, Zhang, Huang & Scott, CVPR 2020), and the self-pair exclusion it
shares with :mod:`deepmetric.distributed`.

A loss compares a batch of queries with a *reference set*. When the references contain the
queries themselves at known positions (the batch just written into the memory, or this process's
slice of a batch gathered across processes), a query must not be paired with its own copy:
``self_index[i]`` names the column of query ``i``'s copy (``-1`` for none), and
:func:`loss_excluding_self` / :func:`mine_excluding_self` call a loss or a miner with those
positive pairs removed, for the label masks as well as for index tuples. This keeps every loss on
its streamed ``O(B·R)`` path (no index tuple of all triplets is ever built for it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_embeddings, check_indices_tuple, check_labels, check_positive_int
from ..interfaces import IndicesTuple, Miner
from ..pairwise import pairs_from_masks, pairs_to_triplets, to_pairs
from ..reducers import zero_loss
from .base import BaseMetricLossFunction, Batch, prepare_batch

# ---------------------------------------------------------------------------------------------
# Excluding each query's own copy from its positives
# ---------------------------------------------------------------------------------------------


def remove_self_pairs(indices_tuple: tuple[Tensor, ...], self_index: Tensor) -> tuple[Tensor, ...]:
    """Drop the positive pairs ``(a, self_index[a])`` (and the triplets built on them) from a
    miner's ``(a, p, n)`` or ``(a1, p, a2, n)`` tuple."""
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        keep = p != self_index[a]
        return a[keep], p[keep], n[keep]
    a1, p, a2, n = indices_tuple
    keep = p != self_index[a1]
    return a1[keep], p[keep], a2, n


def _excluding_self(batch: Batch, self_index: Tensor | None) -> Batch:
    """``batch`` with :attr:`~deepmetric.losses.base.Batch.self_index` set (and the self-pairs
    removed from its miner tuple, if any)."""
    if self_index is None:
        return batch
    self_index = self_index.to(device=batch.embeddings.device, dtype=torch.long)
    if self_index.shape != (len(batch.embeddings),):
        raise ValueError(
            f"self_index must have shape ({len(batch.embeddings)},), got {tuple(self_index.shape)}"
        )
    indices_tuple = batch.indices_tuple
    if indices_tuple is not None:
        indices_tuple = remove_self_pairs(indices_tuple, self_index)
    return replace(batch, indices_tuple=indices_tuple, self_index=self_index)


def loss_excluding_self(
    loss: BaseMetricLossFunction,
    embeddings: Tensor,
    labels: Tensor | None,
    indices_tuple: tuple[Tensor, ...] | None,
    ref_emb: Tensor,
    ref_labels: Tensor | None,
    self_index: Tensor | None,
) -> Tensor:
    """``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)`` where query ``i`` is never
    paired with reference ``self_index[i]`` (its own copy; ``-1`` for none).

    Shapes: embeddings ``(B, D)``, labels ``(B,)``, ref_emb ``(R, D)``, ref_labels ``(R,)``,
    self_index ``(B,)`` -> the loss's output (a scalar for every reducer but DoNothingReducer).
    """
    batch = prepare_batch(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, loss.requires_labels
    )
    return loss.loss_from_batch(_excluding_self(batch, self_index))


def mine_excluding_self(
    miner: Miner,
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor,
    ref_labels: Tensor,
    self_index: Tensor | None,
) -> IndicesTuple:
    """``miner(embeddings, labels, ref_emb, ref_labels)`` where query ``i``'s own copy (reference
    ``self_index[i]``) is excluded *before* mining, so a miner that picks one positive per anchor
    picks among the others. Same output format as the miner (indices into ``ref_emb``)."""
    batch = _excluding_self(
        prepare_batch(embeddings, labels, None, ref_emb, ref_labels), self_index
    )
    # the rest of BaseMiner.forward, with the self-excluding masks
    with torch.no_grad():
        mat = miner.distance(batch.embeddings, batch.ref_emb)
        pos_mask, neg_mask = batch.masks()
        output = miner.mine(mat, pos_mask, neg_mask, batch)
    if len(output) == 3:
        miner.num_triplets = len(output[0])
    else:
        miner.num_pos_pairs, miner.num_neg_pairs = len(output[0]), len(output[2])
    return output


def supports_ref_emb(loss: nn.Module) -> bool:
    """True for a deepmetric loss that compares queries with a separate reference set (every
    pair-based loss; not the proxy and classification losses, which learn class weights)."""
    return isinstance(loss, BaseMetricLossFunction) and loss.supports_ref_emb


# ---------------------------------------------------------------------------------------------
# The memory
# ---------------------------------------------------------------------------------------------


class CrossBatchMemory(nn.Module):
    """Use the embeddings of past batches, kept in a FIFO queue, as the loss's references.

    Wang, Zhang, Huang & Scott, "Cross-Batch Memory for Embedding Learning", CVPR 2020. PML's
    name, arguments and call::

        loss_fn = CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)
        loss = loss_fn(embeddings, labels, indices_tuple=None, enqueue_mask=None)

    Each call writes the batch (detached) into the memory, then computes
    ``loss(embeddings, labels, indices_tuple, ref_emb=memory, ref_labels=memory_labels)`` over
    the occupied part of the memory, which includes the batch just written. A sample's own copy in
    the memory is never its positive; it is excluded before the (optional) ``miner`` mines
    ``(batch, memory)`` pairs or triplets. Gradients flow to ``embeddings`` only.

    * ``enqueue_mask`` (``(B,)`` bool, as in PML, e.g. for MoCo): only the masked rows are
      written into the memory; the *unmasked* rows are the queries. Mutually exclusive with
      ``indices_tuple``.
    * ``indices_tuple`` (a miner's output on the batch itself, anchors and partners indexing
      ``embeddings``): added to the memory's pairs or triplets (PML's "concatenate"), with the
      partners moved to their slots in the memory.

    Works with every pair-based loss of :mod:`deepmetric.losses` (anything but the proxy and
    classification losses, which raise ``ValueError``), including ``TripletMarginLoss(swap=True)``
    (PML issue 748). Memory: the ``(memory_size, D)`` queue plus the loss's ``O(B·memory_size)``.

    The queue is made of buffers (``embedding_memory`` ``(memory_size, embedding_size)``,
    ``label_memory`` ``(memory_size,)``, ``queue_position`` and ``queue_full``): they are in the
    ``state_dict`` (a checkpoint resumes with its memory) and move with ``.to()``. Embeddings are
    stored in the memory's dtype (float32 unless converted with ``.to()``/``.double()``) and read
    back in the embeddings' dtype. As in PML, the memory follows the embeddings to their device.

    Differences from PML 2.9, deliberate: self-pairs are excluded before mining, not after (PML
    mines them, then drops them: an "easy positive" miner then loses the anchor, PML PR 524);
    a user ``indices_tuple``'s partners are mapped to the batch's memory slots (PML uses them as
    memory indices as they are); an empty enqueue does not mark the queue as full (PML then
    uses the unwritten zero rows); enqueuing more than ``memory_size`` rows is a ``ValueError``;
    a call that raises leaves the memory unchanged.

    Args:
        loss: a deepmetric pair-based loss (its ``ref_emb`` support is what is used).
        embedding_size: ``D``, the size of the embeddings.
        memory_size: number of past embeddings kept.
        miner: optional miner, run on ``(queries, memory)`` with self-pairs excluded.
    """

    embedding_memory: Tensor
    label_memory: Tensor
    queue_position: Tensor
    queue_full: Tensor

    def __init__(
        self,
        loss: BaseMetricLossFunction,
        embedding_size: int,
        memory_size: int = 1024,
        miner: Miner | None = None,
    ) -> None:
        super().__init__()
        if not supports_ref_emb(loss):
            raise ValueError(
                "CrossBatchMemory needs a deepmetric loss that accepts ref_emb (a pair-based "
                f"loss); {type(loss).__name__} does not"
            )
        if miner is not None and not isinstance(miner, Miner):
            raise ValueError(f"miner must be a deepmetric miner, got {type(miner).__name__}")
        check_positive_int(embedding_size, "embedding_size")
        check_positive_int(memory_size, "memory_size")
        self.loss = loss
        self.miner = miner
        self.embedding_size = embedding_size
        self.memory_size = memory_size
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size))
        self.register_buffer("label_memory", torch.zeros(memory_size, dtype=torch.long))
        self.register_buffer("queue_position", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_full", torch.zeros((), dtype=torch.bool))

    @property
    def queue_idx(self) -> int:
        """The slot the next embedding is written to (PML's name)."""
        return int(self.queue_position)

    @property
    def has_been_filled(self) -> bool:
        """Whether the queue has wrapped around at least once (every slot is in use)."""
        return bool(self.queue_full)

    def reset_queue(self) -> None:
        """Empty the memory."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.queue_position.zero_()
        self.queue_full.zero_()

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """A PML ``CrossBatchMemory`` state_dict (the two memories, no queue position: PML keeps
        that in a plain attribute) loads with ``strict=True``; the queue position and fill
        state are then left as they are, as PML leaves its own."""
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "embedding_memory" in state_dict:
            for name in ("queue_position", "queue_full"):
                if prefix + name not in state_dict and prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: tuple[Tensor, ...] | None = None,
        enqueue_mask: Tensor | None = None,
    ) -> Tensor:
        """``(B, D)`` embeddings, ``(B,)`` integer labels -> scalar loss against the memory."""
        check_embeddings(embeddings)
        if labels is None:
            raise ValueError("CrossBatchMemory needs labels (they are stored in the memory)")
        labels = check_labels(labels, embeddings)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings have size {embeddings.shape[1]} but embedding_size is "
                f"{self.embedding_size}"
            )
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if indices_tuple is not None:
            indices_tuple = check_indices_tuple(indices_tuple, len(embeddings), len(embeddings))
            indices_tuple = tuple(idx.to(embeddings.device) for idx in indices_tuple)

        if enqueue_mask is None:
            queries, query_labels = embeddings, labels
            new_emb, new_labels = embeddings, labels
        else:
            mask = self._check_enqueue_mask(enqueue_mask, embeddings)
            queries, query_labels = embeddings[~mask], labels[~mask]
            new_emb, new_labels = embeddings[mask], labels[mask]
        if len(new_emb) > self.memory_size:
            raise ValueError(
                f"cannot enqueue {len(new_emb)} embeddings into a memory of size {self.memory_size}"
            )
        self._follow_device(embeddings.device)

        # the memory with the new rows written in, as a copy: the loss's graph never holds the
        # buffers themselves, so a later call may update them before this loss's backward
        slots, position, full = self._next_slots(len(new_emb))
        n_used = self.memory_size if full else position
        ref_emb = self.embedding_memory[:n_used].to(dtype=embeddings.dtype, copy=True)
        ref_labels = self.label_memory[:n_used].clone()
        ref_emb[slots] = new_emb.detach()
        ref_labels[slots] = new_labels
        self_index = slots if enqueue_mask is None else None

        if len(queries) == 0 or n_used == 0:
            loss = zero_loss(embeddings)
        else:
            tuples = self._indices_tuple(
                queries, query_labels, ref_emb, ref_labels, self_index, indices_tuple
            )
            loss = loss_excluding_self(
                self.loss, queries, query_labels, tuples, ref_emb, ref_labels, self_index
            )

        # commit only once the loss has succeeded
        with torch.no_grad():
            self.embedding_memory[slots] = new_emb.detach().to(self.embedding_memory.dtype)
            self.label_memory[slots] = new_labels
            self.queue_position.fill_(position)
            self.queue_full.fill_(full)
        return loss

    # -- helpers ------------------------------------------------------------------------------

    def _check_enqueue_mask(self, enqueue_mask: Tensor, embeddings: Tensor) -> Tensor:
        if not isinstance(enqueue_mask, Tensor) or enqueue_mask.dtype != torch.bool:
            raise ValueError("enqueue_mask must be a boolean tensor")
        if enqueue_mask.shape != (len(embeddings),):
            raise ValueError(
                f"enqueue_mask must have shape ({len(embeddings)},), "
                f"got {tuple(enqueue_mask.shape)}"
            )
        return enqueue_mask.to(embeddings.device)

    def _follow_device(self, device: torch.device) -> None:
        if self.embedding_memory.device != device:
            self.embedding_memory = self.embedding_memory.to(device)
            self.label_memory = self.label_memory.to(device)
            self.queue_position = self.queue_position.to(device)
            self.queue_full = self.queue_full.to(device)

    def _next_slots(self, n: int) -> tuple[Tensor, int, bool]:
        """The ``n`` slots the next rows go to, the position after them, and whether the queue
        is then full."""
        start = int(self.queue_position)
        device = self.embedding_memory.device
        slots = (start + torch.arange(n, device=device)) % self.memory_size
        full = bool(self.queue_full) or start + n >= self.memory_size
        return slots, (start + n) % self.memory_size, full

    def _indices_tuple(
        self,
        queries: Tensor,
        query_labels: Tensor,
        ref_emb: Tensor,
        ref_labels: Tensor,
        self_index: Tensor | None,
        user_tuple: tuple[Tensor, ...] | None,
    ) -> tuple[Tensor, ...] | None:
        """The miner's (queries, memory) tuple plus the user's, or None: every pair the labels
        define (the loss then works from the label masks, self-pairs cleared)."""
        if self.miner is None and user_tuple is None:
            return None
        if self.miner is not None:
            mined: tuple[Tensor, ...] = mine_excluding_self(
                self.miner, queries, query_labels, ref_emb, ref_labels, self_index
            )
        else:
            batch = _excluding_self(
                prepare_batch(queries, query_labels, None, ref_emb, ref_labels), self_index
            )
            mined = pairs_from_masks(*batch.masks())
        if user_tuple is None:
            return mined
        assert self_index is not None  # a user tuple excludes enqueue_mask: all rows are queued
        # anchors index the batch; partners index the batch too: move them to their slots
        if len(user_tuple) == 3:
            a, p, n = user_tuple
            user: tuple[Tensor, ...] = (a, self_index[p], self_index[n])
        else:
            a1, p, a2, n = user_tuple
            user = (a1, self_index[p], a2, self_index[n])
        user = to_pairs(user) if len(mined) == 4 else pairs_to_triplets(user)
        return tuple(torch.cat([m, u]) for m, u in zip(mined, user, strict=True))
