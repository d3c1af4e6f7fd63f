"""The commands that train and score: ``demo``, ``oneshot``, ``train``, ``evaluate``, ``embed``.

Each ``cmd_*`` takes the parsed arguments of :func:`deepmetric.cli.build_parser` and returns an
exit code; the experiment itself is :mod:`deepmetric.experiment`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import METRIC_NAMES, RunConfig, TrainConfig, load_config, parse_yaml
from ..distributed.launch import launcher_rank
from ..experiment import (
    demo_config,
    format_table,
    launch_experiment,
    one_shot_accuracies,
    one_shot_identification,
    oneshot_config,
    run_experiment,
)
from ..io import atomic_write, atomic_write_text
from ..models import EmbeddingNet
from ..runs import build_data
from ..training import retrieval_metrics
from .index import TrainedRun, embed_for_run, load_run, load_run_dataset


def cmd_demo(args: argparse.Namespace) -> int:
    config = demo_config(args.dataset, args.epochs, args.seed, args.out)
    config.projection = args.projection
    config.train.progress = not args.no_progress
    if launcher_rank() == 0:
        print(f"deepmetric demo: {config.dataset}, {config.train.epochs} epochs -> {config.out}")
    results = launch_experiment(config, args.nproc, args.dist_timeout, "overwrite")
    if results is None:  # a torchrun process other than rank 0
        return 0
    _print_results(config, results)
    return 0


def cmd_oneshot(args: argparse.Namespace) -> int:
    config = oneshot_config(args.epochs, args.seed, args.out, args.tta)
    config.train.progress = not args.no_progress
    print(f"deepmetric oneshot: {config.train.epochs} epochs, seed {args.seed} -> {config.out}")
    results = run_experiment(config, mode="overwrite")
    per_run = results["one_shot_per_run"]
    names = list(per_run)
    widths = [max(17, len(n)) for n in names]
    print("\nrun   " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True)))
    for i in range(len(per_run[names[0]])):
        cells = [f"{per_run[n][i]:>{w}.3f}" for n, w in zip(names, widths, strict=True)]
        print(f"{i + 1:>3}   " + "  ".join(cells))
    print()
    print(format_table(results["table"]))
    print(results["verdict"])
    print(f"training took {results['train_seconds']:.0f} s")
    return 0


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values: dict[str, Any] = {}
    if args.config:
        values = load_config(args.config).to_dict()
    else:
        values = RunConfig().to_dict()
    train = values.setdefault("train", {})
    for f in fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            train[f.name] = value
    keys = ("dataset", "image_size", "test_classes", "val_classes", "rotations", "hdml")
    for key in (*keys, "test_time_augment", "projection", "out"):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    if args.augment is not None:  # YAML text: 'null' turns augmentation off
        values["augment"] = parse_yaml(args.augment)
    if args.embedding_size is not None:
        values["model"]["embedding_size"] = args.embedding_size
    if args.trunk is not None:
        values["model"]["trunk"] = args.trunk
    if args.weights is not None:
        values["model"]["weights"] = args.weights
    if args.loss is not None:
        values["loss"] = {"name": args.loss}
    if args.miner is not None:
        values["miner"] = None if args.miner.lower() == "none" else {"name": args.miner}
    for assignment in args.set:
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}")
        target = values
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                raise ValueError(f"--set {key}: '{part}' is not a mapping in the config")
            target = target[part]
        target[parts[-1]] = parse_yaml(raw)
    return RunConfig.from_dict(values)


def _print_results(config: RunConfig, results: dict[str, Any]) -> None:
    print()
    print(format_table(results["table"]))
    print()
    print(results["verdict"])
    print(f"training took {results['train_seconds']:.0f} s; scores of {results['checkpoint']}")
    print(f"run folder: {config.out}  report: {Path(config.out) / 'report.html'}")


def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.train.progress = not args.no_progress
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "auto"
    if launcher_rank() == 0:
        print(f"deepmetric train: {config.dataset}, trunk {config.model.trunk} -> {config.out}")
    results = launch_experiment(config, args.nproc, args.dist_timeout, mode)
    if results is None:  # a torchrun process other than rank 0
        return 0
    _print_results(config, results)
    return 0


def _run_test_split(run: TrainedRun) -> tuple[Any, list[Any]]:
    """The held-out test classes of a run (and Omniglot's one-shot runs), read from the data
    the run recorded, through the same split."""
    config = run.config
    recorded = run.info.extra.get("dataset_path")
    if recorded:
        kind = config.dataset.partition(":")[0]
        config = RunConfig.from_dict({**config.to_dict(), "dataset": f"{kind}:{recorded}"})
    model = run.model if isinstance(run.model, EmbeddingNet) else None
    data = build_data(config, model)
    return data.test, data.one_shot_runs


def cmd_evaluate(args: argparse.Namespace) -> int:
    run = load_run(args.run, args.checkpoint)
    if args.dataset:
        test_set, runs = load_run_dataset(args.dataset, run), list[Any]()
        split = args.dataset
    else:
        test_set, runs = _run_test_split(run)
        split = f"the run's test classes ({run.config.dataset})"
    scores: dict[str, Any] = {"run": str(args.run), "checkpoint": args.checkpoint, "data": split}
    if len(test_set):  # (the one-shot benchmark holds out no test classes)
        embedded = embed_for_run(run, test_set, progress=not args.no_progress)
        assert embedded.labels is not None
        scores["images"] = len(embedded.embeddings)
        scores["classes"] = len(set(embedded.labels.tolist()))
        scores["skipped_files"] = len(embedded.skipped_indices)
        metrics = retrieval_metrics(embedded.embeddings, embedded.labels)
        scores.update({METRIC_NAMES[k]: v for k, v in metrics.items()})
        one_shot = one_shot_identification(embedded.embeddings, embedded.labels)
        if one_shot is not None:
            scores["1-shot id"] = one_shot
    if runs:
        model = run.model
        with torch.no_grad():
            accuracies = one_shot_accuracies(lambda x: model(x).float(), runs)
        scores["one-shot 20-way"] = sum(accuracies) / len(accuracies)
    if "images" not in scores and not runs:
        raise ValueError(f"{args.run} holds out no test classes: name a dataset with --dataset")
    print(json.dumps(scores, indent=2))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    run = load_run(args.run, args.checkpoint)
    spec = args.dataset or run.config.dataset
    dataset = load_run_dataset(spec, run)
    embedded = embed_for_run(run, dataset, progress=not args.no_progress)
    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out must name a .npy file, got {out}")
    emb = embedded.embeddings.numpy()
    labels_path = out.with_name(out.stem + "_labels.npy")
    atomic_write(out, lambda f: np.save(f, emb))
    if embedded.labels is not None:
        labels = embedded.labels.numpy()
        atomic_write(labels_path, lambda f: np.save(f, labels))
    written = [f"{emb.shape[0]} embeddings of size {emb.shape[1]} to {out}"]
    if embedded.labels is not None:
        written.append(f"their class indices to {labels_path}")
    paths = getattr(dataset, "paths", None)
    if paths is not None:  # name the file of every row
        files_path = out.with_name(out.stem + "_files.txt")
        rows = embedded.kept_indices.tolist()
        atomic_write_text(files_path, "\n".join(str(paths[i]) for i in rows) + "\n")
        written.append(f"the image file of each row to {files_path}")
    print("wrote " + "; ".join(written))
    if embedded.skipped_indices:
        print(f"skipped {len(embedded.skipped_indices)} unreadable files (named above)")
    return 0
