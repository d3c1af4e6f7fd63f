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
import yaml

from .._launch import launcher_rank
from ..config import RunConfig, TrainConfig, load_config
from ..data import load_omniglot_runs, split_by_class
from ..experiment import (
    demo_config,
    format_table,
    launch_experiment,
    one_shot_accuracies,
    oneshot_config,
    run_experiment,
)
from ..runs import load_dataset
from ..training import embed, retrieval_metrics
from .index import load_run


def cmd_demo(args: argparse.Namespace) -> int:
    config = demo_config(args.dataset, args.epochs, args.seed, args.out)
    config.projection = args.projection
    config.train.progress = not args.no_progress
    if launcher_rank() == 0:
        print(f"deepmetric demo: {config.dataset}, {config.train.epochs} epochs -> {config.out}")
    results = launch_experiment(config, args.nproc, args.dist_timeout)
    if results is None:  # a torchrun process other than rank 0
        return 0
    print()
    print(format_table(results["table"]))
    print()
    print(results["verdict"])
    print(f"training took {results['train_seconds']:.0f} s; report: {config.out}/report.html")
    return 0


def cmd_oneshot(args: argparse.Namespace) -> int:
    config = oneshot_config(args.epochs, args.seed, args.out, args.tta)
    config.train.progress = not args.no_progress
    print(f"deepmetric oneshot: {config.train.epochs} epochs, seed {args.seed} -> {config.out}")
    results = run_experiment(config)
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
        values["augment"] = yaml.safe_load(args.augment)
    if args.embedding_size is not None:
        values["model"]["embedding_size"] = args.embedding_size
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
        target[parts[-1]] = yaml.safe_load(raw)
    return RunConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.train.progress = not args.no_progress
    results = launch_experiment(config, args.nproc, args.dist_timeout)
    if results is None:  # a torchrun process other than rank 0
        return 0
    print(format_table(results["table"]))
    print(results["verdict"])
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    run = load_run(run_dir, args.checkpoint)
    config, model = run.config, run.model
    if args.dataset:
        test_set = load_dataset(args.dataset, config.image_size)
    else:
        dataset = load_dataset(config.dataset, config.image_size)
        split = split_by_class(
            dataset.labels, config.test_classes, config.val_classes, seed=config.split_seed
        )
        test_set = dataset.subset(split.test)
    metrics: dict[str, float] = {}
    if len(test_set):  # (the one-shot benchmark holds out no test classes)
        metrics = retrieval_metrics(embed(model, test_set.x), test_set.labels)
    if config.dataset == "omniglot" and not args.dataset:
        runs = load_omniglot_runs(config.image_size)
        accuracies = one_shot_accuracies(lambda x: embed(model, x), runs)
        metrics["one_shot_20_way"] = sum(accuracies) / len(accuracies)
    if not metrics:
        raise ValueError(f"{run_dir} holds out no test classes: name a dataset with --dataset")
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    run = load_run(args.run, args.checkpoint)
    config, model = run.config, run.model
    dataset = load_dataset(args.dataset or config.dataset, config.image_size)
    emb = embed(model, dataset.x).numpy()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, emb)
    np.save(out.with_name(out.stem + "_labels.npy"), dataset.labels.numpy())
    print(f"wrote {emb.shape[0]} embeddings of size {emb.shape[1]} to {out}")
    return 0
