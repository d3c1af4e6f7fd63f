"""EmbeddingIndex: exact search against a numpy brute force, approximate recall, removal, ids,
save/load (round trips, crashes mid-save, corrupt files) and add/remove sequences against a
dict-based reference."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepmetric import index as index_module
from deepmetric.index import EmbeddingIndex, SearchResult, embed, model_fingerprint

KINDS = ("flat", "ivf", "hnsw")


# -- helpers -----------------------------------------------------------------------------------


def clustered(
    n: int, dim: int, n_clusters: int, seed: int, spread: float = 0.3, intrinsic: int = 0
) -> np.ndarray:
    """``(n, dim)`` float32 points around ``n_clusters`` standard normal centres: isotropic
    noise of scale ``spread``, or, with ``intrinsic > 0``, unit noise in a random
    ``intrinsic``-dimensional subspace plus ``spread`` isotropic noise (embeddings of a trained
    model have a low intrinsic dimension)."""
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((n_clusters, dim))[rng.integers(0, n_clusters, n)]
    if intrinsic:
        basis = rng.standard_normal((intrinsic, dim)) / np.sqrt(intrinsic)
        points += rng.standard_normal((n, intrinsic)) @ basis
    points += spread * rng.standard_normal((n, dim))
    return points.astype(np.float32)


def make_index(kind: str, dim: int, **kwargs: Any) -> EmbeddingIndex:
    """A small index of each kind; IVF probes every cell and HNSW keeps a wide candidate list,
    so that on a few hundred items both are exact."""
    if kind == "flat":
        return EmbeddingIndex.flat(dim, **kwargs)
    if kind == "ivf":
        return EmbeddingIndex.ivf(dim, nlist=4, nprobe=4, **kwargs)
    return EmbeddingIndex.hnsw(dim, m=16, ef_search=512, **kwargs)


def reference_scores(
    stored: np.ndarray, queries: np.ndarray, metric: str, normalize: bool
) -> np.ndarray:
    """``(Nq, N)`` float64 brute force: squared L2 distances or inner products."""
    x, q = stored.astype(np.float64), queries.astype(np.float64)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    if metric == "l2":
        return ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return q @ x.T


def assert_exact(
    result: SearchResult,
    reference: dict[int, tuple[np.ndarray, int]],
    queries: np.ndarray,
    k: int,
    metric: str,
    normalize: bool,
) -> None:
    """``result`` is the exact top k over ``reference`` ({id: (vector, label)}), up to ties:
    its distances are the k best brute-force ones, each returned id really has the distance
    reported, and carries its label; missing places are padding."""
    ids = np.array(sorted(reference), dtype=np.int64)
    assert result.ids.shape == result.labels.shape == result.distances.shape == (len(queries), k)
    assert result.ids.dtype == result.labels.dtype == torch.int64
    assert result.distances.dtype == torch.float32
    n_found = min(k, len(ids))
    got_ids, got_labels = result.ids.numpy(), result.labels.numpy()
    got_dist = result.distances.numpy().astype(np.float64)
    padding = np.inf if metric == "l2" else -np.inf
    assert (got_ids[:, n_found:] == -1).all() and (got_labels[:, n_found:] == -1).all()
    assert (got_dist[:, n_found:] == padding).all()
    if n_found == 0:
        return
    stored = np.stack([reference[int(i)][0] for i in ids])
    scores = reference_scores(stored, queries, metric, normalize)
    best = np.sort(scores, axis=1)
    best = best[:, :n_found] if metric == "l2" else best[:, ::-1][:, :n_found]
    tolerance = 1e-4 * (1 + np.abs(best))
    np.testing.assert_array_less(np.abs(got_dist[:, :n_found] - best), tolerance)
    column = {int(i): c for c, i in enumerate(ids)}
    for row in range(len(queries)):
        returned = got_ids[row, :n_found]
        assert len(set(returned.tolist())) == n_found
        for place, item in enumerate(returned.tolist()):
            true = scores[row, column[item]]
            assert abs(got_dist[row, place] - true) <= 1e-4 * (1 + abs(true))
            assert got_labels[row, place] == reference[item][1]


def recall_at_k(found: torch.Tensor, truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


class SmallNet(nn.Module):
    """Linear -> BatchNorm -> Dropout: differs between train and eval mode."""

    def __init__(self, dim_in: int = 10, dim_out: int = 6) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(dim_in, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, dim_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# -- exact search --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("normalize", "metric"),
    [(True, "auto"), (False, "auto"), (True, "l2"), (False, "inner_product")],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flat_search_is_brute_force_through_removals_and_readds(
    normalize: bool, metric: str, dtype: type
) -> None:
    index = EmbeddingIndex.flat(8, metric=metric, normalize=normalize)  # type: ignore[arg-type]
    expected_metric = ("inner_product" if normalize else "l2") if metric == "auto" else metric
    assert index.metric == expected_metric
    vectors = clustered(400, 8, 5, seed=1).astype(dtype)
    labels = np.arange(400) % 7 - 3  # negative labels are fine
    ids = np.arange(400) * 3 + 11
    index.add(vectors, labels, ids)
    reference = {int(i): (v, int(y)) for i, v, y in zip(ids, vectors, labels, strict=True)}
    queries = clustered(30, 8, 5, seed=2).astype(dtype)

    assert_exact(index.search(queries, 10), reference, queries, 10, expected_metric, normalize)
    doomed = ids[::3]
    index.remove(torch.from_numpy(doomed))
    for i in doomed:
        del reference[int(i)]
    assert_exact(index.search(queries, 10), reference, queries, 10, expected_metric, normalize)
    readded = doomed[:50]
    new_vectors = clustered(50, 8, 5, seed=3).astype(dtype)
    index.add(torch.from_numpy(new_vectors), torch.full((50,), 99), readded.tolist())
    reference.update({int(i): (v, 99) for i, v in zip(readded, new_vectors, strict=True)})
    assert len(index) == len(reference)
    assert_exact(index.search(queries, 10), reference, queries, 10, expected_metric, normalize)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_exhaustive_settings_make_approximate_kinds_exact(kind: str) -> None:
    index = make_index(kind, 8)
    vectors = clustered(300, 8, 6, seed=4)
    ids = index.add(vectors, np.arange(300) % 5).numpy()
    reference = {int(i): (v, int(i) % 5) for i, v in zip(ids, vectors, strict=True)}
    for i in ids[1::2]:
        del reference[int(i)]
    index.remove(ids[1::2])
    queries = clustered(20, 8, 6, seed=5)
    assert_exact(index.search(queries, 7), reference, queries, 7, "inner_product", True)


def test_padding_when_k_exceeds_the_items() -> None:
    for metric, pad in (("l2", np.inf), ("inner_product", -np.inf)):
        index = EmbeddingIndex.flat(4, metric=metric)  # type: ignore[arg-type]
        empty = index.search(np.ones((2, 4), np.float32), 3)
        assert (empty.ids == -1).all() and (empty.labels == -1).all()
        assert (empty.distances.numpy() == pad).all()
        index.add(np.eye(4, dtype=np.float32)[:2], [-1, 5], [7, 8])
        result = index.search(np.eye(4, dtype=np.float32)[:1], 3)
        assert result.ids.tolist() == [[7, 8, -1]]
        assert result.labels.tolist() == [[-1, 5, -1]]  # a real label -1, then padding
        assert result.distances[0, 2].item() == pad
    assert index.search(np.empty((0, 4), np.float32), 2).ids.shape == (0, 2)


# -- approximate search --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10_on_clustered_data(kind: str) -> None:
    dim, n = 32, 10_000
    data = clustered(n + 200, dim, 50, seed=6, spread=0.1, intrinsic=12)
    vectors, queries = data[:n], data[n:]
    if kind == "ivf":
        index = EmbeddingIndex.ivf(dim, nlist=64, nprobe=8)
    else:
        index = EmbeddingIndex.hnsw(dim, m=16, ef_search=64)
    ids = index.add(vectors, np.zeros(n, dtype=np.int64)).numpy()

    def truth(live: np.ndarray) -> np.ndarray:
        scores = reference_scores(vectors[live], queries, "inner_product", True)
        return ids[live][np.argsort(-scores, axis=1)[:, :10]]

    everything = np.ones(n, dtype=bool)
    recall = recall_at_k(index.search(queries, 10).ids, truth(everything))
    assert recall >= 0.9, recall
    # Remove every item that is a true top-3 neighbour of some query, plus a random third:
    # the answers change a lot, and must not contain a removed id.
    live = everything.copy()
    live[np.isin(ids, truth(everything)[:, :3])] = False
    live[np.random.default_rng(8).random(n) < 0.33] = False
    index.remove(ids[~live])
    result = index.search(queries, 10)
    assert not np.isin(result.ids.numpy(), ids[~live]).any()
    assert (result.ids >= 0).all()
    recall = recall_at_k(result.ids, truth(live))
    assert recall >= 0.9, recall
    assert index.n_tombstones == (int((~live).sum()) if kind == "hnsw" else 0)
    index.compact()
    assert index.n_tombstones == 0 and len(index) == int(live.sum())
    recall = recall_at_k(index.search(queries, 10).ids, truth(live))
    assert recall >= 0.9, recall


# -- ids, labels, removal ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_removal_semantics(kind: str) -> None:
    index = make_index(kind, 6)
    vectors = clustered(40, 6, 4, seed=9)
    ids = index.add(vectors, np.arange(40) // 10)
    assert ids.tolist() == list(range(40)) and len(index) == 40
    index.remove([3, 5, 5])  # repeats in one call are harmless
    assert len(index) == 38 and 3 not in index and 4 in index
    assert index.n_tombstones == (2 if kind == "hnsw" else 0)
    with pytest.raises(ValueError, match="not in the index: 3"):
        index.remove([3])
    with pytest.raises(ValueError, match="not in the index"):
        index.labels_of([5])
    hits = index.search(vectors[[3, 5]], 40)
    assert not np.isin(hits.ids.numpy(), [3, 5]).any()
    assert (hits.ids[:, :38] >= 0).all() and (hits.ids[:, 38:] == -1).all()
    # A removed id may come back, with a new vector and label; it is found again.
    index.add(vectors[[3]], [77], [3])
    assert index.labels_of([3, 4]).tolist() == [77, 0]
    assert index.search(vectors[[3]], 1).ids.tolist() == [[3]]
    index.compact()
    assert index.n_tombstones == 0 and len(index) == 39
    assert index.search(vectors[[3]], 1).labels.tolist() == [[77]]
    # Fresh ids start above every id used so far, removed ones included.
    index.remove(list(range(30, 40)))
    assert index.add(vectors[:2], [0, 0]).tolist() == [40, 41]
    assert index.ids.tolist() == [*range(0, 5), *range(6, 30), 40, 41]
    assert index.labels.tolist() == index.labels_of(index.ids).tolist()


def test_duplicate_and_invalid_ids_are_refused() -> None:
    index = EmbeddingIndex.flat(3)
    index.add(np.eye(3, dtype=np.float32), [0, 1, 2], [10, 11, 12])
    with pytest.raises(ValueError, match="already in the index: 11"):
        index.add(np.eye(3, dtype=np.float32)[:1], [0], [11])
    with pytest.raises(ValueError, match="unique"):
        index.add(np.eye(3, dtype=np.float32)[:2], [0, 0], [20, 20])
    with pytest.raises(ValueError, match="non-negative"):
        index.add(np.eye(3, dtype=np.float32)[:1], [0], [-1])
    with pytest.raises(ValueError, match="integer"):
        index.add(np.eye(3, dtype=np.float32)[:1], [0], [1.5])
    with pytest.raises(ValueError, match="ids has 1 entries"):
        index.add(np.eye(3, dtype=np.float32)[:2], [0, 0], [30])
    assert len(index) == 3 and index.ids.tolist() == [10, 11, 12]  # nothing half-added


def test_input_validation() -> None:
    index = EmbeddingIndex.flat(4)
    good = np.ones((2, 4), np.float32)
    bad_inputs = {
        "4-dimensional": (np.ones((2, 5), np.float32), [0, 0]),
        "NaN": (np.array([[0, 1, 2, np.nan]] * 2, np.float32), [0, 0]),
        "2-D": (np.ones(4, np.float32), [0]),
        "labels has 1 entries": (good, [0]),
        "integer dtype": (good, [0.5, 1.0]),
        "floating-point": (np.ones((2, 4), np.int64), [0, 0]),
        "row 1 is all zeros": (np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32), [0, 0]),
    }
    for message, (embeddings, labels) in bad_inputs.items():
        with pytest.raises(ValueError, match=message):
            index.add(embeddings, labels)
    index.add(good, [0, 1])
    for k in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search(good, k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queries"):
        index.search(np.ones((1, 3), np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        index.search(torch.tensor([[float("nan")] * 4]), 1)
    with pytest.raises(ValueError, match="nlist applies to kind='ivf'"):
        EmbeddingIndex(4, kind="flat", nlist=8)
    with pytest.raises(ValueError, match="cannot exceed nlist"):
        EmbeddingIndex.ivf(4, nlist=8, nprobe=9)
    with pytest.raises(ValueError, match="kind must be"):
        EmbeddingIndex(4, kind="lsh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric must be"):
        EmbeddingIndex(4, metric="cosine")  # type: ignore[arg-type]
    hnsw = EmbeddingIndex.hnsw(4)
    with pytest.raises(ValueError, match="ef_search"):
        hnsw.ef_search = 0
    ivf = EmbeddingIndex.ivf(4, nlist=16)
    with pytest.raises(ValueError, match="needs at least 16 embeddings"):
        ivf.add(np.ones((3, 4), np.float32), [0, 0, 0])
    assert len(ivf) == 0 and not ivf.is_trained


def test_ivf_trains_on_an_explicit_sample_then_takes_single_items() -> None:
    index = EmbeddingIndex.ivf(8, nlist=8, nprobe=8)
    index.train(clustered(200, 8, 8, seed=10))
    assert index.is_trained and len(index) == 0
    one = clustered(1, 8, 1, seed=11)
    assert index.add(one, [4]).tolist() == [0]
    assert index.search(one, 1).ids.tolist() == [[0]]
    with pytest.raises(ValueError, match="while it is empty"):
        index.train(clustered(200, 8, 8, seed=12))


# -- model helpers -------------------------------------------------------------------------------


def test_add_from_model_embeds_in_eval_mode_without_grad() -> None:
    torch.manual_seed(0)
    model = SmallNet().train()
    x = torch.randn(70, 10)
    index = EmbeddingIndex.flat(6, normalize=False)
    ids = index.add_from_model(model, x, torch.arange(70) % 3, batch_size=16, progress=False)
    assert ids.tolist() == list(range(70)) and model.training  # mode restored
    assert index.fingerprint == model_fingerprint(model)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    emb = embed(model, x, batch_size=7, progress=False)
    assert not emb.requires_grad and model.training
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-6)
    result = index.search(expected[:5], 1)
    assert result.ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert result.labels[:, 0].tolist() == [0, 1, 2, 0, 1]
    torch.testing.assert_close(result.distances[:, 0], torch.zeros(5), atol=1e-4, rtol=0)
    other = SmallNet()
    with pytest.raises(ValueError, match="differs from the one that filled"):
        index.add_from_model(other, x[:2], [0, 0], progress=False)
    with pytest.raises(ValueError, match="labels has 2 entries"):
        index.add_from_model(model, x[:3], [0, 0], progress=False)
    assert len(index) == 70


def test_model_fingerprint_tracks_parameters_and_buffers() -> None:
    torch.manual_seed(0)
    model = SmallNet()
    twin = copy.deepcopy(model)
    assert model_fingerprint(model) == model_fingerprint(twin)
    assert len(model_fingerprint(model)) == 64
    with torch.no_grad():
        twin.body[0].weight[0, 0] += 1e-6
    assert model_fingerprint(model) != model_fingerprint(twin)
    twin = copy.deepcopy(model)
    twin.body[1].running_mean += 1  # a buffer changes the embeddings too
    assert model_fingerprint(model) != model_fingerprint(twin)
    assert model_fingerprint(SmallNet().to(torch.float64)) != model_fingerprint(SmallNet())


# -- saving and loading --------------------------------------------------------------------------


def filled(kind: str, seed: int = 13) -> tuple[EmbeddingIndex, np.ndarray]:
    index = make_index(kind, 6)
    vectors = clustered(60, 6, 3, seed=seed)
    index.add(vectors, np.arange(60) % 4, np.arange(60) * 2)
    index.remove([0, 2, 40])
    index.class_names = {0: "cat", 1: "dog", 2: "émeu", 3: "fox"}
    index.fingerprint = "f" * 64
    return index, vectors


def assert_same_index(a: EmbeddingIndex, b: EmbeddingIndex, queries: np.ndarray) -> None:
    assert (a.kind, a.metric, a.normalize, a.embedding_size) == (
        b.kind,
        b.metric,
        b.normalize,
        b.embedding_size,
    )
    assert (a.nlist, a.nprobe, a.m, a.ef_search, a.ef_construction) == (
        b.nlist,
        b.nprobe,
        b.m,
        b.ef_search,
        b.ef_construction,
    )
    assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
    assert (a.fingerprint, a.class_names, a.n_tombstones) == (
        b.fingerprint,
        b.class_names,
        b.n_tombstones,
    )
    ra, rb = a.search(queries, 8), b.search(queries, 8)
    assert torch.equal(ra.ids, rb.ids) and torch.equal(ra.labels, rb.labels)
    assert torch.equal(ra.distances, rb.distances)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind: str, tmp_path: Path) -> None:
    index, vectors = filled(kind)
    index.save(tmp_path / "catalogue")
    loaded = EmbeddingIndex.load(tmp_path / "catalogue", expected_embedding_size=6)
    assert_same_index(index, loaded, vectors[:10])
    # The loaded index stays editable, and fresh ids continue above the saved ones.
    assert loaded.add(vectors[:1], [1]).tolist() == [119]
    loaded.remove([4, 119])
    index.add(vectors[:1], [1])
    index.remove([4, 119])
    assert_same_index(index, loaded, vectors[:10])
    # Saving over an existing save replaces it and leaves one index file.
    loaded.save(tmp_path / "catalogue")
    assert len(list((tmp_path / "catalogue").glob("index-*.faiss"))) == 1
    assert_same_index(index, EmbeddingIndex.load(tmp_path / "catalogue"), vectors[:10])


def read_save(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and the items file of a saved index, as plain JSON."""
    manifest = json.loads((folder / "manifest.json").read_text())
    items = json.loads((folder / manifest["files"]["items"]["name"]).read_text())
    return manifest, items


def sign(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its own checksum recomputed as documented: SHA-256 of its content
    without the checksum, as JSON with sorted keys, no spaces, ASCII only."""
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return {**body, "manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}


def test_save_writes_plain_json_and_checksums_every_file(tmp_path: Path) -> None:
    index, _ = filled("hnsw")
    index.add(np.eye(6, dtype=np.float32)[:2], [1, 2], sources=["a/1.png", "b/2.png"])
    index.save(tmp_path)
    manifest, items = read_save(tmp_path)
    assert manifest["format_version"] == index_module.FORMAT_VERSION
    assert manifest["kind"] == "hnsw" and manifest["embedding_size"] == 6
    assert manifest == sign(manifest)  # the manifest's checksum covers all of it
    assert items["ids"] == index.ids.tolist() and items["labels"] == index.labels.tolist()
    assert items["sources"] == [None] * 57 + ["a/1.png", "b/2.png"]
    assert items["hnsw_slot_ids"].count(-1) == 3  # the tombstones
    for entry in manifest["files"].values():
        data = (tmp_path / entry["name"]).read_bytes()
        assert len(data) == entry["bytes"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["manifest.json", *(entry["name"] for entry in manifest["files"].values())]
    )


@pytest.mark.parametrize(
    ("function", "call"),
    [("fsync", 1), ("replace", 1), ("fsync", 2), ("fsync", 3), ("fsync", 4), ("replace", 2)],
    ids=[
        "claiming the new names",
        "renaming the claim",
        "writing the index",
        "writing the items",
        "writing the manifest",
        "renaming it",
    ],
)
def test_crash_mid_save_leaves_the_previous_index(
    function: str, call: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, vectors = filled("hnsw")
    old.save(tmp_path)
    new, _ = filled("hnsw", seed=14)
    new.add(vectors[:5], [3] * 5)
    real = getattr(os, function)
    calls = 0

    def fail_at_call(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == call:
            raise OSError("disk full")
        real(*args)

    monkeypatch.setattr(os, function, fail_at_call)
    with pytest.raises(OSError):
        new.save(tmp_path)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.tmp"))  # temporaries cleaned up
    assert len(list(tmp_path.glob("index-*.faiss"))) == 1  # so is the new index file
    assert_same_index(old, EmbeddingIndex.load(tmp_path), vectors[:10])
    new.save(tmp_path)  # the next save succeeds
    assert_same_index(new, EmbeddingIndex.load(tmp_path), vectors[:10])
    assert len(list(tmp_path.glob("index-*.faiss"))) == 1


def test_a_failing_faiss_writer_leaves_the_previous_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, vectors = filled("flat")
    old.save(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken(index: Any) -> Any:
        raise RuntimeError("faiss: out of memory")

    monkeypatch.setattr(index_module.faiss, "serialize_index", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        filled("flat", seed=14)[0].save(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert_same_index(old, EmbeddingIndex.load(tmp_path), vectors[:10])


KILLED_SAVE = """
import os, sys
import numpy as np
from deepmetric import index as index_module
from deepmetric.index import EmbeddingIndex

index = EmbeddingIndex.load(sys.argv[1])
index.add(np.ones((3, 6), np.float32), [0, 1, 2])
writes = 0
real = index_module._write_manifest

def die_before_the_manifest(path, body):
    global writes
    writes += 1
    if writes == 2:  # the claim is written, the data files too: killed, no cleanup runs
        os._exit(9)
    real(path, body)

index_module._write_manifest = die_before_the_manifest
index.save(sys.argv[1])
"""


def test_a_killed_save_leaves_files_the_next_save_removes(tmp_path: Path) -> None:
    old, vectors = filled("ivf")
    old.save(tmp_path)
    (tmp_path / "index-0123456789abcdef.faiss").write_bytes(b"the user's")
    source_root = Path(index_module.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(source_root)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(tmp_path)], env=env, capture_output=True
    )
    assert killed.returncode == 9, killed.stderr.decode()
    assert len(list(tmp_path.glob("index-*.faiss"))) == 3  # the old, the user's, the orphan
    assert len(list(tmp_path.glob("items-*.json"))) == 2
    assert_same_index(old, EmbeddingIndex.load(tmp_path), vectors[:10])
    old.save(tmp_path)
    manifest, _ = read_save(tmp_path)
    owned = sorted(entry["name"] for entry in manifest["files"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["index-0123456789abcdef.faiss", "manifest.json", *owned]
    )
    assert (tmp_path / "index-0123456789abcdef.faiss").read_bytes() == b"the user's"


def test_save_touches_only_its_own_files(tmp_path: Path) -> None:
    users = {
        "notes.tmp": b"1",
        ".manifest.json.draft.tmp": b"2",
        ".hidden.tmp": b"3",
        "index-0123456789abcdef.faiss": b"4",
        "index-mine.faiss": b"5",
        f"items-{'ab' * 16}.json": b"6",
        "manifest.json.bak": b"7",
    }
    for name, data in users.items():
        (tmp_path / name).write_bytes(data)
    first, vectors = filled("flat")
    second, _ = filled("flat", seed=14)
    for index in (first, second, first):
        index.save(tmp_path)
        assert_same_index(index, EmbeddingIndex.load(tmp_path), vectors[:10])
        manifest, _ = read_save(tmp_path)
        owned = [entry["name"] for entry in manifest["files"].values()]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [*users, "manifest.json", *owned]
        )
        assert all((tmp_path / name).read_bytes() == data for name, data in users.items())


def test_a_tampered_manifest_cannot_make_a_save_delete_a_file(tmp_path: Path) -> None:
    index, vectors = filled("flat")
    index.save(tmp_path)
    victim = tmp_path / "index-0123456789abcdef.faiss"
    victim.write_bytes(b"the user's")
    manifest, _ = read_save(tmp_path)
    manifest["files"]["index"]["name"] = victim.name  # not re-signed
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    index.save(tmp_path)
    assert victim.read_bytes() == b"the user's"
    assert_same_index(index, EmbeddingIndex.load(tmp_path), vectors[:10])


def corrupt(tmp_path: Path, how: str) -> None:
    manifest_path = tmp_path / "manifest.json"
    manifest, items = read_save(tmp_path)
    index_path = tmp_path / manifest["files"]["index"]["name"]
    items_path = tmp_path / manifest["files"]["items"]["name"]
    data = bytearray(index_path.read_bytes())
    if how == "truncated index":
        index_path.write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":
        data[len(data) // 2] ^= 0xFF
        index_path.write_bytes(bytes(data))
    elif how == "missing index":
        index_path.unlink()
    elif how == "missing items":
        items_path.unlink()
    elif how == "truncated manifest":
        manifest_path.write_bytes(manifest_path.read_bytes()[:100])
    elif how == "not a manifest":
        manifest_path.write_text("[1, 2, 3]")
    elif how == "version":
        manifest["format_version"] = 99
        manifest_path.write_text(json.dumps(manifest))
    elif how == "labels":
        items["labels"] = items["labels"][:-1]
        items_path.write_text(json.dumps(items))
    elif how == "edited manifest":
        manifest["class_names"]["1"] = "wolf"
        manifest_path.write_text(json.dumps(manifest))
    elif how == "missing field":  # re-signed: the checksum passes, the content does not
        del manifest["knobs"]
        manifest_path.write_text(json.dumps(sign(manifest)))
    elif how == "escaping name":
        manifest["files"]["items"]["name"] = "../items.json"
        manifest_path.write_text(json.dumps(sign(manifest)))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated index", "truncated"),
        ("flipped byte", "checksum"),
        ("missing index", "cannot read"),
        ("missing items", "cannot read"),
        ("truncated manifest", "corrupt or truncated"),
        ("not a manifest", "not a deepmetric"),
        ("version", "format version 99"),
        ("labels", r"items-\w+\.json has \d+ bytes"),
        ("edited manifest", "manifest.json does not match its own checksum"),
        ("missing field", "malformed"),
        ("escaping name", "not a file an index saves"),
    ],
)
def test_corrupt_saves_are_a_clear_value_error(how: str, message: str, tmp_path: Path) -> None:
    filled("ivf")[0].save(tmp_path)
    corrupt(tmp_path, how)
    with pytest.raises(ValueError, match=message):
        EmbeddingIndex.load(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("part", ["manifest", "index", "items"])
def test_every_changed_digit_or_byte_of_every_file_is_refused(
    kind: str, part: str, tmp_path: Path
) -> None:
    """Each file of a save is covered by a checksum: changing any one digit of a JSON file,
    or flipping a byte of the faiss file, makes the load refuse, naming that file."""
    index, _ = filled(kind)
    index.add(np.eye(6, dtype=np.float32)[:1], [1], sources=["cat/0.png"])
    index.save(tmp_path)
    manifest, _ = read_save(tmp_path)
    name = "manifest.json" if part == "manifest" else manifest["files"][part]["name"]
    path = tmp_path / name
    original = path.read_bytes()
    if part == "index":
        places = np.random.default_rng(0).choice(len(original), size=40, replace=False)
    else:
        places = np.array([i for i, byte in enumerate(original) if chr(byte).isdigit()])
        places = places[np.linspace(0, len(places) - 1, 40).astype(int)]
    for place in places.tolist():
        changed = bytearray(original)
        if part == "index":
            changed[place] ^= 0x01
        else:
            changed[place] = ord(str((int(chr(changed[place])) + 1) % 10))
        path.write_bytes(bytes(changed))
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            EmbeddingIndex.load(tmp_path)
    path.write_bytes(original)
    assert EmbeddingIndex.load(tmp_path).ids.tolist() == index.ids.tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_re_signed_ids_that_disagree_with_faiss_are_refused(kind: str, tmp_path: Path) -> None:
    """Even with every checksum recomputed, ids that faiss does not hold are refused at load
    (they would make a later remove fail)."""
    index, _ = filled(kind)
    index.save(tmp_path)
    manifest, items = read_save(tmp_path)
    items["ids"][1] -= 1  # still ascending: the ids are even
    data = json.dumps(items).encode()
    (tmp_path / manifest["files"]["items"]["name"]).write_bytes(data)
    manifest["files"]["items"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "manifest.json").write_text(json.dumps(sign(manifest)))
    with pytest.raises(ValueError, match="differ from those of|do not match its ids"):
        EmbeddingIndex.load(tmp_path)


def test_load_checks_size_and_fingerprint(tmp_path: Path) -> None:
    index, _ = filled("flat")
    index.save(tmp_path)
    with pytest.raises(ValueError, match="6-dimensional embeddings, expected 128"):
        EmbeddingIndex.load(tmp_path, expected_embedding_size=128)
    with pytest.raises(ValueError, match="different model"):
        EmbeddingIndex.load(tmp_path, expected_fingerprint="0" * 64)
    assert len(EmbeddingIndex.load(tmp_path, expected_fingerprint="f" * 64)) == 57
    with pytest.raises(FileNotFoundError):
        EmbeddingIndex.load(tmp_path / "nowhere")


# -- random add/remove sequences against a dict ---------------------------------------------------

OPERATION = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 12), st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 2**32 - 1), st.floats(0, 1)),
)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(
    operations=st.lists(OPERATION, min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 12),
)
def test_random_add_remove_sequences_match_a_dict(
    kind: str, operations: list[tuple[str, int, Any]], seed: int, k: int
) -> None:
    rng = np.random.default_rng(seed)
    index = make_index(kind, 5, metric="l2", normalize=False)
    if kind == "ivf":
        index.train(rng.standard_normal((20, 5)).astype(np.float32))
    reference: dict[int, tuple[np.ndarray, int]] = {}
    queries = rng.standard_normal((4, 5)).astype(np.float32)
    for name, amount, option in operations:
        if name == "add":
            vectors = rng.standard_normal((amount, 5)).astype(np.float32)
            labels = rng.integers(-3, 3, amount)
            if option:  # explicit ids, a removed one may come back
                free = np.setdiff1d(np.arange(40), np.array(sorted(reference), dtype=np.int64))
                ids = rng.choice(free, size=min(amount, len(free)), replace=False)
                vectors, labels = vectors[: len(ids)], labels[: len(ids)]
                assert index.add(vectors, labels, ids).tolist() == ids.tolist()
            else:
                ids = index.add(vectors, labels).numpy()
            reference.update(
                {int(i): (v, int(y)) for i, v, y in zip(ids, vectors, labels, strict=True)}
            )
        else:
            stored = np.array(sorted(reference), dtype=np.int64)
            doomed = stored[np.random.default_rng(amount).random(len(stored)) < option]
            index.remove(doomed)
            for i in doomed:
                del reference[int(i)]
        assert len(index) == len(reference)
        assert index.ids.tolist() == sorted(reference)
        assert index.labels.tolist() == [reference[i][1] for i in sorted(reference)]
        assert_exact(index.search(queries, k), reference, queries, k, "l2", False)


@pytest.mark.parametrize("kind", KINDS)
def test_compact_after_removing_everything_then_refill(kind: str) -> None:
    index = make_index(kind, 4)
    vectors = clustered(30, 4, 3, seed=16)
    index.remove(index.add(vectors, np.zeros(30, dtype=np.int64)))
    assert len(index) == 0 and (index.search(vectors[:2], 3).ids == -1).all()
    index.compact()
    assert index.n_tombstones == 0
    assert index.is_trained == (kind != "ivf")  # an emptied IVF index re-trains on its next add
    assert index.add(vectors[:8], np.ones(8, dtype=np.int64)).tolist() == list(range(30, 38))
    assert index.search(vectors[:1], 1).ids.tolist() == [[30]]
    if kind == "ivf":
        index.remove([30, 31, 32, 33, 34])
        with pytest.raises(ValueError, match="cannot re-train 4 IVF cells on 3 items"):
            index.compact()
        assert len(index) == 3 and index.search(vectors[5:6], 1).ids.tolist() == [[35]]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_search_parameters_survive_faiss_torch_utils(kind: str) -> None:
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which replaces Index.search
    by a version without ``params``; searching must still work after that import."""
    import faiss.contrib.torch_utils  # noqa: F401

    data = clustered(200, 8, 4, seed=11)
    index = EmbeddingIndex.ivf(8, nlist=4, nprobe=4) if kind == "ivf" else EmbeddingIndex.hnsw(8)
    index.add(data, np.arange(200) % 4)
    index.remove([0, 1])
    result = index.search(data[:5], 3)
    assert result.ids.shape == (5, 3)
    assert not np.isin(result.ids.numpy(), [0, 1]).any()


# -- sources and replacement ----------------------------------------------------------------------


def test_sources_name_items_uniquely_and_survive_a_save(tmp_path: Path) -> None:
    index = EmbeddingIndex.flat(3)
    eye = np.eye(3, dtype=np.float32)
    assert index.add(eye, [0, 1, 2], sources=["a.png", None, "c.png"]).tolist() == [0, 1, 2]
    assert index.sources == ["a.png", None, "c.png"]
    assert index.sources_of([2, 0]) == ["c.png", "a.png"]
    assert index.ids_of_sources(["c.png", "a.png"]).tolist() == [2, 0]
    refused = {
        r"sources already in the index: 'a.png' \(id 0\)": (eye[:1], [5], ["a.png"]),
        "sources must be unique, repeated: 'x'": (eye[:2], [5, 5], ["x", "x"]),
        "sources has 1 entries": (eye[:2], [5, 5], ["x"]),
        "not one string": (eye[:1], [5], "x"),
        "non-empty string": (eye[:1], [5], [""]),
    }
    for message, (vectors, labels, sources) in refused.items():
        with pytest.raises(ValueError, match=message):
            index.add(vectors, labels, sources=sources)
    with pytest.raises(ValueError, match="sources not in the index: 'zz'"):
        index.ids_of_sources(["a.png", "zz"])
    assert len(index) == 3  # nothing half-added
    index.remove([0])
    assert index.add(eye[:1], [7], sources=["a.png"]).tolist() == [3]  # its source is free again
    index.save(tmp_path)
    loaded = EmbeddingIndex.load(tmp_path)
    assert loaded.ids.tolist() == [1, 2, 3]
    assert loaded.sources == [None, "c.png", "a.png"]
    assert loaded.search(eye[:1], 1).ids.tolist() == [[3]]


@pytest.mark.parametrize("kind", KINDS)
def test_replace_swaps_stored_items_instead_of_refusing_them(kind: str) -> None:
    index = make_index(kind, 4, metric="l2", normalize=False)
    vectors = clustered(40, 4, 3, seed=20)
    index.add(vectors, np.zeros(40, dtype=np.int64), sources=[f"f{i}" for i in range(40)])
    reference = {i: (vectors[i], 0) for i in range(40)}
    new = clustered(3, 4, 3, seed=21)
    with pytest.raises(ValueError, match=r"ids already in the index: 3, 7 \(pass replace=True"):
        index.add(new[:2], [1, 1], [3, 7])
    with pytest.raises(ValueError, match=r"'f7' \(id 7\)"):  # a source of another item
        index.add(new[:1], [1], [50], sources=["f7"], replace=True)
    index.add(new, [1, 2, 3], [3, 7, 50], sources=["f3", "g7", "g50"], replace=True)
    reference.update({3: (new[0], 1), 7: (new[1], 2), 50: (new[2], 3)})
    assert len(index) == 41 and index.ids.tolist() == [*range(40), 50]
    assert index.labels_of([3, 7, 50, 4]).tolist() == [1, 2, 3, 0]
    assert index.sources_of([3, 7, 50, 4]) == ["f3", "g7", "g50", "f4"]
    queries = np.concatenate([new, vectors[[3, 7]]])
    assert_exact(index.search(queries, 10), reference, queries, 10, "l2", False)


# -- magnitudes the index can and cannot represent ---------------------------------------------

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
MIN_NORM, MAX_NORM = 2.0**-63, 2.0**62  # squared: 2^-126 and 2^124, float32's normal range


def test_rows_of_extreme_magnitude_normalise_to_their_direction() -> None:
    """Rows whose float32 norm overflows (1e20: squares are inf) or falls below
    ``F.normalize``'s epsilon (1e-30) are stored as unit vectors all the same."""
    direction = np.array([3.0, 4.0, 0.0, 12.0]) / 13.0
    index = EmbeddingIndex.flat(4, metric="inner_product")
    rows = [
        torch.tensor([[3e20, 4e20, 0.0, 12e20]], dtype=torch.float32),
        torch.tensor([[3e-30, 4e-30, 0.0, 12e-30]], dtype=torch.float32),
        torch.tensor([[3e300, 4e300, 0.0, 12e300]], dtype=torch.float64),
        torch.tensor([[3e-300, 4e-300, 0.0, 12e-300]], dtype=torch.float64),
    ]
    for row in rows:
        index.add(row, [0])
    result = index.search(torch.from_numpy(direction[None]), 4)
    np.testing.assert_allclose(result.distances.numpy(), [[1.0, 1.0, 1.0, 1.0]], atol=1e-6)
    found = index.search(torch.tensor([[-3e20, -4e20, 0.0, -12e20]]), 1)
    np.testing.assert_allclose(found.distances.numpy(), [[-1.0]], atol=1e-6)


def test_unnormalised_rows_beyond_float32_distances_are_refused() -> None:
    index = EmbeddingIndex.flat(2, metric="l2", normalize=False)
    index.add(np.array([[1.0, 0.0]], np.float32), [0])
    for row, problem in (
        ([1e19, 1e19], r"norm 1.41e\+19: float32 squared distances overflow"),
        ([3e38, 0.0], "norm 3e\\+38: float32 squared distances overflow"),
        ([1e-20, 0.0], "norm 1e-20: float32 squared distances underflow"),
    ):
        with pytest.raises(ValueError, match=f"embeddings row 0 has {problem}"):
            index.add(np.array([row], np.float32), [0])
        with pytest.raises(ValueError, match=f"queries row 0 has {problem}"):
            index.search(np.array([row], np.float32), 1)
    assert len(index) == 1
    # The bounds themselves are fine, and so is an exact zero: their distances are exact.
    index = EmbeddingIndex.flat(2, metric="l2", normalize=False)
    index.add(np.array([[MAX_NORM, 0.0], [0.0, MIN_NORM], [0.0, 0.0]]), [1, 2, 3], [1, 2, 3])
    far = index.search(np.array([[-MAX_NORM, 0.0]]), 3)
    assert far.ids[0, 2] == 1
    assert far.distances[0].tolist() == [2.0**124, 2.0**124, 2.0**126]  # (2^62 + 2^62)^2
    near = index.search(np.array([[0.0, MIN_NORM]]), 2)
    assert near.ids[0].tolist() == [2, 3]
    assert near.distances[0].tolist() == [0.0, 2.0**-126]


def hypot_rows(x: np.ndarray) -> np.ndarray:
    """Row norms by ``math.hypot``, which neither overflows nor underflows."""
    return np.array([math.hypot(*row) for row in x.tolist()])


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(list(DTYPES)),
    setting=st.sampled_from(
        [(True, "inner_product"), (True, "l2"), (False, "l2"), (False, "inner_product")]
    ),
    exponent=st.one_of(st.integers(-24, 24), st.integers(-300, 300)),
    spread=st.integers(0, 30),
    zero_row=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_dtype_and_scale_is_stored_and_searched_right_or_refused(
    kind: str,
    dtype: str,
    setting: tuple[bool, str],
    exponent: int,
    spread: int,
    zero_row: bool,
    seed: int,
) -> None:
    """Embeddings of every floating dtype and of scales 1e-300..1e300 (rows of different
    scales mixed): either ``add`` refuses them with a ValueError because float32 distances
    cannot represent them, or every search distance matches a float64 brute force on the
    values as given (normalised by ``math.hypot``)."""
    normalize, metric = setting
    rng = np.random.default_rng(seed)
    n, dim = 12, 4
    row_exponents = np.clip(exponent + rng.integers(-spread, spread + 1, n), -300, 300)
    values = rng.standard_normal((n, dim)) * 10.0 ** row_exponents[:, None]
    if zero_row:
        values[5] = 0.0
    embeddings = torch.from_numpy(values).to(DTYPES[dtype])
    received = embeddings.double().numpy()  # the values as the index receives them, exactly
    norms = hypot_rows(received)
    index = make_index(kind, dim, metric=metric, normalize=normalize)
    if not np.isfinite(received).all():
        expected = "NaN or Inf"
    elif normalize and (norms == 0).any():
        expected = "all zeros"
    elif not normalize and ((norms > MAX_NORM) | ((norms < MIN_NORM) & (norms > 0))).any():
        expected = "float32 squared distances (overflow|underflow)"
    else:
        expected = ""
    if expected:
        with pytest.raises(ValueError, match=expected):
            index.add(embeddings, np.arange(n))
        assert len(index) == 0
        return
    ids = index.add(embeddings, np.arange(n)).numpy()
    result = index.search(embeddings, n)
    x = received / norms[:, None] if normalize else received
    if metric == "l2":
        truth = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        square = (x**2).sum(1)
        scale = square[:, None] + square[None, :]
    else:
        truth = x @ x.T
        length = np.sqrt((x**2).sum(1))
        scale = length[:, None] * length[None, :]
    got = result.distances.numpy().astype(np.float64)
    for q in range(n):
        assert sorted(result.ids[q].tolist()) == sorted(ids.tolist())
        expected_row = truth[q, result.ids[q].numpy()]
        tolerance = 1e-5 * scale[q, result.ids[q].numpy()] + 1e-6 * normalize
        assert (np.abs(got[q] - expected_row) <= tolerance).all(), (got[q], expected_row)


def test_saving_over_a_format_1_index_replaces_it(tmp_path: Path) -> None:
    """A format-1 save (one unverified manifest naming ``index-<16 hex>.faiss``) is refused by
    load with a way out, and a new save over it removes the file it named, nothing else."""
    old_file = tmp_path / "index-0123456789abcdef.faiss"
    old_file.write_bytes(b"an old faiss file")
    (tmp_path / "keep.tmp").write_bytes(b"the user's")
    old_manifest = {"format": index_module.FORMAT_NAME, "format_version": 1}
    (tmp_path / "manifest.json").write_text(
        json.dumps({**old_manifest, "index_file": old_file.name})
    )
    with pytest.raises(ValueError, match="format version 1.*rebuild the index"):
        EmbeddingIndex.load(tmp_path)
    index, vectors = filled("flat")
    index.save(tmp_path)
    assert not old_file.exists() and (tmp_path / "keep.tmp").read_bytes() == b"the user's"
    assert_same_index(index, EmbeddingIndex.load(tmp_path), vectors[:10])


def test_a_re_signed_next_id_below_the_stored_ids_is_refused(tmp_path: Path) -> None:
    index, _ = filled("flat")
    index.save(tmp_path)
    manifest, _ = read_save(tmp_path)
    manifest["next_id"] = 10  # ids up to 118 are stored: new ids would collide
    (tmp_path / "manifest.json").write_text(json.dumps(sign(manifest)))
    with pytest.raises(ValueError, match="next_id 10 is not above the stored ids"):
        EmbeddingIndex.load(tmp_path)
