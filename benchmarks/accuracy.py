"""Accuracy and training speed of deepmetric's Trainer against a plain loop over PML's losses.

Two ways to train the same embedder on the same data, compared on classes never seen in
training:

* **deepmetric**: :class:`deepmetric.training.Trainer` with deepmetric's loss and miner;
* **PML loop**: a hand-written training loop (below, :func:`train_plain_loop`) over
  pytorch-metric-learning 2.9.0's loss and miner (``pytorch_metric_learning.losses/miners``).

Everything else is identical, so that a difference in accuracy can only come from the loss and
miner implementations (and float rounding), and a difference in time from them and the trainer:

* data: the built-in Omniglot background characters (``deepmetric.data.load_omniglot``, 28×28),
  split by class (``split_by_class``, split seed 0, the same for every seed): 20% of the
  characters held out for testing, the rest trained on with their 90°/180°/270° rotations as
  extra classes (``deepmetric.runs.with_rotations``);
* model: ``EmbeddingNet(SmallConvNet(1, 64, 4), 64, 128)``, L2-normalised (the default
  ``deepmetric train`` model), initialised from the seed — the same weights in both;
* batches: **the same** ``deepmetric.samplers.PKSampler`` P×K batches (P=32 classes × K=4, seeded)
  in both, not PML's ``MPerClassSampler``, so both see the same samples in the same order;
* optimisation: AdamW, lr 2e-3 for the model and 1e-2 for the loss's own weights (no weight
  decay), cosine decay per step to 0 over the run, no warm-up, no gradient clipping, float32
  (no autocast), the Trainer's defaults; the PML loop builds the same optimizer and schedule;
* losses: case ``triplet+ms`` — ``TripletMarginLoss(margin=0.1)`` on the pairs of
  ``MultiSimilarityMiner(epsilon=0.1)``; case ``normsoftmax`` — ``NormalizedSoftmaxLoss`` (PML's
  defaults, temperature 0.05), no miner, its class weights built by PML after seeding and
  loaded into deepmetric's (``strict=True``), so both start from the same weights.

Reported per case and library, over ``--seeds`` seeds (mean ± sample std): Recall@1 and MAP@R
of the held-out characters retrieving among themselves (``deepmetric.training.
retrieval_metrics``, self-match excluded), and the training seconds per epoch (the wall-clock
time of the epoch's loop: loading the batches, forward, mining, loss, backward, optimizer step;
for the Trainer its per-epoch ``seconds`` record, without validation since none is given).
The libraries alternate which goes first from one seed to the next.

Run from the repository root::

    python benchmarks/accuracy.py --quick        # digits, 1 epoch, 1 seed: a check, seconds
    python benchmarks/accuracy.py                # Omniglot, 10 epochs, 3 seeds

Results go to ``benchmarks/results/accuracy.json`` (``--quick``: ``accuracy_quick.json``) with a
description of the machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import torch
from torch import nn
from torch.utils.data import DataLoader

from deepmetric import losses as dm_losses
from deepmetric import miners as dm_miners
from deepmetric.data import ArrayDataset, load_digits, load_omniglot, split_by_class
from deepmetric.models import EmbeddingNet, SmallConvNet
from deepmetric.runs import with_rotations
from deepmetric.samplers import PKSampler
from deepmetric.training import TrainConfig, Trainer, embed, retrieval_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, format_table, machine_info, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("triplet+ms", "normsoftmax")
LIBRARIES = ("deepmetric", "pml-loop")


@dataclass
class Setup:
    """The data and the fixed training settings of one benchmark run."""

    dataset: str
    train_set: ArrayDataset
    test_set: ArrayDataset
    num_classes: int  # labels of the training set lie in [0, num_classes)
    channels: int
    embedding_size: int
    p: int
    k: int
    lr: float
    loss_lr: float
    epochs: int


def make_setup(quick: bool, epochs: int | None) -> Setup:
    """Omniglot with rotations (or, with ``quick``, scikit-learn's digits without them)."""
    if quick:
        dataset, test_fraction, p, k = load_digits(), 0.4, 6, 16
    else:
        dataset, test_fraction, p, k = load_omniglot(size=28), 0.2, 32, 4
    split = split_by_class(dataset.labels, test_fraction, 0.0, seed=0)
    train_set = dataset.subset(split.train)
    if not quick:
        train_set = with_rotations(train_set)
    return Setup(
        dataset="digits" if quick else "omniglot",
        train_set=train_set,
        test_set=dataset.subset(split.test),
        num_classes=len(train_set.class_names),
        channels=64,
        embedding_size=128,
        p=p,
        k=k,
        lr=2e-3,
        loss_lr=1e-2,
        epochs=epochs if epochs is not None else (1 if quick else 10),
    )


def make_model(setup: Setup, seed: int) -> EmbeddingNet:
    torch.manual_seed(seed)
    trunk = SmallConvNet(1, setup.channels, blocks=4)
    return EmbeddingNet(trunk, setup.channels, setup.embedding_size)


def make_loss_and_miner(
    case: str, library: str, setup: Setup, seed: int
) -> tuple[nn.Module, nn.Module | None]:
    """The case's loss and miner from ``library``; class weights start equal in both."""
    if case == "triplet+ms":
        losses, miners = (
            (dm_losses, dm_miners) if library == "deepmetric" else (pml_losses, pml_miners)
        )
        return losses.TripletMarginLoss(margin=0.1), miners.MultiSimilarityMiner(epsilon=0.1)
    torch.manual_seed(seed)
    pml = pml_losses.NormalizedSoftmaxLoss(setup.num_classes, setup.embedding_size)
    if library == "pml-loop":
        return pml, None
    ours = dm_losses.NormalizedSoftmaxLoss(setup.num_classes, setup.embedding_size)
    ours.load_state_dict(pml.state_dict(), strict=True)
    return ours, None


def cosine_factor(total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor at each step: cosine decay from 1 to 0 over ``total_steps``."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))


def train_plain_loop(
    model: nn.Module,
    loss_fn: nn.Module,
    miner: nn.Module | None,
    setup: Setup,
    seed: int,
    device: torch.device,
) -> list[float]:
    """A plain training loop over PML's loss and miner; returns the seconds of each epoch."""
    torch.manual_seed(seed)
    model.to(device).train()
    loss_fn.to(device)
    sampler = PKSampler(setup.train_set.labels, p=setup.p, k=setup.k, seed=seed)
    loader = DataLoader(setup.train_set, batch_sampler=sampler)
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    loss_params = list(loss_fn.parameters())
    if loss_params:
        groups.append({"params": loss_params, "lr": setup.loss_lr})
    optimizer = torch.optim.AdamW(groups, lr=setup.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_factor(setup.epochs * len(sampler))
    )
    seconds = []
    for epoch in range(setup.epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        for x, labels in loader:
            x, labels = x.to(device), labels.to(device)
            embeddings = model(x)
            indices = miner(embeddings, labels) if miner is not None else None
            loss = loss_fn(embeddings, labels, indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def train_with_trainer(
    model: nn.Module,
    loss_fn: nn.Module,
    miner: nn.Module | None,
    setup: Setup,
    seed: int,
    device: torch.device,
) -> list[float]:
    """deepmetric's Trainer with the same settings; returns the seconds of each epoch."""
    config = TrainConfig(
        epochs=setup.epochs,
        p=setup.p,
        k=setup.k,
        lr=setup.lr,
        loss_lr=setup.loss_lr,
        scheduler="cosine",
        seed=seed,
        device=str(device),
        amp=False,
        progress=False,
    )
    trainer = Trainer(model, loss_fn, setup.train_set, config, miner=miner)
    history = trainer.fit()
    return [float(record["seconds"]) for record in history]


def run_one(case: str, library: str, setup: Setup, seed: int, device: torch.device) -> dict:
    model = make_model(setup, seed)
    loss_fn, miner = make_loss_and_miner(case, library, setup, seed)
    train = train_with_trainer if library == "deepmetric" else train_plain_loop
    seconds = train(model, loss_fn, miner, setup, seed, device)
    emb = embed(model, setup.test_set.x, batch_size=512, device=device)
    scores = retrieval_metrics(emb, setup.test_set.labels)
    result = {
        "case": case,
        "library": library,
        "seed": seed,
        "recall_at_1": scores["precision_at_1"],
        "map_at_r": scores["mean_average_precision_at_r"],
        "seconds_per_epoch": statistics.fmean(seconds),
        "epoch_seconds": seconds,
    }
    print(
        f"  {case:<12} {library:<10} seed {seed}: Recall@1 {result['recall_at_1']:.4f}  "
        f"MAP@R {result['map_at_r']:.4f}  {result['seconds_per_epoch']:.2f} s/epoch",
        flush=True,
    )
    return result


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for case in CASES:
        for library in LIBRARIES:
            mine = [r for r in runs if r["case"] == case and r["library"] == library]
            if not mine:  # a case left out by --cases
                continue
            row: dict[str, Any] = {"case": case, "library": library, "seeds": len(mine)}
            for key in ("recall_at_1", "map_at_r", "seconds_per_epoch"):
                row[key], row[key + "_std"] = mean_std([r[key] for r in mine])
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def pm(row: dict, key: str, spec: str) -> str:
        std = row[key + "_std"]
        return fmt(row[key], spec) + ("" if std is None else " ± " + fmt(std, spec))

    body = [
        [
            row["case"],
            row["library"],
            pm(row, "recall_at_1", ".4f"),
            pm(row, "map_at_r", ".4f"),
            pm(row, "seconds_per_epoch", ".2f"),
        ]
        for row in rows
    ]
    headers = ["case", "trained with", "Recall@1", "MAP@R", "s/epoch"]
    return format_table(headers, body, left=(0, 1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits, 1 epoch, 1 seed")
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (--quick: 1)")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.output is None:
        args.output = RESULTS / ("accuracy_quick.json" if args.quick else "accuracy.json")
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown or args.seeds < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error(f"cases must be among {', '.join(CASES)}; seeds and epochs >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup = make_setup(args.quick, args.epochs)
    print(
        f"{setup.dataset}: {len(setup.train_set)} training samples in "
        f"{len(setup.train_set.labels.unique())} classes, {len(setup.test_set)} test samples in "
        f"{len(setup.test_set.labels.unique())} held-out classes; {setup.epochs} epoch(s), "
        f"P={setup.p} K={setup.k}, {args.seeds} seed(s), {args.threads} thread(s), {device}",
        flush=True,
    )
    runs = []
    for case in args.cases:
        for seed in range(args.seeds):
            order = LIBRARIES if seed % 2 == 0 else LIBRARIES[::-1]
            for library in order:
                runs.append(run_one(case, library, setup, seed, device))
    rows = [row for row in summarise(runs) if row["seeds"]]
    print()
    print(table(rows))
    payload = {
        "machine": machine_info(args.threads, str(device)),
        "settings": {
            "dataset": setup.dataset,
            "train_samples": len(setup.train_set),
            "train_classes": int(setup.train_set.labels.unique().numel()),
            "test_samples": len(setup.test_set),
            "test_classes": int(setup.test_set.labels.unique().numel()),
            "rotations": setup.dataset == "omniglot",
            "model": f"EmbeddingNet(SmallConvNet(1, {setup.channels}, 4), "
            f"{setup.channels}, {setup.embedding_size})",
            "sampler": f"deepmetric PKSampler P={setup.p} K={setup.k}, same batches in both",
            "optimizer": f"AdamW lr {setup.lr}, loss lr {setup.loss_lr}, cosine per step",
            "epochs": setup.epochs,
            "seeds": args.seeds,
        },
        "summary": rows,
        "runs": runs,
    }
    write_json(args.output, payload)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
