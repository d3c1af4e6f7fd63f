"""Class-balanced samplers: P classes x K samples per batch.

Metric-learning losses need several samples of a class in the same batch, otherwise a batch
holds no positive pair. Two samplers build such batches:

* :class:`PKSampler` is a *batch* sampler (``DataLoader(dataset, batch_sampler=...)``) whose
  epoch visits every sample about once, has an exact, documented length, is reproducible
  (``seed`` + ``set_epoch``), resumable (``state_dict``) and splits each batch across
  distributed processes.
* :class:`MPerClassSampler` is PML 2.9.0's per-index sampler, kept for code that switches its
  imports from ``pytorch_metric_learning.samplers``.

The functional core of :class:`PKSampler` is :func:`pk_epoch`, a plain function from labels and
a random generator to the epoch's ``(B, P, K)`` index array; the sampler only adds bookkeeping.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import SupportsIndex

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

IntArray = npt.NDArray[np.int64]
Labels = Sequence[int] | npt.NDArray[np.integer] | Tensor


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def as_label_array(labels: Labels) -> IntArray:
    """Return ``labels`` (a list, numpy array or torch tensor of any integer dtype) as a 1-D int64
    numpy array; raise ``ValueError`` if they are not 1-D integers."""
    if isinstance(labels, Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
        array = labels.detach().cpu().numpy()
    else:
        array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D (num_samples,), got shape {array.shape}")
    if array.size == 0:
        raise ValueError("labels are empty")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _check_int(name: str, value: SupportsIndex, minimum: int) -> int:
    """Return ``value`` as an ``int``; raise ``ValueError`` unless it is an integer >= minimum."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if as_int < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {as_int}")
    return as_int


# ----------------------------------------------------------------------------------------------
# Functional core of PKSampler
# ----------------------------------------------------------------------------------------------


def chunks_per_class(class_sizes: IntArray, k: int) -> IntArray:
    """``m_c = ceil(n_c / K)``: how many K-sample chunks class ``c`` contributes to an epoch."""
    return -(-class_sizes // k)


def num_pk_batches(chunks: IntArray, p: int) -> int:
    """The epoch length ``B = max{b >= 0 : sum_c min(m_c, b) >= P * b}``.

    A batch takes one chunk from each of P different classes, so ``b`` batches use P*b chunks
    and at most ``b`` chunks of any class: they can be filled iff ``sum_c min(m_c, b) >= P*b``
    (sufficiency: lay the capped chunks class after class column by column into a b x P grid;
    a class holds at most b consecutive cells, hence never two cells of one row).
    ``b -> sum_c min(m_c, b) - P*b`` is concave and 0 at ``b = 0``, so the feasible ``b`` form an
    interval ``[0, B]``, found here by bisection. ``B = floor(sum_c m_c / P)`` whenever no class
    has more chunks than that.
    """
    low, high = 0, int(chunks.sum()) // p  # low is feasible, and nothing above high is
    while low < high:
        mid = (low + high + 1) // 2
        if int(np.minimum(chunks, mid).sum()) >= p * mid:
            low = mid
        else:
            high = mid - 1
    return low


def schedule_chunks(
    chunks: IntArray, p: int, num_batches: int, rng: np.random.Generator
) -> IntArray:
    """Pick the P classes of each batch; return ``(num_batches, P)`` chunk ids.

    Chunk ids number the chunks class after class: class ``c`` owns ids
    ``offset_c, ..., offset_c + m_c - 1`` and hands them out in that order.

    Classes race for places in batches: each class's next turn comes after an exponential
    wait whose rate is the number of chunks it has left, and a batch takes the P classes whose
    turns come first. By memorylessness this draws each batch's classes one after another with
    probability proportional to their chunks left, so large classes are spread over the whole
    epoch. One rule keeps the epoch at exactly ``num_batches`` batches: with R batches to go,
    call ``slack = sum_c min(left_c, R) - P*R`` (>= 0) and "full" the classes with
    ``left_c >= R``. Skipping a full class in this batch costs one unit of slack, so at least
    ``#full - slack`` full classes (never more than P) jump the queue: those whose turns come
    first.
    """
    left = chunks.copy()
    offsets = np.cumsum(chunks) - chunks
    turn = rng.standard_exponential(len(left)) / left  # each class's next turn
    now = 0.0
    out = np.empty((num_batches, p), dtype=np.int64)
    for step in range(num_batches):
        to_go = num_batches - step
        slack = int(np.minimum(left, to_go).sum()) - p * to_go
        full = np.flatnonzero(left >= to_go)
        n_forced = len(full) - slack
        keys = turn.copy()
        if n_forced > 0:
            keys[full[np.argsort(keys[full])[:n_forced]]] = -np.inf
        # Turns come at a total rate of sum(left), so the next P almost surely come (besides
        # overdue ones) within 4P / sum(left) after now; partitioning only those candidates
        # instead of all classes is what keeps 10^5 classes fast.
        candidates = np.flatnonzero(keys <= now + 4 * p / int(left.sum()))
        if len(candidates) < p:
            candidates = np.arange(len(keys))
        chosen = candidates[np.argpartition(keys[candidates], p - 1)[:p]]
        out[step] = offsets[chosen] + (chunks[chosen] - left[chosen])
        left[chosen] -= 1
        now = max(now, float(turn[chosen].max()))
        with np.errstate(divide="ignore"):  # a used-up class waits forever
            turn[chosen] = now + rng.standard_exponential(p) / left[chosen]
    return out


def pk_epoch(labels: IntArray, p: int, k: int, rng: np.random.Generator) -> IntArray:
    """One epoch of P x K batches: a ``(B, P, K)`` array of sample indices.

    1. Every class's indices are shuffled and cut into ``m_c = ceil(n_c / K)`` chunks of K.
       The last chunk is filled up by wrapping around to the start of the shuffled list, so a
       class with ``n_c >= K`` never repeats a sample inside a chunk and a class with
       ``n_c < K`` is drawn with replacement: each of its samples fills ``floor(K / n_c)`` or
       ``ceil(K / n_c)`` of the K slots.
    2. :func:`schedule_chunks` groups chunks of P different classes into
       ``B = num_pk_batches(m, P)`` batches. Unused chunks (fewer than P of them unless a class
       has more than ``floor(sum_c m_c / P)`` chunks) are a random subset, so they differ from
       epoch to epoch.

    ``labels`` is ``(N,)`` int64 with at least P distinct values.
    """
    _, codes, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    # all indices in random order, then stably grouped by class: each class's block is shuffled
    order = rng.permutation(len(labels))
    order = order[np.argsort(codes[order], kind="stable")]
    class_start = np.cumsum(sizes) - sizes

    chunks = chunks_per_class(sizes, k)
    slots = chunks * k  # the class's padded length
    slot_class = np.repeat(np.arange(len(sizes)), slots)
    slot_in_class = np.arange(int(slots.sum())) - np.repeat(np.cumsum(slots) - slots, slots)
    cyclic = slot_in_class % sizes[slot_class]  # wrap around to fill the last chunk
    all_chunks = order[class_start[slot_class] + cyclic].reshape(-1, k)

    batch_chunks = schedule_chunks(chunks, p, num_pk_batches(chunks, p), rng)
    return all_chunks[batch_chunks]


def _distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fill a missing rank/world size from ``torch.distributed`` when it is initialised."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    return rank, world_size


# ----------------------------------------------------------------------------------------------
# PKSampler
# ----------------------------------------------------------------------------------------------


class PKSampler(Sampler[list[int]]):
    """Batch sampler yielding P classes x K samples per batch, each sample about once an epoch.

    Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person Re-Identification",
    2017 (P x K batches). Use as ``DataLoader(dataset, batch_sampler=PKSampler(labels, p, k))``.

    Shapes: ``labels`` ``(N,)`` (list, numpy array or tensor of any integer dtype); each
    yielded batch is a list of ``P * K / world_size`` dataset indices, K consecutive indices per
    class (``labels[batch]`` reads ``c1 * K, c2 * K, ...``).

    **Epoch.** Each class's samples are shuffled and cut into ``m_c = ceil(n_c / K)`` chunks of
    K; a batch takes one chunk from P distinct classes, so a class appears in batches in
    proportion to its size. The epoch length is exact and equals ``len(sampler)``::

        B = max{ b >= 0 : sum_c min(m_c, b) >= P * b }

    which is ``floor(sum_c m_c / P)`` unless one class holds more than that many chunks (then
    it is capped at one chunk per batch). Fewer than P chunks are left out of an epoch in the
    uncapped case, chosen at random so that they change every epoch. Samples of a class with
    ``n_c >= K`` appear once, or twice when they fill up the class's last chunk (exactly once
    when K divides ``n_c``). A class with ``n_c < K`` samples is drawn with replacement: its
    single chunk repeats each sample ``floor(K / n_c)`` or ``ceil(K / n_c)`` times.

    **Reproducibility.** The batches depend only on ``labels, p, k, seed`` and the epoch: the
    same seed and ``set_epoch(e)`` give the same batches. An iteration that runs to the end
    advances the epoch by one, so forgetting ``set_epoch`` does not repeat an epoch; calling
    it every epoch (as with ``DistributedSampler``) gives the same result.

    **Distributed.** With ``world_size`` processes (default: from ``torch.distributed`` when
    initialised, else 1), every process builds the same global P x K batches (so ``seed`` must
    be equal on all ranks) and rank ``r`` takes the classes ``r * P / W`` to
    ``(r + 1) * P / W - 1`` of each: the split is of *classes*, so each process's batch of
    ``P / W`` classes x K samples still holds positive pairs. ``P`` must be divisible by
    ``world_size``. Shares are disjoint, of equal size, and all ranks yield ``B`` batches.

    **Resuming.** ``state_dict()`` returns ``{"seed", "epoch", "position", "num_batches"}``
    (plain ints, JSON-serialisable); ``position`` counts the global batches already yielded in
    the current epoch. ``load_state_dict`` makes the next iteration continue at that batch,
    giving exactly the batches an uninterrupted run would. A ``DataLoader`` with workers
    fetches a few batches ahead of the training loop; for an exact resume there, store the
    number of batches the loop actually consumed as ``position``.

    Args:
        labels: class of each dataset sample, ``(N,)``; at least ``p`` distinct classes.
        p: classes per global batch.
        k: samples per class in a batch.
        seed: base seed of the shuffle, equal on all ranks.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of processes sharing each global batch.
    """

    def __init__(
        self,
        labels: Labels,
        p: int,
        k: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.labels = as_label_array(labels)
        self.p = _check_int("p", p, 1)
        self.k = _check_int("k", k, 1)
        self.seed = _check_int("seed", seed, 0)
        sizes = np.unique(self.labels, return_counts=True)[1]
        if len(sizes) < self.p:
            raise ValueError(
                f"labels have {len(sizes)} distinct classes, fewer than p={self.p} per batch"
            )
        rank, world_size = _distributed_defaults(rank, world_size)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size={self.world_size}, got {self.rank}")
        if self.p % self.world_size != 0:
            raise ValueError(
                f"p={self.p} classes cannot be split evenly across world_size={self.world_size}"
                " processes; p must be a multiple of world_size"
            )
        self.num_batches = num_pk_batches(chunks_per_class(sizes, self.k), self.p)
        self._epoch = 0
        self._position = 0  # global batches yielded so far in the current epoch
        self._resume = False  # True after load_state_dict: next iteration starts at _position

    @property
    def batch_size(self) -> int:
        """Samples per yielded batch on this process: ``P * K / world_size``."""
        return self.p * self.k // self.world_size

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next iteration uses (a pending resume of the same
        epoch is kept)."""
        epoch = _check_int("epoch", epoch, 0)
        if epoch != self._epoch:
            self._epoch, self._position, self._resume = epoch, 0, False

    def epoch_batches(self, epoch: int) -> IntArray:
        """The global batches of ``epoch``: ``(B, P, K)`` indices, identical on all ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        return pk_epoch(self.labels, self.p, self.k, rng)

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self._epoch
        start = self._position if self._resume else 0
        self._position, self._resume = start, False
        share = self.p // self.world_size
        mine = self.epoch_batches(epoch)[:, self.rank * share : (self.rank + 1) * share]
        for i in range(start, self.num_batches):
            self._position = i + 1
            yield mine[i].reshape(-1).tolist()
        self._epoch, self._position = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Where the sampler stands: JSON-serialisable ints, see the class docstring."""
        return {
            "seed": self.seed,
            "epoch": self._epoch,
            "position": self._position,
            "num_batches": self.num_batches,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from ``state`` on the next iteration; ``ValueError`` if it does not fit."""
        missing = {"seed", "epoch", "position", "num_batches"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        if state["num_batches"] != self.num_batches:
            raise ValueError(
                f"state was saved for an epoch of {state['num_batches']} batches but this "
                f"sampler has {self.num_batches}: labels, p or k differ"
            )
        position = _check_int("position", state["position"], 0)
        if position > self.num_batches:
            raise ValueError(f"position {position} is past the epoch's {self.num_batches}")
        self.seed = _check_int("seed", state["seed"], 0)
        self._epoch = _check_int("epoch", state["epoch"], 0)
        self._position, self._resume = position, True


# ----------------------------------------------------------------------------------------------
# MPerClassSampler (PML 2.9.0)
# ----------------------------------------------------------------------------------------------


class MPerClassSampler(Sampler[int]):
    """PML 2.9.0's sampler: yields dataset indices, ``m`` per class in consecutive groups.

    Hermans, Beyer & Leibe, 2017 (P x K batches); same signature, defaults, attributes and
    random stream as ``pytorch_metric_learning.samplers.MPerClassSampler``: with the same
    ``np.random`` state (the sampler draws from numpy's global generator, as PML does) it yields
    the same indices. Use with ``DataLoader(dataset, batch_size=batch_size, sampler=...)``.

    Shapes: ``labels`` ``(N,)``; ``len(sampler)`` indices per iteration.

    Each pass shuffles the classes and, for each class in turn (the first
    ``batch_size // m`` of them when ``batch_size`` is given, else all), yields ``m`` of its
    indices, drawn without replacement, or with replacement when the class has fewer than
    ``m``. Passes repeat until ``len(sampler)`` indices: ``length_before_new_iter`` rounded down
    to a multiple of ``batch_size`` (or of ``m * num_classes`` when that is smaller).

    Relation to :class:`PKSampler`: ``MPerClassSampler(labels, m=K, batch_size=P*K)`` gives
    batches of the same P x K shape, but its classes are drawn uniformly regardless of size and
    its samples independently per batch, so an "epoch" of ``length_before_new_iter`` indices
    covers no particular fraction of the data; it has no seed, ``set_epoch``, resume or
    distributed split. Prefer :class:`PKSampler` in new code.

    Deviations from PML: bad arguments raise ``ValueError`` (PML asserts); when
    ``batch_size`` is None and ``length_before_new_iter < m * num_classes``, PML's iterator
    yields a whole pass of ``m * num_classes`` indices although ``len()`` says fewer; this one
    stops at ``len()``. Indices are Python ints (PML: numpy ints).

    Args:
        labels: class of each dataset sample, ``(N,)``.
        m: samples per class in each group.
        batch_size: the DataLoader's batch size; when given, each batch holds
            ``batch_size // m`` classes x m (``m`` must divide it).
        length_before_new_iter: indices per iteration (before rounding).
    """

    def __init__(
        self,
        labels: Labels,
        m: int,
        batch_size: int | None = None,
        length_before_new_iter: int = 100000,
    ) -> None:
        labels_array = as_label_array(labels)
        self.m_per_class = _check_int("m", m, 1)
        self.batch_size = None if batch_size is None else _check_int("batch_size", batch_size, 1)
        list_size = _check_int("length_before_new_iter", length_before_new_iter, 1)

        # classes in order of first appearance (PML's dict order), indices ascending
        classes, first_index, sizes = np.unique(labels_array, return_index=True, return_counts=True)
        by_class = np.split(np.argsort(labels_array, kind="stable"), np.cumsum(sizes)[:-1])
        appearance = np.argsort(first_index)
        self.labels_to_indices: dict[int, IntArray] = {
            int(classes[c]): by_class[c] for c in appearance
        }
        self.labels: list[int] = list(self.labels_to_indices)
        self.length_of_single_pass = self.m_per_class * len(self.labels)

        if self.batch_size is None:
            if self.length_of_single_pass < list_size:
                list_size -= list_size % self.length_of_single_pass
        else:
            if list_size < self.batch_size:
                raise ValueError(
                    f"length_before_new_iter={list_size} must be >= batch_size={self.batch_size}"
                )
            if self.length_of_single_pass < self.batch_size:
                raise ValueError(
                    f"m * (number of classes) = {self.length_of_single_pass} must be >= "
                    f"batch_size={self.batch_size}"
                )
            if self.batch_size % self.m_per_class != 0:
                raise ValueError(f"m={self.m_per_class} must divide batch_size={self.batch_size}")
            list_size -= list_size % self.batch_size
        self.list_size = list_size

    def __len__(self) -> int:
        return self.list_size

    def calculate_num_iters(self) -> int:
        """Passes over the (shuffled) classes per iteration."""
        per_pass = self.length_of_single_pass if self.batch_size is None else self.batch_size
        return self.list_size // per_pass if per_pass < self.list_size else 1

    def __iter__(self) -> Iterator[int]:
        m = self.m_per_class
        out: list[int] = []
        for _ in range(self.calculate_num_iters()):
            # numpy's global generator, in place and carried over to the next iteration: PML's
            # random stream, so np.random.seed reproduces PML's indices
            np.random.shuffle(self.labels)  # noqa: NPY002
            classes = (
                self.labels if self.batch_size is None else self.labels[: self.batch_size // m]
            )
            for label in classes:
                indices = self.labels_to_indices[label]
                drawn = np.random.choice(indices, size=m, replace=len(indices) < m)  # noqa: NPY002
                out.extend(drawn.tolist())
        return iter(out[: self.list_size])
