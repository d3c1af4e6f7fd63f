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
import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .data import IMAGE_SUFFIXES, ArrayDataset
from .index import MANIFEST_NAME, EmbeddingIndex, SearchResult, embed, model_fingerprint
from .runs import RunConfig, build_model, load_config, load_dataset
from .training import load_checkpoint
from .verification import (
    VerificationResult,
    evaluate_labelled_set,
    pair_distances,
    plot_verification,
)

__all__ = ["TrainedRun", "add_index_commands", "load_image", "load_run", "load_run_dataset"]


# -- a trained run and its inputs -----------------------------------------------------------------
@dataclass
class TrainedRun:
    """A run folder's config and model (in evaluation mode), the shape of one model input
    (``(C, H, W)`` for images, ``(D,)`` for features) and the model's fingerprint."""

    config: RunConfig
    model: nn.Module
    input_shape: tuple[int, ...]
    fingerprint: str


def load_run(run_dir: str | Path, checkpoint: str = "best.pt") -> TrainedRun:
    """Rebuild the model of a run folder from ``config.yaml`` and ``checkpoint``.

    The run's own dataset is loaded for the shape of its inputs (the model is built for it).
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ValueError(f"run folder not found: {folder}")
    config = load_config(folder / "config.yaml")
    state = load_checkpoint(folder / checkpoint)
    sample = load_dataset(config.dataset, config.image_size).x[0]
    model = build_model(config.model, sample)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        raise ValueError(
            f"{folder / checkpoint} does not fit the model of {folder / 'config.yaml'}: {error}"
        ) from error
    model.eval()
    return TrainedRun(config, model, tuple(sample.shape), model_fingerprint(model))


def _input_size(run: TrainedRun) -> int:
    """The side length images are resized to: the model's square input, else ``image_size``."""
    shape = run.input_shape
    if len(shape) == 3 and shape[1] == shape[2]:
        return shape[2]
    return run.config.image_size


def load_run_dataset(spec: str, run: TrainedRun) -> ArrayDataset:
    """Load a dataset spec for ``run``'s model: images decoded at the model's input size, and
    a ``ValueError`` if the samples are not shaped like the model's inputs."""
    dataset = load_dataset(spec, _input_size(run))
    shape = tuple(dataset.x.shape[1:])
    if shape != run.input_shape:
        raise ValueError(
            f"dataset {spec!r} holds samples of shape {shape}, the run's model takes "
            f"{run.input_shape}"
        )
    return dataset


def load_image(path: str | Path, run: TrainedRun) -> Tensor:
    """One image file as ``(1, 1, H, W)`` float32 in ``[0, 1]``: grayscale, resized to the
    run's input size, decoded exactly as :func:`deepmetric.data.load_image_folder` does."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    shape = run.input_shape
    if len(shape) != 3 or shape[0] != 1:
        raise ValueError(
            f"the run's model takes inputs of shape {shape}, not single-channel images"
        )
    try:
        with Image.open(path) as img:
            grey = img.convert("L").resize((shape[2], shape[1]), Image.Resampling.BILINEAR)
            array = np.asarray(grey, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return torch.from_numpy(array)[None, None]


def _embed(run: TrainedRun, x: Tensor) -> Tensor:
    return embed(run.model, x, batch_size=run.config.train.embed_batch_size, progress=False)


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


def _dataset_sources(spec: str, dataset: ArrayDataset) -> list[str] | None:
    """Where each sample of ``dataset`` (loaded from ``spec``) came from: its file's absolute
    path, or ``SPEC#i`` for the ``i``-th sample of digits, omniglot or an array file; ``None``
    where that is not known (an unreadable image was skipped, so files and samples no longer
    line up)."""
    paths = getattr(dataset, "paths", None)  # datasets that keep their files say so
    if paths is not None and len(paths) == len(dataset):
        return [os.path.abspath(path) for path in paths]
    kind, _, location = spec.partition(":")
    if kind in ("folder", "csv") and location:
        files = _image_files(kind, Path(location))
        return [os.path.abspath(f) for f in files] if len(files) == len(dataset) else None
    if kind == "arrays" and location:
        spec = f"arrays:{os.path.abspath(location)}"
    return [f"{spec}#{i}" for i in range(len(dataset))]


def _image_files(kind: str, location: Path) -> list[Path]:
    """The image files of a ``folder:`` or ``csv:`` dataset in the order
    :func:`deepmetric.data.load_image_folder` / ``load_image_csv`` read them."""
    if kind == "folder":
        classes = sorted(p for p in location.iterdir() if p.is_dir())
        return [
            path
            for folder in classes
            for path in sorted(folder.rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
    with location.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if rows and [cell.strip().lower() for cell in rows[0]] == ["path", "label"]:
        rows = rows[1:]
    return [location.parent / row[0].strip() for row in rows]


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
    index.add_from_model(
        run.model,
        dataset.x,
        dataset.labels,
        sources=_dataset_sources(args.dataset, dataset),
        batch_size=run.config.train.embed_batch_size,
        progress=False,
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
) -> dict[str, Any]:
    """The results as plain data: per query its label (if known) and its neighbours."""
    distances = euclidean_distances(index, result.distances)
    queries = []
    for q in range(len(result.ids)):
        entry: dict[str, Any] = {"query": q}
        if query_labels is not None:
            label = int(query_labels[q])
            entry["label"] = label
            entry["class_name"] = query_names[label] if label < len(query_names) else str(label)
        neighbours = []
        for item, label, distance in zip(
            result.ids[q].tolist(), result.labels[q].tolist(), distances[q].tolist(), strict=True
        ):
            if item < 0:  # fewer than k items in the index
                continue
            neighbours.append(
                {
                    "id": item,
                    "label": label,
                    "class_name": index.class_names.get(label, str(label)),
                    "distance": distance,
                }
            )
        entry["neighbours"] = neighbours
        queries.append(entry)
    return {"k": int(result.ids.shape[1]), "metric": index.metric, "queries": queries}


def _print_search_report(report: dict[str, Any]) -> None:
    for entry in report["queries"]:
        known = f" (class {entry['class_name']!r})" if "class_name" in entry else ""
        print(f"query {entry['query']}{known}:")
        for rank, hit in enumerate(entry["neighbours"], start=1):
            print(
                f"  {rank:>3}. id {hit['id']:<8} class {hit['class_name']!r:<20} "
                f"distance {hit['distance']:.4f}"
            )


def _write_json(path: str, data: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))


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
    if args.dataset is not None:
        run = load_run(args.run, args.checkpoint)
        _check_same_model(index, run, args.index, args.run)
        dataset = load_run_dataset(args.dataset, run)
        queries: Tensor | np.ndarray = _embed(run, dataset.x)
        query_labels, query_names = dataset.labels, dataset.class_names
    else:
        queries = _load_vectors(args.vectors)
    result = index.search(queries, args.k)
    report = _search_report(index, result, query_labels, query_names)
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
    sources = _dataset_sources(args.dataset, dataset)
    if sources is None:
        print(
            f"deepmetric: warning: the files of {args.dataset} do not line up with its samples "
            "(unreadable images were skipped); they are enrolled without their file names, and "
            "files already in the index cannot be detected",
            file=sys.stderr,
        )
    else:
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
            dataset, sources = dataset.subset(keep), [sources[i] for i in keep]
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
    labels = mapping[dataset.labels]
    ids = index.add_from_model(
        run.model,
        dataset.x,
        labels,
        sources=sources,
        batch_size=run.config.train.embed_batch_size,
        progress=False,
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
    run: TrainedRun, dataset: ArrayDataset, pairs: int, target_fpr: float, seed: int = 0
) -> VerificationResult:
    """Sample up to ``pairs`` genuine and ``pairs`` impostor pairs of ``dataset``, score them by
    the Euclidean distance of their embeddings and compute the verification metrics."""
    if pairs < 1:
        raise ValueError(f"--pairs must be a positive integer, got {pairs}")
    return evaluate_labelled_set(
        _embed(run, dataset.x),
        dataset.labels,
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
    embeddings = _embed(run, torch.cat([a, b]))
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


# -- the parsers ----------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _add_run_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--run", required=required, help="run folder (config.yaml + checkpoint)")
    parser.add_argument("--checkpoint", default="best.pt", help="checkpoint file in the run")


def add_index_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``index build``, ``index remove``, ``search``, ``enroll`` and ``verify`` on
    the subcommands of the ``deepmetric`` parser."""
    index = sub.add_parser(
        "index", help="build a searchable index of a dataset's embeddings, or remove items"
    )
    index_sub = index.add_subparsers(dest="index_command", required=True)
    build = index_sub.add_parser(
        "build",
        help="embed a dataset and save an index of it",
        description="Embed every sample of --dataset with the run's model and save a "
        "searchable index of the embeddings (with their labels, class names and files) in --out.",
    )
    _add_run_flags(build)
    build.add_argument("--dataset", required=True, help="dataset spec, e.g. folder:PATH")
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the index already in --out (default: refuse, so that an enrolled index "
        "is not lost by accident)",
    )
    build.add_argument(
        "--kind",
        choices=("flat", "ivf", "hnsw"),
        default="flat",
        help="flat: exact search, fast enough up to about a million items (default); ivf: "
        "k-means cells, approximate (--nlist, --nprobe); hnsw: a graph, approximate "
        "(--m, --ef-search)",
    )
    build.add_argument(
        "--nlist",
        type=_positive_int,
        default=None,
        help="IVF: k-means cells (default 1024); needs at least that many items, ideally ~39 "
        "per cell",
    )
    build.add_argument(
        "--nprobe",
        type=_positive_int,
        default=None,
        help="IVF: cells searched per query (default min(32, nlist); nlist is exact)",
    )
    build.add_argument(
        "--m", type=_positive_int, default=None, help="HNSW: links per node (default 32)"
    )
    build.add_argument(
        "--ef-search",
        type=_positive_int,
        default=None,
        help="HNSW: candidates kept per query (default 64; more is slower and more exact)",
    )
    build.set_defaults(func=cmd_index_build)

    remove = index_sub.add_parser(
        "remove",
        help="remove items from an index by id, class or file",
        description="Remove items from an index in place; any of --ids, --class and --source, "
        "which may be combined. Every name must match an item, or nothing is removed.",
    )
    remove.add_argument("--index", required=True, help="index directory (updated in place)")
    remove.add_argument(
        "--ids", type=_non_negative_int, nargs="+", metavar="ID", help="the items' ids"
    )
    remove.add_argument(
        "--class",
        dest="class_names",
        nargs="+",
        metavar="NAME",
        help="every item of these classes",
    )
    remove.add_argument(
        "--source",
        dest="sources",
        nargs="+",
        metavar="FILE",
        help="the items enrolled from these image files (or SPEC#i sources)",
    )
    remove.add_argument(
        "--compact",
        action="store_true",
        help="rebuild the index from the items left (HNSW: drops the removed nodes from the "
        "graph; IVF: re-trains the cells)",
    )
    remove.set_defaults(func=cmd_index_remove)

    search = sub.add_parser("search", help="nearest indexed items of query images or vectors")
    search.add_argument("--index", required=True, help="index directory")
    _add_run_flags(search, required=False)
    search.add_argument("--dataset", default=None, help="query images (needs --run)")
    search.add_argument("--vectors", default=None, help="query embeddings, a 2-D .npy")
    search.add_argument("-k", type=_positive_int, default=5, help="neighbours per query")
    search.add_argument("--json", default=None, metavar="OUT", help="write the results here")
    search.set_defaults(func=cmd_search)

    enroll = sub.add_parser(
        "enroll",
        help="add new classes to an index, no retraining",
        description="Embed --dataset with the run that built the index and add it to the index "
        "in place: known class names keep their label, new ones get a new label. A file "
        "already in the index is refused unless --skip-existing.",
    )
    enroll.add_argument("--index", required=True, help="index directory (updated in place)")
    _add_run_flags(enroll)
    enroll.add_argument(
        "--dataset", required=True, help="e.g. folder:PATH, one sub-folder per new class"
    )
    enroll.add_argument(
        "--skip-existing",
        action="store_true",
        help="enrol only the files not already in the index (default: refuse the whole dataset "
        "if any file is)",
    )
    enroll.set_defaults(func=cmd_enroll)

    verify = sub.add_parser("verify", help="calibrate same/different, or decide for two images")
    _add_run_flags(verify)
    verify.add_argument("--dataset", default=None, help="labelled data to calibrate on")
    verify.add_argument(
        "--pairs", type=_positive_int, default=1000, help="genuine and impostor pairs, each"
    )
    verify.add_argument("--target-fpr", type=float, default=1e-3, help="false accept rate")
    verify.add_argument("--seed", type=int, default=0, help="seed of the pair sampling")
    verify.add_argument("--plot", default=None, metavar="OUT.png", help="write the plot here")
    verify.add_argument("--a", default=None, metavar="IMG", help="first image to compare")
    verify.add_argument("--b", default=None, metavar="IMG", help="second image to compare")
    verify.add_argument("--threshold", type=float, default=None, help="same when distance <= T")
    verify.add_argument("--json", default=None, metavar="OUT", help="write the numbers here")
    verify.set_defaults(func=cmd_verify)
