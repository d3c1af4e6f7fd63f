"""The command line of a trained model at work: a searchable index, enrolment, verification.

deepmetric index build --run runs/x --dataset folder:gallery --out gallery.index --kind hnsw
deepmetric search --index gallery.index --run runs/x --dataset folder:queries -k 5 --json hits.json
deepmetric search --index gallery.index --vectors queries.npy        # embeddings, no model needed
deepmetric enroll --index gallery.index --run runs/x --dataset folder:new_people
deepmetric index remove --index gallery.index --class alice          # or --ids 3 7, --source F
deepmetric verify --run runs/x --dataset folder:faces --plot roc.png   # calibrate a threshold
deepmetric verify --run runs/x --a one.png --b two.png --threshold 0.8 # same or different?

A *run* is the folder a ``deepmetric train``/``demo`` wrote: ``config.yaml`` and a checkpoint
(``best.pt`` unless ``--checkpoint`` names another). Datasets are the specs of
:func:`deepmetric.runs.load_dataset` (``digits``, ``omniglot``, ``folder:PATH``, ``csv:PATH``,
``arrays:PATH``); images are decoded at the input size the run's model was trained on (its
``image_size``; 8x8 for the built-in digits), so queries look like the training data.

An index (:class:`~deepmetric.index.EmbeddingIndex`, a directory) records the fingerprint of
the model that filled it; ``search`` and ``enroll`` refuse a run whose model differs, since
distances between embeddings of two different models mean nothing. It also records each item's
source (an image's absolute path, else ``SPEC#i``, the ``i``-th sample of a dataset spec), so
that ``enroll`` refuses to store a file twice (``--skip-existing`` enrols only the new ones) and
``index remove --source`` finds an item by its file. ``index build`` refuses to replace an
existing index unless given ``--overwrite``.

Distances printed by ``search`` are Euclidean distances between the index's stored vectors
(unit vectors by default, the index normalises), the same units as the thresholds ``verify``
prints for a model that normalises its embeddings (the default). For an inner-product index
that does not normalise there is no Euclidean distance to report; the negated inner product
is printed instead (smaller is still closer).

Every command returns an exit code; bad input raises ``ValueError``, which
:func:`deepmetric.cli.main` prints as ``deepmetric: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import run_folder
from ..config import RunConfig, load_config
from ..data import DECODE_ERRORS, decode_image, open_dataset
from ..index import MANIFEST_NAME, EmbeddingIndex, SearchResult, model_fingerprint
from ..inference import Embedded, embed_dataset, loader_workers
from ..io import atomic_write_json
from ..models import embedder_from_config
from ..runs import build_model, dataset_kind, load_dataset
from ..training import load_checkpoint
from ..transforms import EvalTransform, SmallImageTransform
from ..verification import (
    VerificationResult,
    evaluate_labelled_set,
    pair_distances,
    plot_verification,
)

__all__ = ["TrainedRun", "embed_for_run", "load_image", "load_run", "load_run_dataset"]


# -- a trained run and its inputs -----------------------------------------------------------------
@dataclass
class TrainedRun:
    """A run folder's config and model (in evaluation mode), the shape of one model input
    (``(C, H, W)`` for images, ``(D,)`` for features), what ``run.json`` recorded, and the
    model's fingerprint."""

    config: RunConfig
    model: nn.Module
    input_shape: tuple[int, ...]
    fingerprint: str
    info: run_folder.RunInfo


def load_run(run_dir: str | Path, checkpoint: str = "best.pt") -> TrainedRun:
    """Rebuild the model of a run folder from ``config.yaml``, ``run.json`` and ``checkpoint``,
    without its training data (which may have moved) and from any working directory."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ValueError(f"run folder not found: {folder}")
    config = load_config(folder / "config.yaml")
    info = run_folder.read_info(folder)
    state = load_checkpoint(folder / checkpoint)
    described = info.extra.get("model")
    kept = folder / run_folder.BACKBONE_FOLDER
    if isinstance(described, dict) and (kept / "config.json").is_file():
        described = {**described, "trunk": f"hf:{kept}"}  # the copy recorded at training time
    if isinstance(described, dict):  # built by build_embedder: no weights file, no download
        model: nn.Module = embedder_from_config(described, pretrained=False)
    else:
        model = build_model(config.model, info.input_shape)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        raise ValueError(
            f"{folder / checkpoint} does not fit the model recorded in {folder}: {error}"
        ) from error
    model.eval()
    return TrainedRun(config, model, info.input_shape, model_fingerprint(model), info)


def _eval_transform(run: TrainedRun) -> EvalTransform | SmallImageTransform:
    """The run's evaluation transform: for a run on photos its input side and normalisation
    (resize, centre crop); for one on in-memory character images the square resize its
    training data had."""
    channels, size = run.input_shape[0], run.input_shape[-1]
    if not run.info.extra.get("lazy"):
        return SmallImageTransform(size)
    spec = run.info.extra.get("input_spec") or {}
    mean = tuple(spec.get("mean", (0.0,) * channels))
    std = tuple(spec.get("std", (1.0,) * channels))
    return EvalTransform(size, mean=mean, std=std)


def load_run_dataset(spec: str, run: TrainedRun) -> Any:
    """A dataset spec prepared for ``run``'s model: photos as a lazy dataset with the run's
    evaluation transform, built-in and NumPy data decoded at the model's input size; a
    ``ValueError`` if the samples are not shaped like the model's inputs."""
    if dataset_kind(spec) == "images":
        if len(run.input_shape) != 3:
            raise ValueError(
                f"the run's model takes feature vectors of shape {run.input_shape}, not images"
            )
        mode = "RGB" if run.input_shape[0] == 3 else "L"
        return open_dataset(spec, mode=mode, transform=_eval_transform(run))
    size = run.input_shape[-1] if len(run.input_shape) == 3 else 28
    dataset = load_dataset(spec, size)
    shape = tuple(dataset.x.shape[1:])
    if shape != run.input_shape:
        raise ValueError(
            f"dataset {spec!r} holds samples of shape {shape}, the run's model takes "
            f"{run.input_shape}"
        )
    return dataset


def load_image(path: str | Path, run: TrainedRun) -> Tensor:
    """One image file as a batch of one ``(1, C, H, W)``, decoded as the run's evaluation
    data is (photos: resize, centre crop and normalise; grey character images: a square)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    shape = run.input_shape
    if len(shape) != 3:
        raise ValueError(f"the run's model takes inputs of shape {shape}, not images")
    mode = "RGB" if shape[0] == 3 else "L"
    try:
        image = decode_image(path, mode)
    except DECODE_ERRORS as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return _eval_transform(run)(image, None)[None]


def embed_for_run(run: TrainedRun, data: Any, progress: bool = True) -> Embedded:
    """:func:`deepmetric.inference.embed_dataset` with the run's batch size and workers."""
    return embed_dataset(
        run.model,
        data,
        batch_size=run.config.train.embed_batch_size,
        num_workers=loader_workers(run.config.train.num_workers, data),
        progress=progress,
    )


# -- the index ------------------------------------------------------------------------------------
def _load_index(directory: str | Path) -> EmbeddingIndex:
    try:
        return EmbeddingIndex.load(directory)
    except FileNotFoundError as error:
        raise ValueError(str(error)) from error


def _check_same_model(index: EmbeddingIndex, run: TrainedRun, index_dir: str, run_dir: str) -> None:
    """Refuse a run whose model did not fill ``index``."""
    if index.fingerprint != run.fingerprint:
        recorded = "none recorded" if index.fingerprint is None else index.fingerprint[:12]
        raise ValueError(
            f"model fingerprint mismatch: the index {index_dir} was filled by another model "
            f"({recorded}) than the run {run_dir} ({run.fingerprint[:12]}); its distances "
            "would mean nothing. Use the run that built the index, or rebuild it with "
            "'deepmetric index build'"
        )


def euclidean_distances(index: EmbeddingIndex, scores: Tensor) -> Tensor:
    """faiss's scores -> Euclidean distances between the stored vectors (see the module doc).

    ``"l2"`` indexes report squared distances; an inner-product index that normalises reports
    cosine similarities ``s`` of unit vectors, at distance ``sqrt(2 - 2 s)``.
    """
    if index.metric == "l2":
        return scores.clamp(min=0).sqrt()
    if index.normalize:
        return (2 - 2 * scores).clamp(min=0).sqrt()
    return -scores


def _sources(spec: str, dataset: Any, rows: Sequence[int] | None = None) -> list[str]:
    """Where each of ``rows`` of ``dataset`` (loaded from ``spec``; default: every row) came
    from: its image file's absolute path, or ``SPEC#i`` for the ``i``-th sample of the built-in
    data or an array file."""
    rows = range(len(dataset)) if rows is None else rows
    paths = getattr(dataset, "paths", None)  # lazy image datasets keep their files
    if paths is not None:
        return [os.path.abspath(paths[i]) for i in rows]
    kind, _, location = spec.partition(":")
    if kind == "arrays" and location:
        spec = f"arrays:{os.path.abspath(location)}"
    return [f"{spec}#{i}" for i in rows]


def _check_ivf_can_train(nlist: int, n_items: int, what: str) -> None:
    """An IVF index learns its ``nlist`` cells from its first items: say on the command line
    what to do when there are too few."""
    if n_items < nlist:
        raise ValueError(
            f"an IVF index with --nlist {nlist} needs at least {nlist} items to train its cells, "
            f"and {what} has {n_items}: pass a smaller --nlist (about {max(1, n_items // 39)} "
            "gives the ~39 items per cell faiss asks for) or use --kind flat (exact search, "
            "fast enough up to about a million items)"
        )


def cmd_index_build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; an index is a directory")
    if (out / MANIFEST_NAME).exists() and not args.overwrite:
        raise ValueError(
            f"{out} already holds an index: pass --overwrite to replace it, add to it with "
            f"'deepmetric enroll --index {out}', or choose another --out"
        )
    run = load_run(args.run, args.checkpoint)
    index = EmbeddingIndex(
        run.config.model.embedding_size,
        kind=args.kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        m=args.m,
        ef_search=args.ef_search,
    )
    dataset = load_run_dataset(args.dataset, run)
    if index.kind == "ivf":
        _check_ivf_can_train(index.nlist, len(dataset), args.dataset)
    embedded = embed_for_run(run, dataset)
    index.fingerprint = run.fingerprint  # search and enroll refuse any other model
    index.add(
        embedded.embeddings,
        _labels(embedded),
        sources=_sources(args.dataset, dataset, embedded.kept_indices.tolist()),
    )
    index.class_names = dict(enumerate(dataset.class_names))
    index.save(out)
    print(
        f"indexed {len(index)} items of {len(dataset.class_names)} classes from "
        f"{args.dataset} ({index.kind}, {index.embedding_size}-dimensional) -> {out}"
    )
    return 0


def _search_report(
    index: EmbeddingIndex,
    result: SearchResult,
    query_labels: Tensor | None,
    query_names: Sequence[str],
    query_files: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The results as plain data: per query its file and class name (when known) and its
    neighbours, each with its id, class name, source file (when the index recorded one) and
    Euclidean distance. Labels are not reported: a query folder numbers its classes by
    itself, the index by its own names, so only names compare."""
    distances = euclidean_distances(index, result.distances)
    queries = []
    for q in range(len(result.ids)):
        entry: dict[str, Any] = {"query": q}
        if query_files is not None:
            entry["file"] = query_files[q]
        if query_labels is not None:
            label = int(query_labels[q])
            entry["class_name"] = query_names[label] if label < len(query_names) else str(label)
        neighbours = []
        for item, label, distance in zip(
            result.ids[q].tolist(), result.labels[q].tolist(), distances[q].tolist(), strict=True
        ):
            if item < 0:  # fewer than k items in the index
                continue
            hit: dict[str, Any] = {
                "id": item,
                "class_name": index.class_names.get(label, str(label)),
                "distance": distance,
            }
            source = _source(index, item)
            if source is not None:
                hit["file"] = source
            neighbours.append(hit)
        entry["neighbours"] = neighbours
        queries.append(entry)
    return {"k": int(result.ids.shape[1]), "distance": "euclidean", "queries": queries}


def _source(index: EmbeddingIndex, item: int) -> str | None:
    """The file (or ``SPEC#i``) an indexed item came from, when it was recorded."""
    return index.sources_of([item])[0]


def _labels(embedded: Embedded) -> Tensor:
    if embedded.labels is None:
        raise ValueError("this command needs a labelled dataset (class folders)")
    return embedded.labels


def _print_search_report(report: dict[str, Any]) -> None:
    for entry in report["queries"]:
        known = f" (class {entry['class_name']!r})" if "class_name" in entry else ""
        name = entry.get("file", f"query {entry['query']}")
        print(f"{name}{known}:")
        for rank, hit in enumerate(entry["neighbours"], start=1):
            where = f"  {hit['file']}" if "file" in hit else ""
            print(
                f"  {rank:>3}. id {hit['id']:<8} class {hit['class_name']!r:<20} "
                f"distance {hit['distance']:.4f}{where}"
            )


def _write_json(path: str, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)


def _load_vectors(path: str) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"vectors file not found: {file}")
    try:
        vectors = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {file} as a .npy array: {error}") from error
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
        raise ValueError(f"{file} must hold a 2-D (n_queries, embedding_size) array")
    return vectors


def cmd_search(args: argparse.Namespace) -> int:
    if (args.dataset is None) == (args.vectors is None):
        raise ValueError("search needs exactly one of --dataset SPEC and --vectors FILE.npy")
    if args.dataset is not None and args.run is None:
        raise ValueError("--dataset needs --run: the run's model embeds the query images")
    index = _load_index(args.index)
    query_labels: Tensor | None = None
    query_names: list[str] = []
    query_files: list[str] | None = None
    if args.dataset is not None:
        run = load_run(args.run, args.checkpoint)
        _check_same_model(index, run, args.index, args.run)
        dataset = load_run_dataset(args.dataset, run)
        embedded = embed_for_run(run, dataset, progress=False)
        queries: Tensor | np.ndarray = embedded.embeddings
        query_labels, query_names = _labels(embedded), dataset.class_names
        paths = getattr(dataset, "paths", None)
        if paths is not None:
            query_files = [str(paths[i]) for i in embedded.kept_indices.tolist()]
    else:
        queries = _load_vectors(args.vectors)
    result = index.search(queries, args.k)
    report = _search_report(index, result, query_labels, query_names, query_files)
    if args.json:
        _write_json(args.json, report)
        print(f"wrote the {report['k']} nearest items of {len(result.ids)} queries to {args.json}")
    else:
        _print_search_report(report)
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    index = _load_index(args.index)
    run = load_run(args.run, args.checkpoint)
    _check_same_model(index, run, args.index, args.run)
    dataset = load_run_dataset(args.dataset, run)
    sources = _sources(args.dataset, dataset)
    stored = {source for source in index.sources if source is not None}
    known = [i for i, source in enumerate(sources) if source in stored]
    if known and not args.skip_existing:
        raise ValueError(
            f"{len(known)} of the {len(sources)} items of {args.dataset} are already in the "
            f"index {args.index} (e.g. {sources[known[0]]}); enrolling them again would "
            "store duplicates. Pass --skip-existing to enrol only the new ones, or remove "
            f"the old ones first ('deepmetric index remove --index {args.index} --source "
            "FILE ...')"
        )
    if known:
        keep = sorted(set(range(len(sources))) - set(known))
        print(f"skipping {len(known)} items already in the index")
        if not keep:
            print(f"nothing to enrol: the index already holds every item of {args.dataset}")
            return 0
        dataset = dataset.subset(keep)
    if index.kind == "ivf" and not index.is_trained:
        _check_ivf_can_train(index.nlist, len(dataset), f"{args.dataset} (to enrol)")
    # A class name the index already knows keeps its label; every other name gets a new one.
    label_of: dict[str, int] = {}
    for label, name in sorted(index.class_names.items()):
        label_of.setdefault(name, label)
    used = [*index.class_names, *index.labels.tolist()]
    next_label = max(used, default=-1) + 1
    present = sorted(set(dataset.labels.tolist()))
    new_names = []
    for name in (dataset.class_names[label] for label in present):
        if name not in label_of:
            label_of[name] = next_label
            new_names.append(name)
            next_label += 1
    mapping = torch.tensor([label_of.get(name, -1) for name in dataset.class_names])
    embedded = embed_for_run(run, dataset)
    ids = index.add(
        embedded.embeddings,
        mapping[_labels(embedded)],
        sources=_sources(args.dataset, dataset, embedded.kept_indices.tolist()),
    )
    index.class_names.update({label_of[name]: name for name in new_names})
    index.save(args.index)  # crash-safe: the manifest naming the new items is renamed in last
    print(
        f"enrolled {len(ids)} items (ids {int(ids.min())}-{int(ids.max())}): "
        f"{len(new_names)} new classes, {len(present) - len(new_names)} known; "
        f"the index now holds {len(index)} items"
    )
    return 0


def _ids_to_remove(index: EmbeddingIndex, args: argparse.Namespace) -> np.ndarray:
    """The ids named by ``--ids``, ``--class`` and ``--source`` (``ValueError`` for any that
    names nothing in the index, before anything is removed)."""
    chosen: list[np.ndarray] = []
    if args.ids:
        wanted = np.array(args.ids, dtype=np.int64)
        missing = [int(i) for i in wanted if int(i) not in index]
        if missing:
            raise ValueError(f"ids not in the index {args.index}: {missing[:10]}")
        chosen.append(wanted)
    if args.class_names:
        ids, labels = index.ids.numpy(), index.labels.numpy()
        for name in args.class_names:
            of_class = [label for label, known in index.class_names.items() if known == name]
            members = ids[np.isin(labels, of_class)]
            if len(members) == 0:
                known_names = ", ".join(sorted(set(index.class_names.values()))[:20])
                raise ValueError(
                    f"no item of class {name!r} in the index {args.index} (its classes: "
                    f"{known_names})"
                )
            chosen.append(members)
    if args.sources:
        stored = {source for source in index.sources if source is not None}
        # A file is stored under its absolute path; SPEC#i sources are matched as given.
        names = [s if s in stored else os.path.abspath(s) for s in args.sources]
        missing = [
            given for given, name in zip(args.sources, names, strict=True) if name not in stored
        ]
        if missing:
            raise ValueError(f"no item of the index {args.index} was enrolled from {missing[:5]}")
        chosen.append(index.ids_of_sources(names).numpy())
    return np.unique(np.concatenate(chosen))


def cmd_index_remove(args: argparse.Namespace) -> int:
    if not (args.ids or args.class_names or args.sources):
        raise ValueError("index remove needs --ids, --class or --source: which items to remove")
    index = _load_index(args.index)
    doomed = _ids_to_remove(index, args)
    index.remove(doomed)
    if args.compact:
        try:
            index.compact()
        except ValueError as error:  # an IVF index with fewer items left than cells
            raise ValueError(
                f"{error}: run without --compact (the cells stay as they were trained) or "
                "rebuild the index with 'deepmetric index build' and a smaller --nlist"
            ) from error
    index.save(args.index)
    tombstones = (
        f" ({index.n_tombstones} removed items stay in the HNSW graph until --compact)"
        if index.n_tombstones
        else ""
    )
    print(
        f"removed {len(doomed)} items from {args.index}; it now holds {len(index)} "
        f"items{tombstones}"
    )
    return 0


# -- verification ---------------------------------------------------------------------------------
def calibrate(
    run: TrainedRun, dataset: Any, pairs: int, target_fpr: float, seed: int = 0
) -> VerificationResult:
    """Sample up to ``pairs`` genuine and ``pairs`` impostor pairs of ``dataset``, score them by
    the Euclidean distance of their embeddings and compute the verification metrics."""
    if pairs < 1:
        raise ValueError(f"--pairs must be a positive integer, got {pairs}")
    embedded = embed_for_run(run, dataset)
    return evaluate_labelled_set(
        embedded.embeddings,
        _labels(embedded),
        max_pairs=pairs,
        seed=seed,
        target_fprs=(target_fpr,),
    )


def _print_calibration(result: VerificationResult, spec: str) -> None:
    n_impostor = len(result.impostor)
    print(
        f"verification on {spec}: {len(result.genuine)} genuine and {n_impostor} impostor "
        "pairs, Euclidean distance of the embeddings"
    )
    print(f"AUC             {result.auc:.4f}")
    print(f"EER             {result.eer:.4f} (threshold {result.eer_threshold:.4f})")
    for target, tpr in result.tpr_at_fpr.items():
        threshold = result.threshold_at_fpr[target]
        print(f"TPR @ FPR {target:<6g}{tpr:.4f} (threshold {threshold:.4f})")
        if target < 1 / n_impostor:
            print(f"  (with {n_impostor} impostor pairs, FPRs below {1 / n_impostor:.2g} read 0)")
    print(
        f"best accuracy   {result.best_accuracy:.4f} at threshold {result.best_threshold:.4f} "
        "(same when distance <= threshold)"
    )


def _verify_pair(args: argparse.Namespace, run: TrainedRun, threshold: float) -> dict[str, Any]:
    a, b = load_image(args.a, run), load_image(args.b, run)
    with torch.no_grad():
        embeddings = run.model(torch.cat([a, b])).float()
    distance = float(pair_distances(embeddings, [0], [1])[0])
    same = distance <= threshold
    relation = "<=" if same else ">"
    print(
        f"{'same' if same else 'different'}: distance {distance:.4f} {relation} "
        f"threshold {threshold:.4f}"
    )
    return {"a": args.a, "b": args.b, "distance": distance, "threshold": threshold, "same": same}


def cmd_verify(args: argparse.Namespace) -> int:
    pair_mode = args.a is not None or args.b is not None
    if pair_mode and (args.a is None or args.b is None):
        raise ValueError("--a and --b go together: two image files to compare")
    if not pair_mode and args.dataset is None:
        raise ValueError("verify needs --dataset SPEC (calibrate) or --a IMG --b IMG (compare)")
    if pair_mode and args.threshold is None and args.dataset is None:
        raise ValueError(
            "--a/--b need --threshold T (the best-accuracy threshold 'deepmetric verify "
            "--dataset' prints) or --dataset SPEC to calibrate one"
        )
    if not 0 < args.target_fpr <= 1:
        raise ValueError(f"--target-fpr must be in (0, 1], got {args.target_fpr}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ValueError(f"--threshold must be a finite number, got {args.threshold}")
    run = load_run(args.run, args.checkpoint)
    report: dict[str, Any] = {}
    threshold = args.threshold
    if args.dataset is not None:
        dataset = load_run_dataset(args.dataset, run)
        result = calibrate(run, dataset, args.pairs, args.target_fpr, seed=args.seed)
        _print_calibration(result, args.dataset)
        report["calibration"] = result.summary()
        if args.plot:
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
            print(f"plot: {plot_verification(result, args.plot)}")
        if threshold is None:
            threshold = result.best_threshold
    if pair_mode:
        report["pair"] = _verify_pair(args, run, threshold)
    if args.json:
        _write_json(args.json, report)
    return 0
