"""The ``(B, R)`` distance matrix of the fusable distances, a block of rows (or a tile) at a
time, and the comparisons made on it before any square root."""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ..distances import (
    BaseDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    _to_float32,
)
from .batch import Batch

# Entries of one block of rows on the CPU, per thread: 2**17 float32 entries (512 KiB) stay in a
# core's L2 cache, and are small enough for malloc to hand the same memory back block after block
# (a fresh page costs a page fault, which on a virtual machine can cost more than the arithmetic
# on it). Each thread takes its share of every operation: the block grows with the threads.
BLOCK_ELEMENTS = 1 << 17
# On an accelerator, where each operation is a kernel launch, blocks are as large as memory
# comfortably allows (the whole matrix up to B = R = 4096).
ACCELERATOR_BLOCK_ELEMENTS = 1 << 24


def row_blocks(n_rows: int, n_cols: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the successive blocks of rows of an ``(n_rows, n_cols)`` matrix on
    ``device``: on the CPU as few blocks of equal height as hold at most ``BLOCK_ELEMENTS`` per
    thread each, on an accelerator blocks of ``ACCELERATOR_BLOCK_ELEMENTS`` entries; at least
    one row."""
    n_cols = max(1, n_cols)
    if device.type != "cpu":
        step = ACCELERATOR_BLOCK_ELEMENTS // n_cols
    else:
        n_blocks = -(-n_rows * n_cols // cpu_block_elements())
        step = -(-n_rows // max(1, n_blocks))
    step = max(1, step)
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def cpu_block_elements() -> int:
    """Entries of one block of rows (or one square tile) on the CPU: ``BLOCK_ELEMENTS`` per
    thread (read at each call, so that tests can make blocks small)."""
    return BLOCK_ELEMENTS * max(1, torch.get_num_threads())


def full_precision(device: torch.device) -> torch.autocast:
    """Autocast off: the fast paths compute in the precision of their inputs (float32 for half
    precision embeddings, see :func:`as_compared`), as the distances do."""
    return torch.autocast(device.type, enabled=False)


# -- the distance matrix, a block at a time ------------------------------------------------------


class MatrixKind(enum.Enum):
    """How a fusable distance computes its matrix from (normalised) embeddings."""

    EUCLIDEAN = "||q - r||"
    SQUARED_EUCLIDEAN = "||q - r||^2"
    INNER_PRODUCT = "q . r"


def fused_matrix_kind(distance: BaseDistance) -> MatrixKind | None:
    """The :class:`MatrixKind` of ``distance``, or ``None`` when the blockwise path cannot compute
    it (another ``p`` or ``power``, or a subclass that may compute its matrix differently)."""
    if type(distance) is LpDistance and distance.p == 2:
        if distance.power == 1:
            return MatrixKind.EUCLIDEAN
        if distance.power == 2:
            return MatrixKind.SQUARED_EUCLIDEAN
        return None
    if type(distance) in (CosineSimilarity, DotProductSimilarity) and distance.power == 1:
        return MatrixKind.INNER_PRODUCT
    return None


def compute_dtype(embeddings: Tensor) -> torch.dtype:
    """The dtype a distance computes the matrix of ``embeddings`` in: float32 for half
    precision, else their own."""
    return _to_float32(embeddings[:0]).dtype


def as_compared(distance: BaseDistance, embeddings: Tensor) -> Tensor:
    """``(N, D)`` embeddings as ``distance`` compares them (through autograd): float32 for half
    precision, normalised if the distance normalises. No validation: for inputs already
    checked (e.g. by :func:`~deepmetric.losses.base.prepare_batch`)."""
    with torch.autocast(embeddings.device.type, enabled=False):
        return distance.maybe_normalize(_to_float32(embeddings))


def matrix_to_unit_reference(distance: BaseDistance, query: Tensor, unit_ref: Tensor) -> Tensor:
    """The ``(B, C)`` matrix of ``distance`` from ``(B, D)`` queries to the ``(D, C)`` columns
    ``unit_ref``, already of unit norm (a classifier's normalised class weights).

    For a plain inner product it is one product, without normalising the columns a second
    time; any other distance computes its own matrix.
    """
    if fused_matrix_kind(distance) is MatrixKind.INNER_PRODUCT:
        return distance.maybe_normalize(query) @ unit_ref
    return distance(query, unit_ref.t())


def normalized_inputs(distance: BaseDistance, batch: Batch) -> tuple[Tensor, Tensor]:
    """The embeddings and reference embeddings of ``batch`` as ``distance`` compares them (see
    :func:`as_compared`). With no separate reference set the two are the same tensor."""
    query = as_compared(distance, batch.embeddings)
    return query, query if batch.same_source else as_compared(distance, batch.ref_emb)


class MatrixBlocks:
    """The ``(B, R)`` matrix of a :class:`MatrixKind` between ``(B, D)`` queries and ``(R, D)``
    references (as :func:`normalized_inputs` gives them), one block of rows at a time.

    When the references are the queries (``same_source``), a sample's Euclidean distance to
    itself is exactly 0.
    """

    def __init__(self, kind: MatrixKind, query: Tensor, ref: Tensor, same_source: bool) -> None:
        self.kind = kind
        self.query = query
        self.ref = ref
        self.same_source = same_source
        # (1, R) squared norms of the references, for the Euclidean kinds
        self.ref_sq = None if kind is MatrixKind.INNER_PRODUCT else (ref * ref).sum(1)[None]
        self._buffer: Tensor | None = None

    def bounds(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of each block of rows (see :func:`row_blocks`)."""
        return row_blocks(len(self.query), len(self.ref), self.query.device)

    def rows(self, start: int, stop: int, root: bool = True) -> Tensor:
        """Rows ``start:stop`` of the matrix, ``(stop - start, R)``, written into the same memory
        block after block (fresh memory costs page faults): the caller keeps nothing of the
        returned tensor beyond the current block. For ``root`` see :meth:`tile`."""
        return self.tile(start, stop, 0, len(self.ref), root)

    def tile(self, r0: int, r1: int, c0: int, c1: int, root: bool = True) -> Tensor:
        """Entries ``[r0:r1, c0:c1]`` of the matrix, in the same reused memory as :meth:`rows`
        (the first request must be the largest). ``root=False`` leaves a Euclidean matrix
        squared (see :func:`root_bound` and :func:`distances_`)."""
        query, ref = self.query[r0:r1], self.ref[c0:c1]
        size = len(query) * len(ref)
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = self.query.new_empty(size)
        out = self._buffer[:size].view(len(query), len(ref))
        if self.ref_sq is None:
            return torch.mm(query, ref.t(), out=out)
        # |r|² - 2 q·r + |q|² (distances.euclidean_matrix: the same up to rounding)
        mat = torch.addmm(self.ref_sq[:, c0:c1], query, ref.t(), alpha=-2.0, out=out)
        mat.add_((query * query).sum(dim=1, keepdim=True)).clamp_min_(0)
        if self.same_source:  # a sample's distance to itself: entries with r0 + i == c0 + j
            mat.diagonal(offset=r0 - c0).fill_(0)
        return distances_(self.kind, mat) if root else mat


def distances_(kind: MatrixKind, compared: Tensor) -> Tensor:
    """The entries of a matrix of ``kind`` from :meth:`MatrixBlocks.tile` with ``root=False``
    (their squares, for :attr:`MatrixKind.EUCLIDEAN`), in place."""
    return compared.sqrt_() if kind is MatrixKind.EUCLIDEAN else compared


def closer_than(kind: MatrixKind, compared: Tensor, margin: float, inverted: bool) -> Tensor:
    """The boolean mask of the entries of a block from :meth:`MatrixBlocks.tile` with
    ``root=False`` that are closer than ``margin``: a distance below it, or a similarity
    (``inverted``) above it. A Euclidean block is compared while still squared
    (:func:`root_bound`: the same entries)."""
    if inverted:
        return compared > margin
    if kind is MatrixKind.EUCLIDEAN:
        return compared < root_bound(margin, compared.dtype)
    return compared < margin


@functools.lru_cache(maxsize=64)
def root_bound(bound: float, dtype: torch.dtype) -> float:
    """The least ``x`` of ``dtype`` whose square root (rounded to ``dtype``) is at least
    ``bound`` (rounded to ``dtype``, as a comparison with a tensor of that type rounds it): for
    every ``x >= 0`` of ``dtype``, ``sqrt(x) < bound`` exactly when ``x < root_bound(bound)``.
    A Euclidean matrix is compared with a margin while still squared, and only the entries
    that pass get their square root; the outcome is the same, bit for bit."""
    target = torch.tensor(bound, dtype=dtype)
    if not bool(target > 0):  # every root is >= 0 (and nothing compares with NaN)
        return 0.0 if bool(target <= 0) else bound
    x = target * target
    inf = torch.tensor(math.inf, dtype=dtype)
    while bool(torch.sqrt(x) >= target):  # rounding may have overshot: step down ...
        x = torch.nextafter(x, -inf)
    while bool(torch.sqrt(x) < target):  # ... then up to the least x that passes
        x = torch.nextafter(x, inf)
    return float(x)
