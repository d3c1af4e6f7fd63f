"""The ``deepmetric`` command line: argument parsing only.

Parsing imports neither torch nor any model code, so ``deepmetric --help`` answers at once; each
command's module (:mod:`deepmetric.cli.train`, :mod:`deepmetric.cli.index`) is imported when the
command runs. Every command returns an exit code; bad input raises ``ValueError``, which
:func:`main` prints as ``deepmetric: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from ..config import PROJECTIONS, TrainConfig, parse_yaml

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Deep metric learning: train an embedding network on some classes, then retrieve, verify,
cluster and identify classes it never saw.

workflow:
  deepmetric demo                                     # 2-minute tour on built-in Omniglot
  deepmetric train --dataset folder:photos --out runs/x
  deepmetric evaluate --run runs/x                    # retrieval metrics on held-out classes
  deepmetric index build --run runs/x --dataset folder:gallery --out gallery.index
  deepmetric search --index gallery.index --run runs/x --dataset folder:queries -k 5
  deepmetric enroll --index gallery.index --run runs/x --dataset folder:new_people
  deepmetric verify --run runs/x --dataset folder:val          # calibrate a threshold

datasets (--dataset): omniglot | digits (built in) | folder:PATH (one sub-folder per class)
  | csv:PATH (path,label rows) | arrays:PATH (.npz with x and y)

'deepmetric COMMAND --help' explains each command's options."""

DATASET_HELP = (
    "omniglot | digits (built in) | folder:PATH (PATH/<class>/<image>) | csv:PATH (rows "
    "path,label; paths relative to the CSV) | arrays:PATH (.npz holding x and y)"
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepmetric")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"


def _field_help(cls: type) -> dict[str, str]:
    """Each field's text from the ``Attributes:`` section of ``cls``'s docstring (``a, b:``
    documents two fields at once)."""
    doc = textwrap.dedent((cls.__doc__ or "").split("Attributes:", 1)[-1])
    helps: dict[str, str] = {}
    current: list[str] = []
    for line in doc.splitlines():
        match = re.match(r"^\s{0,4}([a-z_]+(?:, [a-z_]+)*): (.*)$", line)
        if match:
            current = match.group(1).split(", ")
            for name in current:
                helps[name] = match.group(2).strip()
        elif line.strip() and current:
            for name in current:
                helps[name] += " " + line.strip()
    return {name: text.replace("``", "") for name, text in helps.items()}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _yaml_value(text: str) -> Any:
    """A flag's text as YAML reads it (``0.1`` a number, ``null`` None); the config checks
    its type afterwards, naming the key."""
    try:
        return parse_yaml(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is {error}") from error


def _int_at_least(minimum: int) -> Any:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option of :class:`TrainConfig` and the top-level run keys."""
    helps = _field_help(TrainConfig)
    group = parser.add_argument_group(
        "training options (override the config's train: mapping; default in brackets)"
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        text = f"{helps.get(f.name, '')} [{default}]"
        if f.type in ("bool", bool):
            group.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL", help=text)
        else:
            metavar = f.name.upper() if f.name != "scheduler" else "{auto,cosine,step,none}"
            group.add_argument(flag, type=_yaml_value, default=None, metavar=metavar, help=text)
    run = parser.add_argument_group("run options (override the config)")
    run.add_argument("--dataset", default=None, metavar="SPEC", help=DATASET_HELP + " [omniglot]")
    run.add_argument(
        "--image-size", type=int, default=None, metavar="PX", help="input side in pixels [28]"
    )
    run.add_argument(
        "--test-classes",
        type=_yaml_value,
        default=None,
        metavar="F",
        help="held out for the final evaluation: a fraction of the classes, or a number [0.2]",
    )
    run.add_argument(
        "--val-classes",
        type=_yaml_value,
        default=None,
        metavar="F",
        help="held out to choose the best checkpoint: a fraction or a number [0.1]",
    )
    run.add_argument(
        "--rotations",
        type=_parse_bool,
        default=None,
        metavar="BOOL",
        help="add 90/180/270-degree rotations of each training class as new classes (for "
        "characters; never right for photos) [true for omniglot only]",
    )
    run.add_argument(
        "--augment",
        default=None,
        metavar="MAPPING",
        help="random affine distortions of training images, e.g. '{rotation: 10}' ('{}': "
        "defaults, 'null': none) [null]",
    )
    run.add_argument(
        "--test-time-augment",
        type=int,
        default=None,
        metavar="N",
        help="also score the mean embedding of each test image and N distorted copies [0]",
    )
    run.add_argument(
        "--trunk",
        default=None,
        metavar="NAME",
        help="the network under the embedding head: small_cnn (trained from scratch), "
        "efficientnet_lite0 (ImageNet weights, the efficientnet extra), hf:FOLDER (a local "
        "Hugging Face vision model: DINOv2, ViT, CLIP, ConvNeXt, ResNet), torchvision:NAME, "
        "timm:NAME, or package.module:factory [small_cnn]",
    )
    run.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="trunk weights from a local .pth or .safetensors file (key prefixes: --set "
        "model.key_map='{module.: \"\"}') [the trunk's own]",
    )
    run.add_argument(
        "--embedding-size", type=int, default=None, metavar="D", help="embedding width [128]"
    )
    run.add_argument(
        "--loss",
        default=None,
        metavar="NAME",
        help="a loss class of deepmetric.losses, e.g. TripletMarginLoss, ContrastiveLoss, "
        "MultiSimilarityLoss, ArcFaceLoss, ProxyAnchorLoss; options with --set "
        "loss.margin=0.2 [TripletMarginLoss, margin 0.1]",
    )
    run.add_argument(
        "--miner",
        default=None,
        metavar="NAME",
        help="a miner class of deepmetric.miners (e.g. MultiSimilarityMiner, BatchHardMiner, "
        "TripletMarginMiner), or 'none' [MultiSimilarityMiner, epsilon 0.1]",
    )
    run.add_argument(
        "--hdml",
        type=_parse_bool,
        nargs="?",
        const=True,
        default=None,
        metavar="BOOL",
        help="hardness-aware synthetic negatives (HDML, Zheng et al. 2019); options: --set "
        "hdml_options.alpha=1 [false]",
    )
    run.add_argument(
        "--projection", choices=PROJECTIONS, default=None, help="the report's embedding map [pca]"
    )
    run.add_argument("--out", default=None, metavar="DIR", help="the run folder [runs/train]")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, dotted for nested ones: --set loss.margin=0.2 (repeatable)",
    )


def _add_process_flags(parser: argparse.ArgumentParser) -> None:
    """``--nproc`` and ``--dist-timeout`` (distributed training, see
    :mod:`deepmetric.distributed.launch`)."""
    group = parser.add_argument_group("distributed training")
    group.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train data-parallel on N local processes (GPUs when the device is CUDA); "
        "leave out under torchrun [1]",
    )
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long a process waits for the others before failing [300]",
    )


def _add_run_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--run",
        required=required,
        metavar="DIR",
        help="a run folder written by 'deepmetric train' or 'demo'",
    )
    parser.add_argument(
        "--checkpoint",
        default="best.pt",
        metavar="FILE",
        help="checkpoint of the run: best.pt (best on validation) or last.pt [best.pt]",
    )


def _command(
    sub: argparse._SubParsersAction, name: str, handler: str, help: str, description: str = ""
) -> argparse.ArgumentParser:
    """A subcommand whose function ``handler`` (``"module:function"`` in this package) is
    imported only when it runs."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    demo = _command(
        sub,
        "demo",
        "train:cmd_demo",
        "train on built-in data and print a before/after table",
        "Train the small CNN on built-in data, then print Recall@1, MAP@R and (Omniglot) 20-way "
        "one-shot accuracy of raw pixels, the untrained and the trained network on held-out "
        "classes, and write a run folder with an HTML report.",
    )
    demo.add_argument(
        "--dataset",
        choices=("omniglot", "digits"),
        default="omniglot",
        help="omniglot (about 2 minutes) or digits (seconds) [omniglot]",
    )
    demo.add_argument("--epochs", type=_positive_int, default=None, help="[10 omniglot, 3 digits]")
    demo.add_argument("--seed", type=int, default=0, help="random seed [0]")
    demo.add_argument("--out", default=None, metavar="DIR", help="[runs/demo-DATASET]")
    demo.add_argument(
        "--projection", choices=PROJECTIONS, default="pca", help="the report's embedding map"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_process_flags(demo)

    oneshot = _command(
        sub,
        "oneshot",
        "train:cmd_oneshot",
        "Omniglot 20-way one-shot benchmark",
        "Train on Omniglot's background characters and score the 20 official 20-way one-shot "
        "runs (Lake et al., 2015) of unseen alphabets, run by run.",
    )
    oneshot.add_argument("--epochs", type=_positive_int, default=40, help="[40]")
    oneshot.add_argument(
        "--tta",
        type=int,
        default=16,
        metavar="N",
        help="test-time augmentation: also score the mean embedding of each image and N "
        "distorted copies (0: none) [16]",
    )
    oneshot.add_argument("--seed", type=int, default=0, help="random seed [0]")
    oneshot.add_argument("--out", default=None, metavar="DIR", help="[runs/oneshot-seedN]")
    oneshot.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = _command(
        sub,
        "train",
        "train:cmd_train",
        "train from a YAML config and flags",
        "Train an embedder on a dataset's training classes, choose the best checkpoint on "
        "validation classes, score held-out test classes, and write the run folder (config, "
        "checkpoints, metrics.jsonl, results.json, report.html). Every config key is also a "
        "flag; flags override the config file. An interrupted run (Ctrl-C, SIGTERM, a crash) "
        "continues with --resume.",
    )
    train.add_argument("--config", default=None, metavar="FILE", help="YAML run config")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in --out (its config must match)",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what --out holds and start a new run there",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_train_flags(train)
    _add_process_flags(train)

    evaluate = _command(
        sub,
        "evaluate",
        "train:cmd_evaluate",
        "retrieval metrics of a trained run",
        "Embed a run's held-out test classes (or --dataset) and print Recall@1 "
        "(precision_at_1), Recall@2/4/8, R-precision and MAP@R as JSON.",
    )
    _add_run_flags(evaluate)
    evaluate.add_argument(
        "--dataset", default=None, metavar="SPEC", help="default: the run's test classes"
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")

    emb = _command(
        sub,
        "embed",
        "train:cmd_embed",
        "write embeddings of a dataset to .npy",
        "Embed every image of a dataset with a run's model and write OUT.npy (N x D float32), "
        "OUT_labels.npy (N class indices) and, for image files, OUT_files.txt (the file of "
        "each row) beside it. Unreadable files are skipped and named.",
    )
    _add_run_flags(emb)
    emb.add_argument("--dataset", default=None, metavar="SPEC", help="default: the run's dataset")
    emb.add_argument("--out", required=True, metavar="FILE.npy", help="embeddings file to write")
    emb.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_index_commands(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser(
        "index", help="build or edit a searchable index of a dataset's embeddings"
    )
    index_sub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = _command(
        index_sub,
        "build",
        "index:cmd_index_build",
        "embed a dataset and save an index of it",
        "Embed a dataset with a run's model and save a faiss index (a folder) that 'search' "
        "and 'enroll' use. flat is exact; ivf and hnsw are approximate and faster on large "
        "collections (ivf needs at least as many items as --nlist cells).",
    )
    _add_run_flags(build)
    build.add_argument("--dataset", required=True, metavar="SPEC", help=DATASET_HELP)
    build.add_argument("--out", required=True, metavar="DIR", help="index folder to write")
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
        help="flat: exact search, fast enough up to about a million items; ivf, hnsw: "
        "approximate and faster on larger collections [flat]",
    )
    build.add_argument(
        "--nlist",
        type=_positive_int,
        default=None,
        help="ivf: k-means cells; needs at least that many items, ideally ~39 per cell [1024]",
    )
    build.add_argument(
        "--nprobe",
        type=_positive_int,
        default=None,
        help="ivf: cells searched per query (nlist: exact) [min(32, nlist)]",
    )
    build.add_argument("--m", type=_positive_int, default=None, help="hnsw: links per node [32]")
    build.add_argument(
        "--ef-search",
        type=_positive_int,
        default=None,
        help="hnsw: candidates kept per query (more: slower and more exact) [64]",
    )

    remove = _command(
        index_sub,
        "remove",
        "index:cmd_index_remove",
        "remove items from an index by id, class or file",
        "Remove items from an index in place, named by id, class or the file they were "
        "enrolled from; every name must match an item, or nothing is removed.",
    )
    remove.add_argument(
        "--index", required=True, metavar="DIR", help="index folder (updated in place)"
    )
    remove.add_argument(
        "--ids", type=_non_negative_int, nargs="+", metavar="ID", help="the items' ids"
    )
    remove.add_argument(
        "--class", dest="class_names", nargs="+", metavar="NAME", help="every item of these classes"
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
        help="rebuild the index from the items left (hnsw: drops the removed nodes from the "
        "graph; ivf: re-trains its cells)",
    )

    search = _command(
        sub,
        "search",
        "index:cmd_search",
        "nearest indexed items of query images or vectors",
        "Find the k nearest indexed items of each query image (embedded by --run's model) or "
        "query vector (--vectors), with their class names and Euclidean distances.",
    )
    search.add_argument("--index", required=True, metavar="DIR", help="index folder")
    _add_run_flags(search, required=False)
    search.add_argument(
        "--dataset", default=None, metavar="SPEC", help="query images (needs --run)"
    )
    search.add_argument(
        "--vectors", default=None, metavar="FILE.npy", help="query embeddings, a 2-D .npy"
    )
    search.add_argument("-k", type=_positive_int, default=5, help="neighbours per query [5]")
    search.add_argument("--json", default=None, metavar="OUT", help="write the results here")

    enroll = _command(
        sub,
        "enroll",
        "index:cmd_enroll",
        "add new classes to an index, no retraining",
        "Embed new images (one sub-folder per class, as few as one image each) and add them to "
        "an index in place: new people or products become searchable without retraining.",
    )
    enroll.add_argument(
        "--index", required=True, metavar="DIR", help="index folder (updated in place)"
    )
    _add_run_flags(enroll)
    enroll.add_argument(
        "--dataset",
        required=True,
        metavar="SPEC",
        help="e.g. folder:PATH, one sub-folder per new class",
    )
    enroll.add_argument(
        "--skip-existing",
        action="store_true",
        help="enrol only the files not already in the index (default: refuse the whole dataset "
        "when any of its files is already there)",
    )

    verify = _command(
        sub,
        "verify",
        "index:cmd_verify",
        "calibrate same/different, or decide for two images",
        "With --dataset: score genuine and impostor pairs of labelled data and print AUC, EER, "
        "the true accept rate at a false accept rate and the thresholds. With --a/--b: say "
        "whether two images show the same class (distance <= threshold).",
    )
    _add_run_flags(verify)
    verify.add_argument(
        "--dataset", default=None, metavar="SPEC", help="labelled data to calibrate on"
    )
    verify.add_argument(
        "--pairs", type=_positive_int, default=1000, help="genuine and impostor pairs, each [1000]"
    )
    verify.add_argument(
        "--target-fpr", type=float, default=1e-3, help="false accept rate to read [0.001]"
    )
    verify.add_argument("--seed", type=int, default=0, help="seed of the pair sampling [0]")
    verify.add_argument("--plot", default=None, metavar="OUT.png", help="write the ROC plot here")
    verify.add_argument("--a", default=None, metavar="IMG", help="first image to compare")
    verify.add_argument("--b", default=None, metavar="IMG", help="second image to compare")
    verify.add_argument(
        "--threshold", type=float, default=None, help="same when distance <= T [calibrated]"
    )
    verify.add_argument("--json", default=None, metavar="OUT", help="write the numbers here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepmetric",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"deepmetric {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_commands(sub)
    _add_index_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, function_name = args.handler.split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    from .._malloc import keep_freed_memory
    from ..distributed.launch import ProcessFailedError
    from ..training import TrainingInterrupted

    keep_freed_memory()  # no page faults on every step's large buffers (see _malloc)
    try:
        return int(getattr(module, function_name)(args))
    except ValueError as error:
        print(f"deepmetric: error: {error}", file=sys.stderr)
        return 2
    except ProcessFailedError as error:  # its own message is printed above
        print(f"deepmetric: error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        hint = (
            " (run the same command with --resume to continue)" if args.command == "train" else ""
        )
        print(f"deepmetric: {stop}{hint}", file=sys.stderr)
        return 130  # the shell's code for a run ended by Ctrl-C


def __getattr__(name: str) -> Any:
    """The commands' helpers, for code that imported them from ``deepmetric.cli`` when it was
    one module: ``config_from_args`` and the experiment's functions."""
    if name == "config_from_args":
        from .train import config_from_args

        return config_from_args
    if name in ("write_report", "run_experiment", "format_table", "one_shot_accuracies"):
        from .. import experiment

        return getattr(experiment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
