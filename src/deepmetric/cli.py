"""The ``deepmetric`` command line.

deepmetric demo                      # Omniglot: before/after table, run folder, report
deepmetric demo --dataset digits     # a seconds-long smoke run
deepmetric oneshot --seed 0          # Omniglot 20-way one-shot benchmark, accuracy per run
deepmetric train --config run.yaml   # every option also a flag: --epochs 5 --loss ArcFaceLoss
deepmetric train --hdml              # with hardness-aware synthetic negatives (HDML)
deepmetric train --nproc 4           # data-parallel on 4 local processes (also `demo --nproc`)
torchrun --nproc_per_node 4 -m deepmetric train ...   # the same, started by torchrun
deepmetric evaluate --run runs/x     # retrieval metrics of a trained run on its test classes
deepmetric embed --run runs/x --dataset folder:imgs --out emb.npy
deepmetric index build --run runs/x --dataset folder:gallery --out gallery.index
deepmetric search --index gallery.index --run runs/x --dataset folder:queries -k 5
deepmetric enroll --index gallery.index --run runs/x --dataset folder:new_people
deepmetric verify --run runs/x --dataset folder:val --plot roc.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from . import report
from ._launch import (
    ProcessFailedError,
    launched_by_torchrun,
    launcher_rank,
    process_group,
    start_processes,
)
from ._malloc import keep_freed_memory
from .augment import embed_augmented
from .cli_index import add_index_commands, load_run
from .data import ArrayDataset, load_omniglot_runs, split_by_class
from .fewshot import one_shot_accuracy
from .runs import (
    PROJECTIONS,
    RunConfig,
    build_augment,
    build_hdml,
    build_loss,
    build_miner,
    build_model,
    load_config,
    load_dataset,
    save_config,
    with_rotations,
)
from .training import (
    TrainConfig,
    Trainer,
    embed,
    load_checkpoint,
    process_rank,
    retrieval_metrics,
)


# -- the experiment shared by `demo` and `train` --------------------------------------------------
def one_shot_accuracies(embed_fn: Any, runs: Sequence[Any]) -> list[float]:
    """Accuracy of each 20-way one-shot run: every query takes the class of its nearest support
    embedding (:func:`deepmetric.fewshot.one_shot_accuracy`)."""
    accuracies = []
    for run in runs:
        support, query = embed_fn(run.support), embed_fn(run.query)
        classes = torch.arange(len(support))  # support image i is class i
        accuracies.append(one_shot_accuracy(support, classes, query, run.query_labels))
    return accuracies


def _flatten_pixels(x: Tensor) -> Tensor:
    return x.flatten(1).float()


def run_experiment(config: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Train on the config's training classes, then score raw pixels, the untrained network and
    the trained network on held-out classes (and Omniglot's one-shot runs). Writes the run
    folder and returns the results.

    In a ``torch.distributed`` job (see :func:`launch_experiment`) every process calls it and
    trains; only rank 0 writes the run folder and scores, the others return ``{}``."""
    config.check_optional_packages()
    out = Path(config.out)
    main_process = process_rank() == 0
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    torch.manual_seed(config.train.seed)

    dataset = load_dataset(config.dataset, config.image_size)
    split = split_by_class(
        dataset.labels, config.test_classes, config.val_classes, seed=config.split_seed
    )
    train_set = dataset.subset(split.train)
    if config.rotations and train_set.x.ndim == 4:
        train_set = with_rotations(train_set)
    val_set = dataset.subset(split.val) if len(split.val) else None
    test_set = dataset.subset(split.test)
    runs = load_omniglot_runs(config.image_size) if config.dataset == "omniglot" else []
    if len(test_set) == 0 and not runs:
        raise ValueError(
            "nothing to evaluate on: test_classes is 0 and the dataset has no one-shot runs"
        )

    model = build_model(config.model, dataset.x[0])
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    loss = build_loss(
        config.loss,
        num_classes=len(train_set.class_names),
        embedding_size=config.model.embedding_size,
    )
    miner = build_miner(config.miner)
    hdml = None
    if config.hdml:
        hdml = build_hdml(model, loss, len(train_set.class_names), config.hdml_options)
    trainer = Trainer(
        model,
        loss,
        train_set,
        config=config.train,
        val_set=val_set,
        miner=miner,
        augment=build_augment(config.augment),
        run_dir=out,
        hdml=hdml,
    )
    device = trainer.device

    embed_batch = config.train.embed_batch_size

    def embed_with(state: dict[str, Tensor]) -> Any:
        model.load_state_dict(state)
        return lambda x: embed(model, x, embed_batch, device)

    rows: list[dict[str, Any]] = []
    per_run: dict[str, list[float]] = {}

    def score(name: str, fn: Any) -> None:
        row: dict[str, Any] = {"embedding": name}
        if len(test_set):
            metrics = retrieval_metrics(fn(test_set.x), test_set.labels)
            row["Recall@1"] = metrics["precision_at_1"]
            row["MAP@R"] = metrics["mean_average_precision_at_r"]
        if runs:
            per_run[name] = one_shot_accuracies(fn, runs)
            row["one-shot 20-way"] = sum(per_run[name]) / len(runs)
        rows.append(row)

    started = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - started
    if not main_process:  # the others only train (and need not wait for the scores)
        return {}
    score("raw pixels", _flatten_pixels)
    score("untrained network", embed_with(untrained))
    best = load_checkpoint(out / "best.pt")
    score("trained network", embed_with(best["model"]))
    tta = build_augment(config.augment)
    if config.test_time_augment and tta is not None:  # the same model, its inputs distorted
        copies = config.test_time_augment
        score(
            f"trained + test-time augmentation ({copies} copies)",
            lambda x: embed_augmented(model, x, tta, copies, batch_size=embed_batch),
        )

    key = "Recall@1" if len(test_set) else "one-shot 20-way"
    trained, baseline = rows[2][key], max(rows[0][key], rows[1][key])
    verdict = (
        f"training beat the best baseline on unseen classes ({key} {trained:.3f} vs {baseline:.3f})"
        if trained > baseline
        else f"training did NOT beat the best baseline ({key} {trained:.3f} vs {baseline:.3f})"
    )
    results = {
        "table": rows,
        "one_shot_per_run": per_run,
        "verdict": verdict,
        "train_seconds": seconds,
        "epochs_run": len(history),
        "test_classes": len(split.test_classes),
        "train_classes": len(train_set.class_names),
    }
    report.write_json(out / "results.json", results)  # the scores, even if the report fails
    write_report(out, config, results, model, train_set, test_set, val_set)
    return results


def write_report(
    out: Path,
    config: RunConfig,
    results: dict[str, Any],
    model: nn.Module,
    train_set: ArrayDataset,
    test_set: ArrayDataset,
    val_set: ArrayDataset | None = None,
) -> Path:
    """Curves, embedding maps, neighbour grid, verification and the HTML page of a finished run.

    Verification is measured on classes never trained on: the test split, or when the run has
    none (the one-shot benchmark) the validation split. Its record is stored in
    ``results["verification"]`` and ``out/results.json`` is rewritten with it.
    """
    device = next(model.parameters()).device
    figures = [report.plot_curves(report.read_metrics(out / "metrics.jsonl"), out / "curves.png")]
    # all samples of 20 random training classes (the map shows at most 20 colours)
    classes = torch.unique(train_set.labels)
    shown = classes[torch.randperm(len(classes), generator=torch.Generator().manual_seed(0))[:20]]
    seen = train_set.subset(torch.where(torch.isin(train_set.labels, shown))[0])
    seen_emb = embed(model, seen.x, device=device)
    groups = [("seen classes", seen_emb, seen.labels)]
    test_emb = embed(model, test_set.x, device=device) if len(test_set) else None
    if test_emb is not None:
        groups.append(("unseen classes", test_emb, test_set.labels))
    figures.append(
        report.plot_embedding_map(groups, out / "embedding_map.png", method=config.projection)
    )
    if test_emb is not None and test_set.x.ndim == 4:
        pick = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(1))[:8]
        neighbours = report.nearest_neighbours(test_emb, test_emb, 6, exclude_self=True)[pick]
        figures.append(
            report.plot_neighbours(
                test_set.x[pick],
                test_set.labels[pick],
                test_set.x,
                test_set.labels,
                neighbours,
                out / "neighbours.png",
            )
        )

    verification_png = out / "verification.png"
    if test_emb is not None:
        record = report.verification_record(test_emb, test_set.labels, "test", verification_png)
    elif val_set is not None and len(val_set):
        val_emb = embed(model, val_set.x, device=device)
        record = report.verification_record(val_emb, val_set.labels, "validation", verification_png)
    else:
        record = {"split": None, "skipped": "the run holds out no test or validation classes"}
    results["verification"] = record
    report.write_json(out / "results.json", results)
    verification = report.ReportSection(
        "Verification on unseen classes",
        table=[] if "skipped" in record else report.verification_rows(record),
        notes=[report.verification_note(record)],
        figures=[] if "skipped" in record else [verification_png],
    )
    return report.write_html(
        out,
        f"deepmetric run: {config.dataset}",
        results["table"],
        figures,
        config.to_dict(),
        notes=[results["verdict"], f"training time {results['train_seconds']:.0f} s"],
        sections=[verification],
    )


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    columns = list(rows[0])
    widths = [max(len(c), 18 if i == 0 else 8) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for row in rows:
        cells = [
            f"{row[c]:.3f}".rjust(w) if isinstance(row[c], float) else str(row[c]).ljust(w)
            for c, w in zip(columns, widths, strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


# -- commands -------------------------------------------------------------------------------------
DEMO_EPOCHS = {"omniglot": 10, "digits": 3}


def demo_config(dataset: str, epochs: int | None, seed: int, out: str | None) -> RunConfig:
    """The demo's settings: small CNN, triplet loss with a multi-similarity miner."""
    omniglot = dataset == "omniglot"
    train = TrainConfig(
        epochs=epochs or DEMO_EPOCHS[dataset],
        p=32 if omniglot else 6,
        k=4 if omniglot else 16,
        lr=2e-3,
        seed=seed,
        warmup_epochs=0,
    )
    return RunConfig(
        dataset=dataset,
        test_classes=0.2 if omniglot else 0.4,
        val_classes=0.1 if omniglot else 0.0,
        rotations=omniglot,
        train=train,
        out=out or f"runs/demo-{dataset}",
    )


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


#: Test-time augmentation of the one-shot benchmark: each image and this many distorted copies.
ONESHOT_TTA_COPIES = 16


def oneshot_config(
    epochs: int, seed: int, out: str | None, tta: int = ONESHOT_TTA_COPIES
) -> RunConfig:
    """The Omniglot one-shot benchmark: train on both small background subsets (all their
    characters, rotations as extra classes, random affine distortions of every training image),
    score the final weights on the 20 official 20-way one-shot runs, with each image embedded
    alone and with test-time augmentation (the mean embedding of the image and ``tta`` distorted
    copies).

    No characters are held out for choosing a checkpoint: retrieval among held-out background
    characters saturates (MAP@R 0.94-0.96 from epoch 15 on) and picked mid-run checkpoints
    (epochs 15 and 20 of 40) that scored 1 to 2.5 points lower on the one-shot runs than the
    final, fully decayed weights."""
    train = TrainConfig(epochs=epochs, p=32, k=4, lr=2e-3, seed=seed)
    return RunConfig(
        dataset="omniglot",
        test_classes=0.0,
        val_classes=0.0,
        rotations=True,
        augment={},
        test_time_augment=tta,
        train=train,
        out=out or f"runs/oneshot-seed{seed}",
    )


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


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option of :class:`TrainConfig` and the top-level run keys."""
    group = parser.add_argument_group("training options (override the config)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL")
        else:
            group.add_argument(flag, type=_yaml_value, default=None)
    run = parser.add_argument_group("run options (override the config)")
    run.add_argument("--dataset", default=None)
    run.add_argument("--image-size", type=int, default=None)
    run.add_argument("--test-classes", type=float, default=None)
    run.add_argument("--val-classes", type=float, default=None)
    run.add_argument("--rotations", type=_parse_bool, default=None, metavar="BOOL")
    run.add_argument(
        "--augment",
        default=None,
        metavar="MAPPING",
        help="random affine distortions of training images, e.g. '{rotation: 10}' ('{}': "
        "defaults, 'null': none)",
    )
    run.add_argument(
        "--test-time-augment",
        type=int,
        default=None,
        metavar="N",
        help="also score the mean embedding of each test image and N distorted copies",
    )
    run.add_argument("--embedding-size", type=int, default=None)
    run.add_argument("--loss", default=None, help="loss class name, e.g. ArcFaceLoss")
    run.add_argument("--miner", default=None, help="miner class name, or 'none'")
    run.add_argument(
        "--hdml",
        type=_parse_bool,
        nargs="?",
        const=True,
        default=None,
        metavar="BOOL",
        help="hardness-aware synthetic negatives (HDML); options: --set hdml_options.alpha=1",
    )
    run.add_argument(
        "--projection", choices=PROJECTIONS, default=None, help="the report's embedding map"
    )
    run.add_argument("--out", default=None)
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, dotted for nested ones: --set loss.margin=0.2",
    )


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _yaml_value(text: str) -> Any:
    return yaml.safe_load(text)


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
        values["augment"] = _yaml_value(args.augment)
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


def launch_experiment(
    config: RunConfig, nproc: int | None, timeout_s: float
) -> dict[str, Any] | None:
    """:func:`run_experiment` in this process; in ``nproc`` new local processes (``--nproc``);
    or, when torchrun started this process, as one process of its job (see
    :mod:`deepmetric._launch`; ``timeout_s`` bounds every wait on another process).

    Returns the results, or None in a torchrun process other than rank 0 (the others only
    train). Raises ``ValueError`` for a bad ``nproc`` and
    :class:`~deepmetric._launch.ProcessFailedError` when a started process fails.
    """
    config.check_optional_packages()  # before any process starts
    if launched_by_torchrun():
        if nproc is not None:
            raise ValueError("--nproc starts processes itself; leave it out under torchrun")
        with process_group(config.train.device, timeout_s) as rank:
            on_this_rank = run_experiment(config)
        return on_this_rank if rank == 0 else None
    if nproc is None or nproc == 1:
        return run_experiment(config)
    if nproc < 1 or config.train.p % nproc != 0:
        raise ValueError(
            f"--nproc must be >= 1 and divide p={config.train.p} (the classes of a batch are "
            f"split across the processes), got {nproc}"
        )
    start_processes(
        nproc, run_experiment, (config,), device=config.train.device, timeout_s=timeout_s
    )
    results: dict[str, Any] = json.loads((Path(config.out) / "results.json").read_text())
    return results


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


def _add_process_flags(parser: argparse.ArgumentParser) -> None:
    """``--nproc`` and ``--dist-timeout`` (distributed training, see :mod:`deepmetric._launch`)."""
    group = parser.add_argument_group("distributed training")
    group.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train data-parallel on N local processes (GPUs when the device is CUDA); "
        "leave out under torchrun",
    )
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long a process waits for the others before failing (default 300)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepmetric", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train on built-in data and print a before/after table")
    demo.add_argument("--dataset", choices=sorted(DEMO_EPOCHS), default="omniglot")
    demo.add_argument("--epochs", type=int, default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=None)
    demo.add_argument(
        "--projection", choices=PROJECTIONS, default="pca", help="the report's embedding map"
    )
    demo.add_argument("--no-progress", action="store_true")
    _add_process_flags(demo)
    demo.set_defaults(func=cmd_demo)

    oneshot = sub.add_parser("oneshot", help="Omniglot 20-way one-shot benchmark")
    oneshot.add_argument("--epochs", type=int, default=40)
    oneshot.add_argument(
        "--tta",
        type=int,
        default=ONESHOT_TTA_COPIES,
        metavar="N",
        help=f"test-time augmentation copies (default {ONESHOT_TTA_COPIES}; 0: none)",
    )
    oneshot.add_argument("--seed", type=int, default=0)
    oneshot.add_argument("--out", default=None)
    oneshot.add_argument("--no-progress", action="store_true")
    oneshot.set_defaults(func=cmd_oneshot)

    train = sub.add_parser("train", help="train from a YAML config and flags")
    train.add_argument("--config", default=None, help="YAML run config")
    train.add_argument("--no-progress", action="store_true")
    _add_train_flags(train)
    _add_process_flags(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="retrieval metrics of a trained run")
    evaluate.add_argument("--run", required=True)
    evaluate.add_argument("--checkpoint", default="best.pt")
    evaluate.add_argument("--dataset", default=None, help="default: the run's test classes")
    evaluate.set_defaults(func=cmd_evaluate)

    emb = sub.add_parser("embed", help="write embeddings of a dataset to .npy")
    emb.add_argument("--run", required=True)
    emb.add_argument("--checkpoint", default="best.pt")
    emb.add_argument("--dataset", default=None)
    emb.add_argument("--out", required=True)
    emb.set_defaults(func=cmd_embed)

    add_index_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # no page faults on every step's large buffers (see _malloc)
    try:
        return int(args.func(args))
    except ValueError as error:
        print(f"deepmetric: error: {error}", file=sys.stderr)
        return 2
    except ProcessFailedError as error:  # its own message is printed above
        print(f"deepmetric: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
