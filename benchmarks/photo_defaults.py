"""Are ``deepmetric train``'s defaults for a folder of photos at least as good as a plain loop?

For each synthetic photo set (faces, products; :mod:`deepmetric.data.synthetic`) and seed, two
runs train the same Conv-4 for the same number of optimisation steps on the same P×K batches of
the same training classes, and are scored on the same held-out classes:

* ``cli``: ``deepmetric train --dataset folder:ROOT`` with only the data-dependent flags
  (epochs, held-out classes, P when the class count needs it, seed, out): the defaults, or a
  *variant* that changes some of them (``--variants``, see :data:`VARIANTS`);
* ``loop``: the plain PyTorch + pytorch-metric-learning loop written below: images resized to
  the same side (no augmentation), ``SmallConvNet(3, 64, 4)`` + a linear head to 128 + L2
  normalisation, PML's ``TripletMarginLoss(margin=0.1)`` with
  ``MultiSimilarityMiner(epsilon=0.1)``, Adam at lr 1e-3, constant.

Scores: Recall@1, MAP@R and 1-shot identification
(:func:`deepmetric.experiment.one_shot_identification`) on the held-out classes; the CLI's come
from its ``results.json``. Each run is recorded in the JSON file as it finishes (runs of other
variants already there are kept), so tuning trials accumulate next to the defaults.

Tune on one dataset, confirm on the other: a default is changed only when the variant also
wins on the dataset it was not chosen on.

Usage::

    python benchmarks/photo_defaults.py                       # defaults vs loop, both sets
    python benchmarks/photo_defaults.py --datasets products --variants crop_0.5 --no-loop
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_metric_learning import losses, miners
from torch import Tensor, nn

from deepmetric.cli import main as cli_main
from deepmetric.data import split_by_class
from deepmetric.data.synthetic import make_faces, make_products
from deepmetric.experiment import one_shot_identification
from deepmetric.models import SmallConvNet
from deepmetric.runs import PHOTO_SIZE_SMALL_CNN
from deepmetric.samplers import PKSampler
from deepmetric.training import retrieval_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "photo_defaults.json"

#: The data: generator, classes, photos per class, side of the JPEGs, held-out classes, P, K,
#: epochs. P is 16 because 20 training classes cannot fill the default P=32; the epochs give a
#: few dozen steps, what two shared CPU cores train in about a minute.
DATASETS: dict[str, dict[str, Any]] = {
    "faces": {"make": make_faces, "classes": 30, "photos": 10, "size": 72, "test": 10,
              "p": 16, "k": 4, "epochs": 15},
    "products": {"make": make_products, "classes": 30, "photos": 8, "size": 72, "test": 10,
                 "p": 16, "k": 4, "epochs": 20},
    # other products (generator seed 1), more classes and longer: a third set for confirming
    "products_b": {"make": make_products, "classes": 50, "photos": 8, "size": 72, "test": 15,
                   "p": 16, "k": 4, "epochs": 12, "seed": 1},
}  # fmt: skip

#: CLI variants tried against the defaults: extra flags of ``deepmetric train``.
VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "old_defaults": ["--set", "photo_augment.scale=[0.16, 1.0]"],  # before the benchmark
    "no_augment": ["--set", "photo_augment=null"],
    "crop_0.5": ["--set", "photo_augment.scale=[0.5, 1.0]"],
    "crop_0.8": ["--set", "photo_augment.scale=[0.8, 1.0]"],
    "constant_lr": ["--scheduler", "none"],
    "crop_0.5_square": ["--set", "photo_augment={scale: [0.5, 1.0], ratio: [1.0, 1.0]}"],
    "crop_0.5_constant_lr": ["--set", "photo_augment.scale=[0.5, 1.0]", "--scheduler", "none"],
    "eval_whole": ["--set", "eval_crop=1.0"],
    "flip_only_whole": ["--set", "photo_augment.scale=[1.0, 1.0]", "--set", "eval_crop=1.0"],
    "crop_0.8_whole": ["--set", "photo_augment.scale=[0.8, 1.0]", "--set", "eval_crop=1.0"],
    "no_augment_whole": ["--set", "photo_augment=null", "--set", "eval_crop=1.0"],
    "loop_like": ["--set", "photo_augment=null", "--set", "eval_crop=1.0", "--scheduler", "none"],
    "flip_only_whole_constant_lr": [
        "--set",
        "photo_augment.scale=[1.0, 1.0]",
        "--set",
        "eval_crop=1.0",
        "--scheduler",
        "none",
    ],
}


def make_dataset(name: str, root: Path) -> Path:
    """Write the named synthetic photo folder under ``root`` (once) and return it."""
    spec = DATASETS[name]
    folder = root / name
    if not folder.is_dir():
        spec["make"](folder, spec["classes"], spec["photos"], spec["size"], spec.get("seed", 0))
    return folder


def load_folder(folder: Path, side: int) -> tuple[Tensor, Tensor]:
    """Every photo of ``folder/<class>/*.jpg`` resized to ``side`` × ``side`` (bilinear), as
    ``(N, 3, side, side)`` floats in [0, 1], and ``(N,)`` labels: classes in name order, as
    the ``folder:`` dataset numbers them."""
    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for path in sorted(class_dir.glob("*.jpg")):
            with Image.open(path) as image:
                resized = image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
            pixels = np.asarray(resized)
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255)
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def scores(embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    """Recall@1, MAP@R and 1-shot identification of ``(N, E)`` embeddings."""
    metrics = retrieval_metrics(embeddings, labels)
    one_shot = one_shot_identification(embeddings, labels)
    return {
        "Recall@1": metrics["precision_at_1"],
        "MAP@R": metrics["mean_average_precision_at_r"],
        "1-shot id": float("nan") if one_shot is None else one_shot,
    }


class ConvFour(nn.Module):
    """Conv-4 trunk + linear head + L2 normalisation: ``(N, 3, H, W)`` -> ``(N, 128)``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = SmallConvNet(3, 64, 4)
        self.head = nn.Linear(self.trunk.out_features, 128)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.trunk(x)), dim=1)


def plain_loop(folder: Path, name: str, seed: int) -> dict[str, Any]:
    """Train and score the plain PyTorch + PML loop on the CLI's split of ``folder``."""
    spec = DATASETS[name]
    x, y = load_folder(folder, PHOTO_SIZE_SMALL_CNN)
    split = split_by_class(y, spec["test"], 0, seed=0)  # the CLI's split (split_seed 0)
    train_idx = torch.as_tensor(split.train)
    x_train, y_train = x[train_idx], y[train_idx]
    torch.manual_seed(seed)
    model = ConvFour()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = losses.TripletMarginLoss(margin=0.1)
    miner = miners.MultiSimilarityMiner(epsilon=0.1)
    sampler = PKSampler(y_train, spec["p"], spec["k"], seed=seed)
    steps = 0
    started = time.perf_counter()
    model.train()
    for epoch in range(spec["epochs"]):
        sampler.set_epoch(epoch)
        for batch in sampler:
            embeddings = model(x_train[batch])
            labels = y_train[batch]
            loss = loss_fn(embeddings, labels, miner(embeddings, labels))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    seconds = time.perf_counter() - started
    model.eval()
    test_idx = torch.as_tensor(split.test)
    with torch.no_grad():
        embedded = model(x[test_idx])
    return {"steps": steps, "train_seconds": seconds, **scores(embedded, y[test_idx])}


def cli_run(folder: Path, name: str, seed: int, variant: str, out: Path) -> dict[str, Any]:
    """``deepmetric train`` with the data-dependent flags and the variant's; its scores."""
    spec = DATASETS[name]
    args = [
        "train", "--dataset", f"folder:{folder}", "--epochs", str(spec["epochs"]),
        "--test-classes", str(spec["test"]), "--val-classes", "0", "--p", str(spec["p"]),
        "--seed", str(seed), "--out", str(out), "--no-progress", *VARIANTS[variant],
    ]  # fmt: skip
    if cli_main(args) != 0:
        raise RuntimeError(f"deepmetric {' '.join(args)} failed")
    results = json.loads((out / "results.json").read_text())
    trained = next(r for r in results["table"] if r["embedding"] == "trained network")
    labels = torch.tensor(
        [
            i
            for i, d in enumerate(sorted(p for p in folder.iterdir() if p.is_dir()))
            for _ in d.glob("*.jpg")
        ]
    )
    split = split_by_class(labels, spec["test"], 0, seed=0)
    sampler = PKSampler(labels[torch.as_tensor(split.train)], spec["p"], spec["k"])
    steps = spec["epochs"] * len(sampler)
    return {
        "steps": steps,
        "train_seconds": results["train_seconds"],
        **{k: trained[k] for k in ("Recall@1", "MAP@R", "1-shot id")},
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds, per dataset and method."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["method"]), []).append(run)
    rows = []
    for (dataset, method), group in sorted(groups.items()):
        row: dict[str, Any] = {"dataset": dataset, "method": method, "seeds": len(group)}
        for key in ("Recall@1", "MAP@R", "1-shot id", "steps", "train_seconds"):
            values = [float(r[key]) for r in group]
            row[key] = statistics.mean(values)
            row[key + " std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'dataset':9} {'method':28} {'Recall@1':>14} {'MAP@R':>14} {'1-shot id':>14}"
          f" {'steps':>5} {'s/run':>6}")  # fmt: skip
    for r in rows:
        metrics = ("Recall@1", "MAP@R", "1-shot id")
        cells = " ".join(f"{r[k]:.3f} ± {r[k + ' std']:.3f}" for k in metrics)
        steps, seconds = r["steps"], r["train_seconds"]
        print(f"{r['dataset']:9} {r['method']:28} {cells} {steps:5.0f} {seconds:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="faces,products")
    parser.add_argument("--variants", default="defaults", help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-loop", action="store_true", help="skip the plain loop")
    parser.add_argument("--no-cli", action="store_true", help="only the plain loop")
    parser.add_argument("--data", type=Path, help="folder for the generated photos (temp)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    record: dict[str, Any] = {"runs": []}
    if args.json.is_file():
        record = json.loads(args.json.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data or Path(tmp) / "data"
        for name in args.datasets.split(","):
            folder = make_dataset(name, data_root)
            jobs = [] if args.no_cli else [f"cli:{v}" for v in args.variants.split(",")]
            jobs += [] if args.no_loop else ["loop"]
            for seed in args.seeds:
                for job in jobs:
                    if job == "loop":
                        result = plain_loop(folder, name, seed)
                    else:
                        out = Path(tmp) / f"{name}-{job}-{seed}".replace(":", "-")
                        result = cli_run(folder, name, seed, job[4:], out)
                    run = {"dataset": name, "method": job, "seed": seed, **result}
                    print(json.dumps(run), flush=True)
                    record["runs"] = [
                        r for r in record["runs"]
                        if (r["dataset"], r["method"], r["seed"]) != (name, job, seed)
                    ] + [run]  # fmt: skip
                    record["summary"] = summarise(record["runs"])
                    record["datasets"] = {
                        k: {key: v for key, v in d.items() if key != "make"}
                        for k, d in DATASETS.items()
                    }
                    record["variants"] = VARIANTS
                    record["machine"] = machine_info(torch.get_num_threads(), "cpu")
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    partial = args.json.with_suffix(".tmp")
                    partial.write_text(json.dumps(record, indent=2) + "\n")
                    partial.replace(args.json)
    print_table(record["summary"])


if __name__ == "__main__":
    main()
