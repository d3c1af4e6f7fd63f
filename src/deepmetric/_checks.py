"""Input validation shared by every loss, miner and distance.

Bad input raises a ``ValueError`` that names the problem instead of failing deep inside an
indexing operation (or, worse, silently producing NaN).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_positive_int(value: object, name: str, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int above {minimum - 1}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_embeddings(embeddings: Tensor, name: str = "embeddings", magnitude: bool = True) -> None:
    """Raise ``ValueError`` unless ``embeddings`` is a finite floating ``(N, D)`` tensor whose
    distances can be computed: squared distances and inner products of ``(N, D)`` values up
    to ``m`` reach ``4 m² D``, which must stay below the largest float of the dtype they are
    computed in (float32 for float16/bfloat16/float32 inputs, float64 for float64).
    ``magnitude=False`` skips that last check, for a caller that scales rows itself (the
    index normalises rows of any magnitude exactly)."""
    if not isinstance(embeddings, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (batch_size, embedding_size), got shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {embeddings.dtype}")
    if embeddings.numel() == 0:
        return
    # one reduction answers both questions: a NaN anywhere makes the maximum NaN
    largest = float(embeddings.detach().abs().amax())
    if not math.isfinite(largest):
        raise ValueError(f"{name} contain NaN or Inf")
    if not magnitude:
        return
    computed = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    limit = math.sqrt(torch.finfo(computed).max / (4 * embeddings.shape[1]))
    if largest >= limit:
        raise ValueError(
            f"{name} hold values up to {largest:.3g}: their squared distances overflow "
            f"{str(computed).removeprefix('torch.')} (values must stay below {limit:.3g} at "
            f"dimension {embeddings.shape[1]}); scale them down or L2-normalise them"
        )


def check_labels(labels: Tensor, embeddings: Tensor, name: str = "labels") -> Tensor:
    """Validate ``labels`` against ``embeddings`` and return them as an int64 tensor.

    Labels must be a 1-D integer tensor (any integer dtype) with one entry per embedding, on the
    embeddings' device.
    """
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (batch_size,), got shape {tuple(labels.shape)}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but there are {embeddings.shape[0]} embeddings"
        )
    if labels.device != embeddings.device:
        raise ValueError(
            f"{name} are on {labels.device} but the embeddings are on {embeddings.device}"
        )
    return labels.long()


def check_indices_tuple(
    indices_tuple: tuple[Tensor, ...], n_query: int, n_ref: int
) -> tuple[Tensor, ...]:
    """Validate a miner's output: 3 (triplets) or 4 (pairs) 1-D index tensors of matching sizes."""
    if len(indices_tuple) not in (3, 4):
        raise ValueError(
            "indices_tuple must have 3 (anchor, positive, negative) or 4 (anchor1, positive, "
            f"anchor2, negative) tensors, got {len(indices_tuple)}"
        )
    out = []
    for i, idx in enumerate(indices_tuple):
        if not isinstance(idx, Tensor) or idx.ndim != 1:
            raise ValueError(f"indices_tuple[{i}] must be a 1-D tensor")
        if idx.is_floating_point():
            raise ValueError(f"indices_tuple[{i}] must be an integer tensor, got {idx.dtype}")
        out.append(idx.long())
    if len(out) == 3 and not (len(out[0]) == len(out[1]) == len(out[2])):
        raise ValueError("anchor, positive and negative indices must have the same length")
    if len(out) == 4 and (len(out[0]) != len(out[1]) or len(out[2]) != len(out[3])):
        raise ValueError("anchor/positive and anchor/negative index pairs must have equal lengths")
    bounds = (n_query, n_ref, n_ref) if len(out) == 3 else (n_query, n_ref, n_query, n_ref)
    for i, (idx, bound) in enumerate(zip(out, bounds, strict=True)):
        if idx.numel() > 0 and (int(idx.min()) < 0 or int(idx.max()) >= bound):
            raise ValueError(f"indices_tuple[{i}] has an index outside [0, {bound})")
    return tuple(out)
