"""A loss's or miner's validated inputs: queries, references, labels, a miner's tuple."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_embeddings, check_indices_tuple, check_labels
from .masks import (
    label_masks,
    masks_from_indices,
)


@dataclass
class Batch:
    """Validated inputs of one loss call.

    ``ref_emb``/``ref_labels`` are the queries themselves unless the caller passed a separate
    reference set; ``same_source`` records which, since a sample is never its own positive.

    A separate reference set may still hold copies of the queries (the batch just written into a
    cross-batch memory, or this process's shard of a gathered batch): ``self_index[i]`` is then
    the column of query ``i``'s copy (``-1`` for none), and that pair is never a positive (nor
    a negative: same label). Set by
    :func:`~deepmetric.losses.cross_batch_memory.loss_excluding_self`.
    """

    embeddings: Tensor  # (B, D)
    labels: Tensor | None  # (B,) int64
    ref_emb: Tensor  # (R, D)
    ref_labels: Tensor | None  # (R,) int64
    same_source: bool
    indices_tuple: tuple[Tensor, ...] | None
    self_index: Tensor | None = None  # (B,) int64

    def masks(self) -> tuple[Tensor, Tensor]:
        """Boolean ``(B, R)`` positive and negative masks: from the miner's tuple if given,
        otherwise every pair the labels define; never a query with its own copy."""
        n_query, n_ref = len(self.embeddings), len(self.ref_emb)
        if self.indices_tuple is not None:
            pos_mask, neg_mask = masks_from_indices(
                self.indices_tuple, n_query, n_ref, self.embeddings.device
            )
        else:
            assert self.labels is not None and self.ref_labels is not None
            pos_mask, neg_mask = label_masks(self.labels, self.ref_labels, self.same_source)
        if self.self_index is not None:
            rows, cols = self.self_pairs()
            pos_mask[rows, cols] = False
        return pos_mask, neg_mask

    def self_pairs(self) -> tuple[Tensor, Tensor]:
        """The ``(n,)`` rows and columns of the queries that have a copy among the references
        (see ``self_index``); empty when none has."""
        if self.self_index is None:
            empty = self.embeddings.new_empty(0, dtype=torch.long)
            return empty, empty
        rows = torch.where(self.self_index >= 0)[0]
        return rows, self.self_index[rows]


def prepare_batch(
    embeddings: Tensor,
    labels: Tensor | None,
    indices_tuple: tuple[Tensor, ...] | None,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    requires_labels: bool = False,
) -> Batch:
    """Validate a loss's (or miner's) inputs; raise ``ValueError`` naming any problem.

    Labels are needed unless a miner's ``indices_tuple`` says which pairs to use; with
    ``requires_labels`` (classification and proxy losses) they are needed in any case.
    """
    check_embeddings(embeddings, "embeddings")
    if labels is not None:
        labels = check_labels(labels, embeddings, "labels")
    elif requires_labels:
        raise ValueError("labels are required by this loss")
    elif indices_tuple is None:
        raise ValueError("labels are required when no indices_tuple is given")
    # passing the embeddings themselves as ref_emb (PML code does) is the same as passing nothing
    if ref_emb is embeddings and ref_labels is labels:
        ref_emb, ref_labels = None, None
    same_source = ref_emb is None
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels were given without ref_emb")
        ref_emb, ref_labels = embeddings, labels
    else:
        check_embeddings(ref_emb, "ref_emb")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb has dimension {ref_emb.shape[1]} but embeddings have "
                f"{embeddings.shape[1]}"
            )
        if ref_emb.dtype != embeddings.dtype:
            raise ValueError(
                f"ref_emb is {ref_emb.dtype} but embeddings are {embeddings.dtype}: pass both in "
                "one dtype (e.g. ref_emb.to(embeddings.dtype))"
            )
        if ref_emb.device != embeddings.device:
            raise ValueError(
                f"ref_emb is on {ref_emb.device} but embeddings are on {embeddings.device}"
            )
        if ref_labels is not None:
            ref_labels = check_labels(ref_labels, ref_emb, "ref_labels")
        elif labels is not None and indices_tuple is None:
            raise ValueError("ref_labels are required with ref_emb when labels are given")
    if indices_tuple is not None:
        indices_tuple = check_indices_tuple(indices_tuple, len(embeddings), len(ref_emb))
        indices_tuple = tuple(idx.to(embeddings.device) for idx in indices_tuple)
    return Batch(embeddings, labels, ref_emb, ref_labels, same_source, indices_tuple)
