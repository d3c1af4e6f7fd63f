"""A searchable, editable store of embeddings: what a trained metric-learning model is used for.

A face database that enrols a new person from one photo, a product search whose catalogue
changes every season: the model is trained once, and afterwards items are embedded and added to
(or removed from) an index that answers "which stored items are nearest to this query?" --
no retraining needed. :class:`EmbeddingIndex` is that index, on top of faiss
(Johnson, Douze & Jégou, "Billion-scale similarity search with GPUs", 2017)::

    index = EmbeddingIndex.flat(embedding_size=128)          # exact search
    index.add_from_model(model, gallery.x, gallery.labels)   # embeds in batches, then adds
    index.add(new_embedding, torch.tensor([label]))          # one more person, no retraining
    index.remove(torch.tensor([17]))                         # and one less
    result = index.search(embed(model, queries), k=10)       # result.ids / .labels / .distances
    index.save("faces.index")
    index = EmbeddingIndex.load("faces.index", expected_fingerprint=model_fingerprint(model))

Three kinds of index, each a factory classmethod:

* :meth:`EmbeddingIndex.flat`: exact (brute-force) search. The right choice up to about a million
  items; removal is physical (``faiss.IndexIDMap2`` over ``IndexFlat``).
* :meth:`EmbeddingIndex.ivf`: inverted file (Sivic & Zisserman, 2003; Jégou, Douze & Schmid,
  2011): a k-means coarse quantizer with ``nlist`` cells, a query scans the ``nprobe`` nearest
  cells. Trained on the first batch added (or an explicit :meth:`~EmbeddingIndex.train`);
  removal is physical. :meth:`~EmbeddingIndex.compact` re-trains the cells on the current items,
  for when the catalogue has drifted away from what the cells were trained on.
* :meth:`EmbeddingIndex.hnsw`: hierarchical navigable small-world graph (Malkov & Yashunin,
  2018), ``M`` links per node, ``efSearch`` candidates per query. faiss cannot delete a node from
  the graph, so :meth:`~EmbeddingIndex.remove` marks it as a *tombstone*: it keeps routing
  searches but is filtered out of every result (a faiss ``IDSelector`` passed to the search, so
  a query still gets ``k`` live results). Tombstones cost memory and some speed;
  :meth:`~EmbeddingIndex.compact` rebuilds the graph from the live items only.

Distances are faiss's: ``"l2"`` gives *squared* Euclidean distances (smaller is closer),
``"inner_product"`` gives inner products (larger is closer; cosine similarities when the index
normalises, the default -- PML's default distance normalises too, and for unit vectors the two
metrics rank identically).

Embeddings are checked before they are stored or searched: finite, floating point, and of a
magnitude float32 distances can represent (see :meth:`~EmbeddingIndex.add`); anything else is a
``ValueError`` rather than a silently wrong neighbour.

:meth:`~EmbeddingIndex.save` writes a directory of three files, each covered by a SHA-256 that
:meth:`~EmbeddingIndex.load` verifies (so a flipped byte or an edited digit anywhere is a
``ValueError`` naming the file, never a silently different index):

* ``index-<random>.faiss``: the faiss index in faiss's own format;
* ``items-<random>.json``: the ids, labels, sources and HNSW slots of the items;
* ``manifest.json``: the settings, the model's fingerprint, the class names, the name, size and
  SHA-256 of the two files above, and the SHA-256 of the manifest's own content.

The checksums catch accidents and edits; they are not a signature (anyone can recompute them).

A save touches only files it owns. The two data files get fresh random names (created
exclusively, so nothing of the user's is overwritten) and are referenced by nothing until
``manifest.json`` is replaced, last, by renaming a uniquely named temporary file over it; the
files the previous manifest named are then deleted, and nothing else. Before writing, the save
records the names it is about to create in the previous manifest (``pending``), so that the
leftovers of a save killed half-way are known to be the index's own and the next save deletes
them (a first save into a folder has no manifest to record them in: killed, it leaves them). A
crash anywhere in a save leaves the previous index loadable. No pickle is involved.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import check_embeddings, check_labels
from .io import fsync_directory

# faiss's bundled type stubs lag behind its SWIG API (no SearchParametersHNSW, no DirectMap, no
# array constructor for IDSelectorBitmap), so it is used untyped.
faiss: Any = importlib.import_module("faiss")

__all__ = ["EmbeddingIndex", "SearchResult", "embed", "model_fingerprint"]

Kind = Literal["flat", "ivf", "hnsw"]
Metric = Literal["auto", "l2", "inner_product"]
ArrayLike = Tensor | np.ndarray | Sequence[int] | Sequence[float]

FORMAT_NAME = "deepmetric.EmbeddingIndex"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
# The names a save gives its data files (format 1 used 16 hex digits of the checksum): only
# files of these names that a verified manifest lists are ever deleted by a save.
_OWNED_FILE = re.compile(r"(index-[0-9a-f]{16,32}\.faiss|items-[0-9a-f]{32}\.json)")

# Without normalisation, faiss computes squared L2 distances (||x||^2 + ||q||^2 - 2 x.q, or
# sums of squared differences) and inner products in float32. Vector norms in
# [_MIN_NORM, _MAX_NORM] keep every such quantity within float32's normal range: (2^62 + 2^62)^2
# = 2^126 < 2^128 (the float32 overflow), and 2^-63 squared is 2^-126, the smallest normal
# float32. Outside it squared distances overflow to inf or underflow to 0 and the ranking is
# noise.
_MAX_NORM = 2.0**62
_MIN_NORM = 2.0**-63

_FAISS_METRICS = {"l2": faiss.METRIC_L2, "inner_product": faiss.METRIC_INNER_PRODUCT}


@dataclass(frozen=True)
class SearchResult:
    """The ``k`` nearest stored items of each of ``Nq`` queries, nearest first.

    * ``ids``: ``(Nq, k)`` int64; ``-1`` where fewer than ``k`` items could be returned;
    * ``labels``: ``(Nq, k)`` int64, the label stored with each id; ``-1`` where ``ids`` is
      ``-1`` (a label may itself be ``-1``: test ``ids``, not ``labels``, for padding);
    * ``distances``: ``(Nq, k)`` float32, squared Euclidean distances for an ``"l2"`` index
      (padding ``+inf``), inner products for an ``"inner_product"`` one (padding ``-inf``).
    """

    ids: Tensor
    labels: Tensor
    distances: Tensor


# -- a model's embeddings and identity ---------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of ``model``'s ``state_dict``: names, dtypes, shapes and the raw bytes of
    every parameter and buffer. Two models produce the same embeddings if their fingerprints
    match; an index records the fingerprint of the model that filled it."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if not isinstance(value, Tensor):
            digest.update(f"{name}\0{value!r}\0".encode())
            continue
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


@torch.no_grad()
def embed(
    model: nn.Module,
    inputs: Tensor | np.ndarray,
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> Tensor:
    """Embed ``inputs`` ``(N, ...)`` with ``model`` -> ``(N, D)`` float32 on the CPU.

    Runs in evaluation mode (restoring the model's mode afterwards), without autograd, in
    batches of ``batch_size`` moved to the model's device, with a tqdm progress bar.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    data = torch.from_numpy(inputs) if isinstance(inputs, np.ndarray) else inputs
    if not isinstance(data, Tensor) or data.ndim < 1:
        raise ValueError("inputs must be a tensor or array of shape (N, ...)")
    device = _model_device(model)
    chunks: list[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(data), desc="embedding", unit="sample", disable=not progress) as bar:
            for start in range(0, len(data), batch_size):
                batch = data[start : start + batch_size].to(device)
                out = model(batch)
                if not isinstance(out, Tensor) or out.ndim != 2 or len(out) != len(batch):
                    raise ValueError(
                        f"the model must map a batch of {len(batch)} inputs to a "
                        f"({len(batch)}, embedding_size) tensor, got "
                        f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
                    )
                chunks.append(out.float().cpu())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


# -- input conversion ----------------------------------------------------------------------------


def _as_tensor(values: ArrayLike, name: str) -> Tensor:
    if isinstance(values, Tensor):
        return values.detach().cpu()
    array = np.asarray(values)
    if array.dtype == object:
        raise ValueError(f"{name} must be a tensor, an array or a sequence of numbers")
    if array.size == 0 and array.dtype.kind == "f" and not isinstance(values, np.ndarray):
        array = array.astype(np.int64)  # an empty list is a valid (empty) id/label list
    return torch.from_numpy(np.ascontiguousarray(array))


def _as_ids(values: ArrayLike, name: str) -> np.ndarray:
    """A 1-D array of non-negative int64 ids (faiss reserves ``-1`` for "no result")."""
    ids = _as_tensor(values, name)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    array = ids.long().numpy()
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must be non-negative, got {int(array.min())}")
    return array


def _as_sources(sources: Sequence[str | None] | None, n: int) -> np.ndarray:
    """``n`` sources (strings, or ``None`` for "unknown") as an object array; ``ValueError`` for
    a wrong count, a non-string, an empty string or a repeat."""
    if sources is None:
        return np.full(n, None, dtype=object)
    if isinstance(sources, str | bytes):
        raise ValueError("sources must be a sequence of strings, one per item, not one string")
    values = list(sources)
    if len(values) != n:
        raise ValueError(f"sources has {len(values)} entries but there are {n} items")
    for value in values:
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"each source must be a non-empty string or None, got {value!r}")
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"sources must be unique, repeated: {value!r}")
        if value is not None:
            seen.add(value)
    array = np.empty(n, dtype=object)
    array[:] = values
    return array


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _few(values: np.ndarray) -> str:
    shown = ", ".join(str(int(v)) for v in values[:5])
    return shown + (f", ... ({len(values)} in all)" if len(values) > 5 else "")


# -- the index -----------------------------------------------------------------------------------


def _faiss_search(index: Any, vectors: np.ndarray, k: int, params: Any) -> tuple[Any, Any]:
    """``index.search`` with search parameters, also when ``faiss.contrib.torch_utils`` (which
    pytorch-metric-learning imports) has replaced ``search`` by a version without ``params``:
    the original numpy method is then kept as ``search_numpy``."""
    search = getattr(index, "search_numpy", index.search)
    return search(vectors, k, params=params)


class EmbeddingIndex:
    """Nearest-neighbour search over ``(N, D)`` embeddings, each stored with an id and a label.

    Prefer the factories :meth:`flat` (exact), :meth:`ivf` and :meth:`hnsw` (approximate); the
    constructor takes the same arguments plus ``kind``.

    Args:
        embedding_size: ``D``; every added embedding and every query must have ``D`` columns.
        kind: ``"flat"``, ``"ivf"`` or ``"hnsw"`` (see the module documentation).
        metric: ``"inner_product"``, ``"l2"`` (squared Euclidean), or ``"auto"``: inner
            product when ``normalize`` is set, L2 otherwise.
        normalize: L2-normalise embeddings as they are added and queries as they are searched
            (cosine similarity with the inner product).
        nlist: IVF only: number of k-means cells (default 1024). The first batch added (or
            :meth:`train`) needs at least ``nlist`` embeddings; faiss asks for ~39 per cell.
        nprobe: IVF only: cells scanned per query (default ``min(32, nlist)``);
            ``nprobe = nlist`` is exact.
        m: HNSW only: links per node (``M``, default 32).
        ef_search: HNSW only: candidate list size during search (``efSearch``, default 64;
            at least ``k`` is always used).
        ef_construction: HNSW only: candidate list size while inserting (default 40).

    ``nprobe`` and ``ef_search`` may be changed at any time (``index.nprobe = 64``).

    Ids are non-negative integers, unique within the index (``add`` with an id that is already
    stored raises ``ValueError`` unless ``replace=True``; a removed id may be added again).
    ``add`` without ids assigns fresh ones above every id used so far. Labels are any int64;
    ``class_names`` is a plain ``{label: name}`` dict saved with the index, for the caller's
    convenience. Each item may also carry a *source*, a string naming where it came from (an
    image file's path), unique within the index, so that results can name files and the same
    file is not stored twice.
    """

    def __init__(
        self,
        embedding_size: int,
        *,
        kind: Kind = "flat",
        metric: Metric = "auto",
        normalize: bool = True,
        nlist: int | None = None,
        nprobe: int | None = None,
        m: int | None = None,
        ef_search: int | None = None,
        ef_construction: int | None = None,
    ) -> None:
        self.embedding_size = _check_positive_int(embedding_size, "embedding_size")
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"kind must be 'flat', 'ivf' or 'hnsw', got {kind!r}")
        if metric not in ("auto", "l2", "inner_product"):
            raise ValueError(f"metric must be 'auto', 'l2' or 'inner_product', got {metric!r}")
        ivf_knobs = {"nlist": nlist, "nprobe": nprobe}
        hnsw_knobs = {"m": m, "ef_search": ef_search, "ef_construction": ef_construction}
        for owner, knobs in (("ivf", ivf_knobs), ("hnsw", hnsw_knobs)):
            for name, value in knobs.items():
                if value is not None and kind != owner:
                    raise ValueError(f"{name} applies to kind={owner!r}, not kind={kind!r}")
        self.kind: Kind = kind
        self.normalize = bool(normalize)
        self.metric: Literal["l2", "inner_product"] = (
            ("inner_product" if self.normalize else "l2") if metric == "auto" else metric
        )
        self.nlist = _check_positive_int(nlist if nlist is not None else 1024, "nlist")
        self.m = _check_positive_int(m if m is not None else 32, "m")
        self.ef_construction = _check_positive_int(
            ef_construction if ef_construction is not None else 40, "ef_construction"
        )
        self.nprobe = nprobe if nprobe is not None else min(32, self.nlist)
        self.ef_search = ef_search if ef_search is not None else 64
        self.fingerprint: str | None = None
        self.class_names: dict[int, str] = {}
        # Live items, sorted by id: ids[i] is stored with labels[i].
        self._ids = np.empty(0, dtype=np.int64)
        self._labels = np.empty(0, dtype=np.int64)
        self._sources = np.empty(0, dtype=object)  # str, or None where no source was given
        self._next_id = 0
        # HNSW only: faiss numbers graph nodes 0, 1, ...; node i holds id _slot_ids[i], or -1
        # for a tombstone. Other kinds give faiss the ids themselves.
        self._slot_ids = np.empty(0, dtype=np.int64)
        self._live_selector: Any = None
        self._index: Any = self._new_faiss_index()

    # -- factories -------------------------------------------------------------------------------

    @classmethod
    def flat(
        cls, embedding_size: int, *, metric: Metric = "auto", normalize: bool = True
    ) -> EmbeddingIndex:
        """Exact search: every query is compared with every stored embedding."""
        return cls(embedding_size, kind="flat", metric=metric, normalize=normalize)

    @classmethod
    def ivf(
        cls,
        embedding_size: int,
        *,
        nlist: int = 1024,
        nprobe: int | None = None,
        metric: Metric = "auto",
        normalize: bool = True,
    ) -> EmbeddingIndex:
        """Inverted-file search: ``nlist`` k-means cells, ``nprobe`` of them (default
        ``min(32, nlist)``) scanned per query."""
        return cls(
            embedding_size,
            kind="ivf",
            metric=metric,
            normalize=normalize,
            nlist=nlist,
            nprobe=nprobe,
        )

    @classmethod
    def hnsw(
        cls,
        embedding_size: int,
        *,
        m: int = 32,
        ef_search: int = 64,
        ef_construction: int = 40,
        metric: Metric = "auto",
        normalize: bool = True,
    ) -> EmbeddingIndex:
        """Graph search (HNSW): ``m`` links per node, ``ef_search`` candidates per query."""
        return cls(
            embedding_size,
            kind="hnsw",
            metric=metric,
            normalize=normalize,
            m=m,
            ef_search=ef_search,
            ef_construction=ef_construction,
        )

    # -- search knobs ----------------------------------------------------------------------------

    @property
    def nprobe(self) -> int:
        """IVF: cells scanned per query (``1..nlist``)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        value = _check_positive_int(value, "nprobe")
        if value > self.nlist:
            raise ValueError(f"nprobe ({value}) cannot exceed nlist ({self.nlist})")
        self._nprobe = value

    @property
    def ef_search(self) -> int:
        """HNSW: candidate list size during search."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = _check_positive_int(value, "ef_search")

    # -- state -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of live (searchable) items."""
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        if not isinstance(item_id, int | np.integer) or isinstance(item_id, bool):
            return False
        return bool(self._find(np.array([item_id], dtype=np.int64))[1][0])

    def __repr__(self) -> str:
        knobs = {
            "flat": "",
            "ivf": f", nlist={self.nlist}, nprobe={self.nprobe}",
            "hnsw": f", m={self.m}, ef_search={self.ef_search}",
        }[self.kind]
        return (
            f"EmbeddingIndex(kind={self.kind!r}, embedding_size={self.embedding_size}, "
            f"metric={self.metric!r}, normalize={self.normalize}{knobs}, items={len(self)})"
        )

    @property
    def ids(self) -> Tensor:
        """``(N,)`` int64: the live ids, ascending."""
        return torch.from_numpy(self._ids.copy())

    @property
    def labels(self) -> Tensor:
        """``(N,)`` int64: the label of each id of :attr:`ids`."""
        return torch.from_numpy(self._labels.copy())

    @property
    def is_trained(self) -> bool:
        """Whether items can be added without training first (only IVF ever needs training)."""
        return bool(self._index.is_trained)

    @property
    def n_tombstones(self) -> int:
        """HNSW: removed items still in the graph (0 for the other kinds); see :meth:`compact`."""
        return int(np.count_nonzero(self._slot_ids < 0))

    @property
    def sources(self) -> list[str | None]:
        """The source of each id of :attr:`ids` (``None`` where none was given)."""
        return self._sources.tolist()

    def sources_of(self, ids: ArrayLike) -> list[str | None]:
        """The sources of the given live ids (``ValueError`` for an unknown id)."""
        wanted = _as_ids(ids, "ids")
        positions, found = self._find(wanted)
        if not found.all():
            raise ValueError(f"ids not in the index: {_few(wanted[~found])}")
        return self._sources[positions].tolist()

    def ids_of_sources(self, sources: Sequence[str]) -> Tensor:
        """``(n,)`` int64: the id of the item stored from each source (``ValueError`` naming
        the sources that are not in the index)."""
        wanted = _as_sources(sources, len(sources))
        owner = self._source_owners()
        missing = [source for source in wanted if source not in owner]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            more = f", ... ({len(missing)} in all)" if len(missing) > 5 else ""
            raise ValueError(f"sources not in the index: {shown}{more}")
        return torch.tensor([owner[source] for source in wanted], dtype=torch.int64)

    def labels_of(self, ids: ArrayLike) -> Tensor:
        """``(n,)`` int64 labels of the given live ids (``ValueError`` for an unknown id)."""
        wanted = _as_ids(ids, "ids")
        positions, found = self._find(wanted)
        if not found.all():
            raise ValueError(f"ids not in the index: {_few(wanted[~found])}")
        return torch.from_numpy(self._labels[positions])

    # -- adding and removing ---------------------------------------------------------------------

    def train(self, embeddings: Tensor | np.ndarray) -> None:
        """IVF: learn the ``nlist`` cells from a representative ``(n, D)`` sample, n ≥ nlist.

        Needed only to train on something other than the first batch added; only while the
        index is empty. A no-op for flat and HNSW indexes, which need no training.
        """
        vectors = self._prepare(embeddings, "embeddings")
        if self.kind != "ivf":
            return
        if len(self) > 0:
            raise ValueError("train an IVF index while it is empty (or use compact() later)")
        self._index = self._new_faiss_index()
        self._train_ivf(vectors)

    def add(
        self,
        embeddings: Tensor | np.ndarray,
        labels: ArrayLike,
        ids: ArrayLike | None = None,
        *,
        sources: Sequence[str | None] | None = None,
        replace: bool = False,
    ) -> Tensor:
        """Store ``(n, D)`` embeddings with ``(n,)`` integer labels; returns their ``(n,)`` ids.

        ``ids`` (``(n,)`` non-negative integers) must be new, unless ``replace=True``: then an
        item already stored under one of them is removed first (its vector, label and source
        replaced). By default fresh ids are assigned. ``sources`` (``n`` strings or ``None``)
        names where each item came from; a source already stored under another id is refused.
        An untrained IVF index is trained on this batch first. Nothing is changed when any
        check fails.

        Embeddings may be float16, bfloat16, float32 or float64; they are stored as float32.
        An index that normalises stores directions, so any finite non-zero vector is fine (a
        zero vector has none: ``ValueError``). One that does not needs every non-zero vector's
        norm within ``[2**-63, 2**62]`` (about 1e-19 to 5e18): beyond it faiss's float32
        squared distances overflow or underflow, so the values are refused.
        """
        vectors = self._prepare(embeddings, "embeddings")
        label_array = check_labels(_as_tensor(labels, "labels"), torch.from_numpy(vectors))
        new_labels = label_array.numpy()
        if ids is None:
            new_ids = np.arange(self._next_id, self._next_id + len(vectors), dtype=np.int64)
        else:
            new_ids = _as_ids(ids, "ids")
            if len(new_ids) != len(vectors):
                raise ValueError(f"ids has {len(new_ids)} entries but there are {len(vectors)}")
            unique, counts = np.unique(new_ids, return_counts=True)
            if (counts > 1).any():
                raise ValueError(f"ids must be unique, repeated: {_few(unique[counts > 1])}")
        replaced = new_ids[self._find(new_ids)[1]]
        if len(replaced) and not replace:
            raise ValueError(
                f"ids already in the index: {_few(replaced)} (pass replace=True to replace "
                "those items, or remove() them first)"
            )
        new_sources = _as_sources(sources, len(vectors))
        self._check_sources_are_new(new_sources, new_ids)
        if len(vectors) == 0:
            return torch.empty(0, dtype=torch.int64)
        if not self._index.is_trained:
            self._train_ivf(vectors)
        if len(replaced):
            self.remove(replaced)

        if self.kind == "hnsw":
            self._index.add(vectors)
            self._slot_ids = np.concatenate([self._slot_ids, new_ids])
            self._live_selector = None  # the cached bitmap does not cover the new nodes
        else:
            self._index.add_with_ids(vectors, new_ids)
        order = np.argsort(new_ids)
        at = np.searchsorted(self._ids, new_ids[order])
        self._ids = np.insert(self._ids, at, new_ids[order])
        self._labels = np.insert(self._labels, at, new_labels[order])
        self._sources = np.insert(self._sources, at, new_sources[order])
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return torch.from_numpy(new_ids.copy())

    def add_from_model(
        self,
        model: nn.Module,
        inputs: Tensor | np.ndarray,
        labels: ArrayLike,
        ids: ArrayLike | None = None,
        *,
        sources: Sequence[str | None] | None = None,
        replace: bool = False,
        batch_size: int = 256,
        progress: bool = True,
    ) -> Tensor:
        """Embed ``inputs`` ``(n, ...)`` with ``model`` (see :func:`embed`) and :meth:`add` them
        (``ids``, ``sources`` and ``replace`` as there).

        Records the model's :func:`model_fingerprint`; embeddings of a model whose fingerprint
        differs from the one already recorded are refused (``ValueError``): their distances to
        the stored embeddings would mean nothing.
        """
        fingerprint = model_fingerprint(model)
        if self.fingerprint is not None and fingerprint != self.fingerprint:
            raise ValueError(
                "the model differs from the one that filled this index (fingerprint "
                f"{fingerprint[:12]}... vs {self.fingerprint[:12]}...); rebuild the index"
            )
        n_labels = len(_as_tensor(labels, "labels"))
        if n_labels != len(inputs):
            raise ValueError(f"labels has {n_labels} entries but there are {len(inputs)} inputs")
        embeddings = embed(model, inputs, batch_size=batch_size, progress=progress)
        if len(inputs) == 0:
            embeddings = torch.empty(0, self.embedding_size)
        new_ids = self.add(embeddings, labels, ids, sources=sources, replace=replace)
        self.fingerprint = fingerprint
        return new_ids

    def remove(self, ids: ArrayLike) -> None:
        """Remove the items with these ids (``ValueError`` if one is not in the index).

        Flat and IVF: the vectors are deleted. HNSW: they become tombstones, never returned
        again; :meth:`compact` reclaims their memory.
        """
        doomed = np.unique(_as_ids(ids, "ids"))
        positions, found = self._find(doomed)
        if not found.all():
            raise ValueError(f"ids not in the index: {_few(doomed[~found])}")
        if len(doomed) == 0:
            return
        if self.kind == "hnsw":
            self._slot_ids[np.isin(self._slot_ids, doomed)] = -1
            self._live_selector = None
        else:
            removed = self._index.remove_ids(doomed)
            if removed != len(doomed):  # the id table and faiss disagree: a bug, not bad input
                raise RuntimeError(f"faiss removed {removed} of {len(doomed)} ids")
        self._ids = np.delete(self._ids, positions)
        self._labels = np.delete(self._labels, positions)
        self._sources = np.delete(self._sources, positions)

    def compact(self) -> None:
        """Rebuild from the live items.

        HNSW: a new graph without the tombstones. IVF: re-train the cells on the current items
        (``ValueError`` if fewer than ``nlist`` remain) and re-assign them. Flat: nothing to do.
        """
        if self.kind == "flat":
            return
        live_ids, vectors = self._live_vectors()
        index = self._new_faiss_index()
        if self.kind == "ivf":
            if len(vectors) == 0:
                self._index = index
                return
            if len(vectors) < self.nlist:
                raise ValueError(f"cannot re-train {self.nlist} IVF cells on {len(vectors)} items")
            index.train(vectors)
            index.add_with_ids(vectors, live_ids)
        else:
            index.add(vectors)
            self._slot_ids = live_ids
            self._live_selector = None
        self._index = index

    # -- search ----------------------------------------------------------------------------------

    def search(self, queries: Tensor | np.ndarray, k: int) -> SearchResult:
        """The ``k`` nearest live items of each of the ``(Nq, D)`` queries (see
        :class:`SearchResult`). Queries are checked and converted as :meth:`add` checks and
        converts embeddings (any floating dtype; ``ValueError`` for values the index cannot
        represent)."""
        k = _check_positive_int(k, "k")
        vectors = self._prepare(queries, "queries")
        if len(vectors) == 0 or len(self) == 0:
            found = np.full((len(vectors), k), -1, dtype=np.int64)
            distances = np.zeros((len(vectors), k), dtype=np.float32)
        elif self.kind == "flat":
            distances, found = self._index.search(vectors, k)
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)
            distances, found = _faiss_search(self._index, vectors, k, params)
        else:
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
            if self.n_tombstones:
                params.sel = self._selector()
            distances, slots = _faiss_search(self._index, vectors, k, params)
            found = np.where(slots >= 0, self._slot_ids[np.maximum(slots, 0)], -1)
        missing = found < 0
        distances[missing] = math.inf if self.metric == "l2" else -math.inf
        labels = np.full(found.shape, -1, dtype=np.int64)
        labels[~missing] = self._labels[np.searchsorted(self._ids, found[~missing])]
        return SearchResult(
            ids=torch.from_numpy(np.ascontiguousarray(found, dtype=np.int64)),
            labels=torch.from_numpy(labels),
            distances=torch.from_numpy(np.ascontiguousarray(distances, dtype=np.float32)),
        )

    # -- saving and loading ----------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the index to ``directory`` (created if needed), replacing the index saved there.

        Touches only the files it owns, and is crash-safe (see the module documentation); one
        writer at a time per directory. The index file takes about ``4·D`` bytes per stored
        vector (HNSW: plus ``8·M`` for links, tombstones included), the items file a few dozen
        bytes per item plus its source.
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        index_data = faiss.serialize_index(self._index).tobytes()
        items = {
            "ids": self._ids.tolist(),
            "labels": self._labels.tolist(),
            "sources": self._sources.tolist(),
            "hnsw_slot_ids": self._slot_ids.tolist() if self.kind == "hnsw" else None,
        }
        items_data = json.dumps(items).encode()
        token = uuid.uuid4().hex
        index_name, items_name = f"index-{token}.faiss", f"items-{token}.json"
        previous, previously_owned = _previous_save(folder)
        if previous is not None:
            # Claim the names about to be created, so that a save killed before its manifest is
            # in place leaves files the next save knows to be its own.
            pending = sorted({*previous.get("pending", []), index_name, items_name})
            _write_manifest(folder / MANIFEST_NAME, {**previous, "pending": pending})
        created: list[Path] = []
        try:
            for name, data in ((index_name, index_data), (items_name, items_data)):
                _write_new_file(folder / name, data)
                created.append(folder / name)
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "metric": self.metric,
                "normalize": self.normalize,
                "embedding_size": self.embedding_size,
                "knobs": {
                    "nlist": self.nlist,
                    "nprobe": self.nprobe,
                    "m": self.m,
                    "ef_search": self.ef_search,
                    "ef_construction": self.ef_construction,
                },
                "fingerprint": self.fingerprint,
                "next_id": self._next_id,
                "n_items": len(self),
                "class_names": {str(label): name for label, name in self.class_names.items()},
                "files": {
                    "index": _file_entry(index_name, index_data),
                    "items": _file_entry(items_name, items_data),
                },
            }
            _write_manifest(folder / MANIFEST_NAME, manifest)
        except BaseException:
            for path in created:
                path.unlink(missing_ok=True)
            raise
        fsync_directory(folder)
        for name in sorted(previously_owned - {index_name, items_name}):
            (folder / name).unlink(missing_ok=True)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        expected_embedding_size: int | None = None,
        expected_fingerprint: str | None = None,
    ) -> EmbeddingIndex:
        """Read an index written by :meth:`save`.

        ``ValueError`` naming the file for any file that does not match its checksum (a flipped
        byte, an edited digit, a truncation) or is missing, and for another format version, an
        embedding size other than ``expected_embedding_size``, or a fingerprint other than
        ``expected_fingerprint`` (pass ``model_fingerprint(model)`` to be sure the index was
        filled by that model). ``FileNotFoundError`` if the directory holds no index.
        """
        folder = Path(directory)
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no saved EmbeddingIndex in {folder} (no {MANIFEST_NAME})")
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{manifest_path} is corrupt or truncated: {error}") from error
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise ValueError(f"{manifest_path} is not a deepmetric EmbeddingIndex manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path} was saved in index format version {version!r}; this version of "
                f"deepmetric reads version {FORMAT_VERSION}: rebuild the index from its data "
                "('deepmetric index build')"
            )
        stored_checksum = manifest.pop("manifest_sha256", None)
        if stored_checksum != _manifest_checksum(manifest):
            raise ValueError(
                f"{manifest_path} does not match its own checksum: it was edited or corrupted "
                "after it was saved"
            )
        size = manifest.get("embedding_size")
        if expected_embedding_size is not None and size != expected_embedding_size:
            raise ValueError(
                f"{folder} holds {size}-dimensional embeddings, expected {expected_embedding_size}"
            )
        fingerprint = manifest.get("fingerprint")
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise ValueError(
                f"{folder} was filled by a different model (fingerprint {fingerprint!r}, "
                f"expected {expected_fingerprint!r})"
            )
        try:
            return cls._from_manifest(folder, manifest)
        except (KeyError, TypeError, AttributeError, OverflowError) as error:
            raise ValueError(f"{manifest_path} is malformed: {error!r}") from error

    @classmethod
    def _from_manifest(cls, folder: Path, manifest: dict[str, Any]) -> EmbeddingIndex:
        kind = manifest["kind"]
        knobs = manifest["knobs"]
        per_kind: dict[str, Any] = {
            "flat": {},
            "ivf": {"nlist": knobs["nlist"], "nprobe": knobs["nprobe"]},
            "hnsw": {
                "m": knobs["m"],
                "ef_search": knobs["ef_search"],
                "ef_construction": knobs["ef_construction"],
            },
        }
        if kind not in per_kind:
            raise ValueError(f"unknown index kind {kind!r} in the manifest")
        index = cls(
            manifest["embedding_size"],
            kind=kind,
            metric=manifest["metric"],
            normalize=manifest["normalize"],
            **per_kind[kind],
        )
        index_path, index_data = _read_checked(folder, manifest["files"]["index"])
        items_path, items_data = _read_checked(folder, manifest["files"]["items"])
        try:
            faiss_index = faiss.deserialize_index(np.frombuffer(index_data, dtype=np.uint8))
        except RuntimeError as error:
            raise ValueError(f"faiss cannot read {index_path}: {error}") from error
        try:
            items = json.loads(items_data)
            ids = np.asarray(items["ids"], dtype=np.int64).reshape(-1)
            labels = np.asarray(items["labels"], dtype=np.int64).reshape(-1)
            sources = _as_sources(items["sources"], len(ids))
            slot_ids = np.asarray(items["hnsw_slot_ids"] or [], dtype=np.int64).reshape(-1)
        except (ValueError, KeyError, TypeError, OverflowError) as error:
            raise ValueError(f"{items_path} is malformed: {error!r}") from error
        if len(ids) != len(labels) or (len(ids) > 1 and not (np.diff(ids) > 0).all()):
            raise ValueError(f"{items_path}: the ids must be ascending and match its labels")
        if len(ids) != manifest["n_items"]:
            raise ValueError(f"{items_path} holds {len(ids)} items, the manifest says otherwise")
        next_id = int(manifest["next_id"])
        if len(ids) and next_id <= ids[-1]:  # fresh ids would collide with stored ones
            raise ValueError(f"the manifest's next_id {next_id} is not above the stored ids")
        if faiss_index.d != index.embedding_size:
            raise ValueError(f"{index_path} holds {faiss_index.d}-dimensional vectors")
        if faiss_index.metric_type != _FAISS_METRICS[index.metric]:
            raise ValueError(f"the metric of {index_path} differs from the manifest's")
        if kind == "hnsw":
            if len(slot_ids) != faiss_index.ntotal or not np.array_equal(
                np.sort(slot_ids[slot_ids >= 0]), ids
            ):
                raise ValueError(f"the HNSW slots of {items_path} do not match its ids")
            index._slot_ids = slot_ids
        elif not np.array_equal(np.sort(_faiss_ids(faiss_index)), ids):
            raise ValueError(f"the ids stored in {index_path} differ from those of {items_path}")
        index._index = faiss_index
        index._ids, index._labels, index._sources = ids, labels, sources
        index._next_id = next_id
        index.fingerprint = manifest["fingerprint"]
        index.class_names = {int(label): name for label, name in manifest["class_names"].items()}
        return index

    # -- internals -------------------------------------------------------------------------------

    def _new_faiss_index(self) -> Any:
        metric = _FAISS_METRICS[self.metric]
        if self.kind == "flat":
            return faiss.index_factory(self.embedding_size, "IDMap2,Flat", metric)
        if self.kind == "ivf":
            return faiss.index_factory(self.embedding_size, f"IVF{self.nlist},Flat", metric)
        index = faiss.IndexHNSWFlat(self.embedding_size, self.m, metric)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    def _train_ivf(self, vectors: np.ndarray) -> None:
        if len(vectors) < self.nlist:
            raise ValueError(
                f"an IVF index with nlist={self.nlist} needs at least {self.nlist} embeddings "
                f"to train its cells, got {len(vectors)}: add a larger first batch, call "
                "train() with a representative sample, or use a smaller nlist"
            )
        self._index.train(vectors)

    def _prepare(self, embeddings: Tensor | np.ndarray, name: str) -> np.ndarray:
        """Validated ``(n, D)`` C-contiguous float32, normalised if the index normalises.

        Norms are computed without overflow or underflow whatever a row's scale: a row whose
        plain norm lies outside ``(2^-40, 2^60)`` (where squaring may overflow, or lose the
        precision of tiny components) gets it again from the row divided by its largest
        magnitude. So a float64 row of 1e300 normalises to the right direction, where
        ``F.normalize`` in float32 squares it to inf.
        """
        tensor = _as_tensor(embeddings, name)
        check_embeddings(tensor, name, magnitude=False)  # 2-D, floating, finite; scale below
        if tensor.shape[1] != self.embedding_size:
            raise ValueError(
                f"{name} have {tensor.shape[1]} dimensions, the index holds "
                f"{self.embedding_size}-dimensional embeddings"
            )
        if len(tensor) == 0:
            return np.empty((0, self.embedding_size), dtype=np.float32)
        # float16 and bfloat16 convert to float32 exactly; float64 keeps its range until the end.
        wide = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
        norms = torch.linalg.vector_norm(wide, dim=1).double()
        odd = (norms <= 2.0**-40) | (norms >= 2.0**60)
        if bool(odd.any()):
            rows = wide[odd]
            peak = rows.abs().amax(dim=1, keepdim=True)
            scaled = rows / torch.where(peak > 0, peak, torch.ones_like(peak))
            scaled_norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)  # 0 or >= 1
            norms[odd] = (peak.double() * scaled_norm.double())[:, 0]
        zero = norms == 0
        if self.normalize:
            if bool(zero.any()):
                row = int(zero.nonzero()[0, 0])
                raise ValueError(
                    f"{name} row {row} is all zeros: an index that normalises stores directions, "
                    "and a zero vector has none"
                )
            unit = wide / norms.to(wide.dtype)[:, None]  # right for every row but the odd ones
            if bool(odd.any()):
                unit[odd] = scaled / scaled_norm
            return np.ascontiguousarray(unit.float().numpy(), dtype=np.float32)
        too_large = norms > _MAX_NORM
        too_small = (norms < _MIN_NORM) & ~zero
        if bool(too_large.any()) or bool(too_small.any()):
            row = int((too_large | too_small).nonzero()[0, 0])
            which = "overflow" if bool(too_large[row]) else "underflow"
            raise ValueError(
                f"{name} row {row} has norm {float(norms[row]):.3g}: float32 squared distances "
                f"{which} for vectors of norms outside [2^-63, 2^62] (about 1.1e-19 to 4.6e18), "
                "so the index cannot store or search them correctly; rescale the embeddings or "
                "use an index that normalises (normalize=True)"
            )
        return np.ascontiguousarray(wide.float().numpy(), dtype=np.float32)

    def _source_owners(self) -> dict[str, int]:
        """``{source: id}`` of the live items that have a source."""
        return {
            source: int(item)
            for source, item in zip(self._sources.tolist(), self._ids.tolist(), strict=True)
            if source is not None
        }

    def _check_sources_are_new(self, sources: np.ndarray, ids: np.ndarray) -> None:
        """Refuse sources stored under an id other than the one they are added with (that
        item is being replaced)."""
        if all(source is None for source in sources.tolist()):
            return  # the common case of a library caller, without building the lookup
        owner = self._source_owners()
        clashes = [
            (source, owner[source])
            for source, item in zip(sources.tolist(), ids.tolist(), strict=True)
            if source is not None and owner.get(source, item) != item
        ]
        if clashes:
            shown = ", ".join(f"{source!r} (id {item})" for source, item in clashes[:3])
            more = f", ... ({len(clashes)} in all)" if len(clashes) > 3 else ""
            raise ValueError(
                f"sources already in the index: {shown}{more}; remove those items first, or "
                "add them under their stored ids with replace=True"
            )

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``ids`` in the sorted id table, and which of them are stored."""
        positions = np.searchsorted(self._ids, ids)
        if len(self._ids) == 0:
            return positions, np.zeros(len(ids), dtype=bool)
        found = self._ids[np.minimum(positions, len(self._ids) - 1)] == ids
        return positions, found

    def _selector(self) -> Any:
        """HNSW: a faiss selector that admits live graph nodes only (cached until the next
        add, remove or compact)."""
        if self._live_selector is None:
            bitmap = np.packbits(self._slot_ids >= 0, bitorder="little")
            self._live_selector = faiss.IDSelectorBitmap(bitmap)
        return self._live_selector

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """HNSW and IVF: the live ids and their stored (normalised) vectors ``(n, D)``."""
        if self.kind == "hnsw":
            live = self._slot_ids >= 0
            vectors = self._index.reconstruct_n(0, self._index.ntotal)
            return self._slot_ids[live], np.ascontiguousarray(vectors[live])
        # An inverted file finds a vector by id only through a direct map; build one briefly.
        self._index.set_direct_map_type(faiss.DirectMap.Hashtable)
        try:
            vectors = self._index.reconstruct_batch(self._ids)
        finally:
            self._index.set_direct_map_type(faiss.DirectMap.NoMap)
        return self._ids.copy(), np.ascontiguousarray(vectors)


def _faiss_ids(index: Any) -> np.ndarray:
    """The ids a flat (``IndexIDMap2``) or IVF faiss index holds, in its own order."""
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    lists = faiss.extract_index_ivf(index).invlists
    chunks = [np.empty(0, dtype=np.int64)]
    for cell in range(lists.nlist):
        size = lists.list_size(cell)
        if size:
            chunks.append(faiss.rev_swig_ptr(lists.get_ids(cell), size).astype(np.int64))
    return np.concatenate(chunks)


def _file_entry(name: str, data: bytes) -> dict[str, Any]:
    """A data file's line in the manifest: its name, size and SHA-256."""
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_checked(folder: Path, entry: dict[str, Any]) -> tuple[Path, bytes]:
    """The bytes of the data file a manifest entry names, verified against its size and
    checksum (``ValueError`` naming the file otherwise)."""
    name = entry["name"]
    if not isinstance(name, str) or not _OWNED_FILE.fullmatch(name):
        raise ValueError(f"the manifest names {name!r}, not a file an index saves")
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read the index's file {path}: {error}") from error
    if len(data) != entry["bytes"]:
        raise ValueError(
            f"{path} has {len(data)} bytes, the manifest says {entry['bytes']}: truncated or "
            "overwritten"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{path} does not match the manifest's checksum: corrupt or edited")
    return path, data


def _manifest_checksum(body: dict[str, Any]) -> str:
    """SHA-256 of a manifest's content (without its own checksum), in a canonical JSON form:
    sorted keys, no spaces, ASCII only."""
    content = {key: value for key, value in body.items() if key != "manifest_sha256"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _write_manifest(path: Path, body: dict[str, Any]) -> None:
    """Write a manifest with its own checksum, atomically."""
    signed = {**body, "manifest_sha256": _manifest_checksum(body)}
    _write_atomically(path, json.dumps(signed, indent=1).encode())


def _previous_save(folder: Path) -> tuple[dict[str, Any] | None, set[str]]:
    """The manifest saved in ``folder`` (without its checksum) if it is a current one that
    verifies, and the names of the data files it owns: those it names and those a save in
    progress claimed (``pending``). A manifest that is missing, corrupt or edited owns nothing,
    so nothing it names is ever deleted."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError):
        return None, set()
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        return None, set()
    if manifest.get("format_version") == 1:  # one data file, no checksum of the manifest
        name = manifest.get("index_file")
        return None, {name} if isinstance(name, str) and _OWNED_FILE.fullmatch(name) else set()
    checksum = manifest.pop("manifest_sha256", None)
    if manifest.get("format_version") != FORMAT_VERSION or checksum != _manifest_checksum(manifest):
        return None, set()
    files = manifest.get("files")
    pending = manifest.get("pending")
    named = [entry.get("name") for entry in files.values()] if isinstance(files, dict) else []
    named += pending if isinstance(pending, list) else []
    owned = {name for name in named if isinstance(name, str) and _OWNED_FILE.fullmatch(name)}
    return manifest, owned


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (``FileExistsError`` if anything is there: it is not ours) and write
    ``data`` to disk; a failed write removes the partial file."""
    file = open(path, "xb")  # noqa: SIM115 - closed below, the cleanup needs the path
    try:
        with file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a new uniquely named temporary file beside ``path``, flush it to disk,
    rename it over ``path``: readers see the old file or the new one, never a partial one, and
    no other file is touched."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _write_new_file(temporary, data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
