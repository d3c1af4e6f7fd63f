"""Gathering the shards of a ``torch.distributed`` job: every rank's rows, in rank order.

Shards may have different sizes. Before any data moves, every rank checks its own input
(:func:`input_problem`) and :func:`exchange_shapes` all-gathers each rank's row counts and what
must agree across ranks (embedding size, dtype, which optional inputs were given), raising the
same ``ValueError`` on every rank when one rank's input is invalid, so that no rank is left
waiting in a collective. :func:`gather_rows` then all-gathers the rows themselves (padded to the
longest shard and cut back); :func:`gather_with_local` keeps the local rows' graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import check_embeddings, check_labels

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of processes of the default group (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def _dtype_code(t: Tensor | None) -> int:
    if t is None:
        return -1
    return _FLOAT_DTYPES.index(t.dtype) if t.dtype in _FLOAT_DTYPES else len(_FLOAT_DTYPES)


# What every rank reports before the data moves, and which of it must agree across ranks.
_HEADER = ("problem", "rows", "ref_rows", "embedding size", "dtype", "labels given",
           "ref_emb given", "ref_labels given", "enqueue_mask given")  # fmt: skip
_MUST_AGREE = _HEADER[3:]


def exchange_shapes(
    problem: str | None,
    embeddings: Tensor,
    labels: Tensor | None,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    enqueue_mask: Tensor | None,
) -> tuple[list[int], list[int]]:
    """All-gather every rank's row counts (and what must agree across ranks), then raise the same
    ``ValueError`` on every rank if any rank's input is invalid or the ranks disagree.

    Returns the per-rank numbers of embeddings and of reference embeddings.
    """
    if not isinstance(embeddings, Tensor):  # no device to talk to the others on
        raise ValueError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    values = (
        int(problem is not None),
        len(embeddings),
        0 if ref_emb is None else len(ref_emb),
        embeddings.shape[-1] if embeddings.ndim == 2 else -1,
        _dtype_code(embeddings),
        int(labels is not None),
        int(ref_emb is not None),
        int(ref_labels is not None),
        int(enqueue_mask is not None),
    )
    local = torch.tensor(values, dtype=torch.long, device=embeddings.device)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local)
    reports = [dict(zip(_HEADER, h.tolist(), strict=True)) for h in everyone]

    if problem is not None:
        raise ValueError(f"rank {dist.get_rank()}: {problem}")
    bad = [rank for rank, report in enumerate(reports) if report["problem"]]
    if bad:
        raise ValueError(f"invalid input on rank(s) {bad} (see the error raised there)")
    for name in _MUST_AGREE:
        if len({report[name] for report in reports}) > 1:
            per_rank = [report[name] for report in reports]
            raise ValueError(f"the ranks disagree on {name}: {per_rank} (in rank order)")
    return [r["rows"] for r in reports], [r["ref_rows"] for r in reports]


def gather_rows(x: Tensor, sizes: list[int]) -> list[Tensor]:
    """Every rank's ``x`` (``(sizes[r], ...)`` on rank ``r``), in rank order, without a graph.

    Shards of different sizes are padded to the largest for ``all_gather`` and cut back.
    """
    longest = max(sizes)
    padded = x.detach().new_zeros((longest, *x.shape[1:]))
    padded[: len(x)] = x.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part[:size] for part, size in zip(parts, sizes, strict=True)]


def gather_with_local(x: Tensor, sizes: list[int]) -> tuple[Tensor, int]:
    """All ranks' rows concatenated in rank order, the local rows being ``x`` itself (with its
    graph); and the offset of the local rows."""
    rank = dist.get_rank()
    parts = gather_rows(x, sizes)
    parts[rank] = x
    return torch.cat(parts), sum(sizes[:rank])


def input_problem(
    embeddings: Tensor,
    labels: Tensor | None,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    enqueue_mask: Tensor | None = None,
) -> str | None:
    """The local input's problem (as a message), checked before any collective."""
    try:
        check_embeddings(embeddings, "embeddings")
        if labels is not None:
            check_labels(labels, embeddings, "labels")
        if ref_emb is not None:
            check_embeddings(ref_emb, "ref_emb")
            if ref_emb.shape[1] != embeddings.shape[1] or ref_emb.dtype != embeddings.dtype:
                raise ValueError("ref_emb must have the embeddings' size and dtype")
        if ref_labels is not None:
            if ref_emb is None:
                raise ValueError("ref_labels were given without ref_emb")
            check_labels(ref_labels, ref_emb, "ref_labels")
        if enqueue_mask is not None and (
            not isinstance(enqueue_mask, Tensor)
            or enqueue_mask.dtype != torch.bool
            or enqueue_mask.shape != (len(embeddings),)
        ):
            raise ValueError("enqueue_mask must be a boolean tensor with one entry per embedding")
    except ValueError as error:
        return str(error)
    return None


def gather_labels(labels: Tensor | None, sizes: list[int]) -> Tensor | None:
    return None if labels is None else torch.cat(gather_rows(labels.long(), sizes))
