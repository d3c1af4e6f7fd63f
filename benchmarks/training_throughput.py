"""Training throughput (images per second) of deepmetric's ``Trainer`` against a plain PyTorch
loop over the same model, data, ``DataLoader`` settings, PML loss and miner.

Both sides train in this one process, interleaved round by round in the order A B B A (so a
drift of the machine's load falls on both), each round one epoch of P×K batches from
:class:`deepmetric.samplers.PKSampler` (the batches of both sides are the same):

* **deepmetric**: ``Trainer.fit(max_steps=...)`` one epoch further each round, as configured by
  default except ``progress: false`` (the plain loop shows no bar) and no ``run_dir`` (the time
  of writing ``last.pt`` once an epoch is printed apart);
* **plain**: ``for x, y in DataLoader(...): loss = loss_fn(model(x), y, miner(...));
  loss.backward(); optimizer.step()``, with AdamW, ``zero_grad(set_to_none=True)``, and
  ``torch.use_deterministic_algorithms`` off (the trainer switches it on by default, for exact
  resume; it is set as each side would set it when timed).

Cases: ``small``: :class:`~deepmetric.models.SmallConvNet` (64 channels, 4 blocks) at 28×28
grey on Omniglot (shipped with the package), P×K = 32×4; ``resnet18``: a ResNet-18-shaped
trunk (written below: torchvision does not import beside this torch) at 112×112 RGB on random
images, P×K = 8×4 (the CPU would take minutes per epoch at 32×4); ``small-lazy``: the small
case's images written as PNG files and decoded in 2 ``DataLoader`` workers on both sides (the
trainer passes a seed per sample, its random transform a horizontal flip; the plain loop reads
the same files with integer keys), with the loader's own rate (an epoch of batches, no steps);
``resnet18-jpeg``: the ResNet-18 case on 224 px product JPEGs, decoded, cropped and flipped to
112 px by :class:`~deepmetric.transforms.TrainTransform` in 2 workers on both sides (is the
loader the bottleneck?); ``faces-small``: issue 14's small face set (20 people, 200 photos, 3
batches of 16×4 an epoch, Conv-4 at 56 px): the trainer as a run uses it (JPEGs decoded by 2
persistent workers with the photo augmentation, ``last.pt`` and the log written every epoch)
against a plain loop over the same photos resized once and held in memory.

Run: ``python benchmarks/training_throughput.py [--cases small resnet18] [--rounds 7]``. Prints
a table and writes ``benchmarks/results/training_throughput.json``. Numbers on a machine shared
with other jobs are indicative: the spread (min-max of the rounds) says how much.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import format_table, machine_info, write_json
from PIL import Image
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from deepmetric import data, models
from deepmetric.samplers import PKSampler
from deepmetric.training import TrainConfig, Trainer
from deepmetric.transforms import EvalTransform, TrainTransform

RESULTS = Path(__file__).parent / "results" / "training_throughput.json"


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al., 2016): two 3×3 convolutions with BatchNorm, and a
    projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@dataclass
class Case:
    """A benchmark case: the model factory, the data each side trains on (the same, unless the
    case compares the trainer's file pipeline with a plain loop over tensors), P, K, and the
    trainer's own workers and checkpoints where the case sets them."""

    model: Callable[[], nn.Module]
    trainer_data: Dataset[Any]
    plain_data: Dataset[Any]
    p: int
    k: int
    trainer_workers: int | None = None
    checkpoints: bool = False


def resnet18_trunk() -> nn.Module:
    """ResNet-18's layout (11.2 M parameters): stem, 4 stages of 2 basic blocks (64-512
    channels), global average pooling -> ``(N, 512)``."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def resnet() -> nn.Module:
    return models.EmbeddingNet(resnet18_trunk(), 512, embedding_size=128)


class LazyPNGs(Dataset[tuple[Tensor | None, int, int]]):
    """Grey PNG files decoded on each access, to the contract of deepmetric's lazy datasets:
    ``ds[(i, seed)]`` flips at random (seeded), ``ds[i]`` does not."""

    accepts_sample_seeds = True

    def __init__(self, images: data.ArrayDataset) -> None:
        folder = Path(tempfile.mkdtemp(prefix="throughput-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        self.paths = []
        for i, image in enumerate(images.x):
            path = folder / f"{i}.png"
            Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(path)
            self.paths.append(path)
        self.labels = images.labels
        self.class_names = images.class_names

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor | None, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        with Image.open(self.paths[index]) as image:
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
        if seed is not None and torch.rand(1, generator=torch.Generator().manual_seed(seed)) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index]), index


def photo_folder(kind: str, count: int, side: int) -> Path:
    """A generated folder of JPEG photos (faces or products, ten per class), removed at exit."""
    from deepmetric.data.synthetic import make_faces, make_products

    folder = Path(tempfile.mkdtemp(prefix=f"throughput-{kind}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    make = make_faces if kind == "faces" else make_products
    make(folder, count // 10, 10, side, 0)
    return folder


def case_setup(name: str) -> Case:
    """The model, the data of each side, P and K of a case."""
    if name in ("small", "small-lazy"):
        omniglot = data.load_omniglot(28)
        keep = torch.where(omniglot.labels < 64)[0]  # 64 classes x 20: 10 batches an epoch

        def small() -> nn.Module:
            return models.EmbeddingNet(models.SmallConvNet(1, 64, 4), 64, embedding_size=128)

        images = omniglot.subset(keep)
        dataset = LazyPNGs(images) if name == "small-lazy" else images
        return Case(small, dataset, dataset, 32, 4)
    if name == "resnet18":
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(96, 3, 112, 112, generator=generator)  # 3 batches of 8 x 4
        labels = torch.arange(24).repeat_interleave(4)
        dataset = data.ArrayDataset(x, labels)
        return Case(resnet, dataset, dataset, 8, 4)
    if name == "resnet18-jpeg":
        # 224 px JPEGs decoded and cropped to 112 px by the workers on both sides
        photos = data.open_dataset(f"folder:{photo_folder('products', 96, 224)}")
        dataset = photos.with_transform(TrainTransform(112, scale=(0.5, 1.0)))
        return Case(resnet, dataset, dataset, 8, 4)
    if name == "faces-small":
        # the face set of issue 14: 20 people, 200 photos, 3 batches an epoch, 56 px. The
        # trainer reads the JPEGs through its workers with the CLI's augmentation and writes
        # last.pt and the log every epoch; the plain loop holds the resized images in memory.
        photos = data.open_dataset(f"folder:{photo_folder('faces', 200, 112)}")
        resize = EvalTransform(56, resize=56, mean=(0.0,), std=(1.0,))
        x = torch.stack([resize(Image.open(path).convert("RGB")) for path in photos.paths])

        def conv4() -> nn.Module:
            return models.EmbeddingNet(models.SmallConvNet(3, 64, 4), 64, embedding_size=128)

        augmented = photos.with_transform(
            TrainTransform(56, scale=(0.5, 1.0), mean=(0.0,), std=(1.0,))
        )
        in_memory = data.ArrayDataset(x, photos.labels)
        return Case(conv4, augmented, in_memory, 16, 4, trainer_workers=2, checkpoints=True)
    raise ValueError(f"unknown case {name!r}")


def measure(name: str, rounds: int, workers: int) -> dict[str, Any]:
    case = case_setup(name)
    if name.endswith(("-lazy", "-jpeg")):
        workers = max(workers, 2)
    trainer_workers = workers if case.trainer_workers is None else case.trainer_workers
    run_dir = Path(tempfile.mkdtemp(prefix="throughput-run-")) if case.checkpoints else None
    if run_dir is not None:
        atexit.register(shutil.rmtree, run_dir, ignore_errors=True)
    p, k = case.p, case.k
    torch.manual_seed(0)
    config = TrainConfig(epochs=rounds + 1, p=p, k=k, progress=False, num_workers=trainer_workers)
    trainer = Trainer(
        case.model(),
        pml_losses.TripletMarginLoss(margin=0.1),
        case.trainer_data,
        config,
        miner=pml_miners.MultiSimilarityMiner(),
        run_dir=run_dir,
    )
    steps = len(trainer.sampler)

    torch.manual_seed(0)
    model = case.model()
    loss_fn = pml_losses.TripletMarginLoss(margin=0.1)
    miner = pml_miners.MultiSimilarityMiner()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    labels: Tensor = case.plain_data.labels  # type: ignore[attr-defined]
    loader = DataLoader(
        case.plain_data,
        batch_sampler=PKSampler(labels, p, k, seed=0),
        num_workers=workers,
        persistent_workers=workers > 0,
    )

    def plain_epoch() -> None:
        model.train()
        for batch in loader:
            x, y = batch[0], batch[1]
            optimizer.zero_grad(set_to_none=True)
            embeddings = model(x)
            loss_fn(embeddings, y, miner(embeddings, y)).backward()
            optimizer.step()

    def trainer_epoch() -> None:
        trainer.fit(max_steps=trainer.step + steps)

    def timed(side: str) -> float:
        torch.use_deterministic_algorithms(side == "deepmetric", warn_only=True)
        start = time.perf_counter()
        (trainer_epoch if side == "deepmetric" else plain_epoch)()
        return time.perf_counter() - start

    timed("deepmetric"), timed("plain")  # warm-up: allocator, workers, first kernels
    seconds: dict[str, list[float]] = {"deepmetric": [], "plain": []}
    for r in range(rounds):
        order = ("deepmetric", "plain") if r % 2 == 0 else ("plain", "deepmetric")
        for side in order:
            seconds[side].append(timed(side))
    with tempfile.TemporaryDirectory() as folder:
        trainer.run_dir, kept_dir = Path(folder), trainer.run_dir
        start = time.perf_counter()
        trainer.save("last.pt")
        save_seconds = time.perf_counter() - start
        checkpoint_mb = (Path(folder) / "last.pt").stat().st_size / 2**20
        trainer.run_dir = kept_dir
    images = steps * p * k
    start = time.perf_counter()
    for _ in trainer.loader:  # the data alone: decoding (in the workers) and collation
        pass
    loader_seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "case": name,
        "p": p,
        "k": k,
        "steps_per_epoch": steps,
        "num_workers": workers,
        "trainer_num_workers": trainer_workers,
        "trainer_checkpoints_every_epoch": case.checkpoints,
        "rounds": rounds,
        "checkpoint_seconds": save_seconds,
        "checkpoint_mb": checkpoint_mb,
        "loader_images_per_second": images / loader_seconds,
    }
    for side, values in seconds.items():
        rates = sorted(images / s for s in values)
        result[side] = {
            "epoch_seconds": values,
            "images_per_second_median": statistics.median(rates),
            "images_per_second_min": rates[0],
            "images_per_second_max": rates[-1],
        }
    ratios = sorted(p_ / d for d, p_ in zip(seconds["deepmetric"], seconds["plain"], strict=True))
    result["ratio_median"] = statistics.median(ratios)  # deepmetric's rate / plain's, per round
    result["ratio_min"], result["ratio_max"] = ratios[0], ratios[-1]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["small", "small-lazy", "resnet18", "resnet18-jpeg", "faces-small"],
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (both sides)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(name, args.rounds, args.workers) for name in args.cases]
    rows = [
        [
            r["case"],
            f"{r['p']}x{r['k']}",
            f"{r['deepmetric']['images_per_second_median']:.0f} "
            f"({r['deepmetric']['images_per_second_min']:.0f}-"
            f"{r['deepmetric']['images_per_second_max']:.0f})",
            f"{r['plain']['images_per_second_median']:.0f} "
            f"({r['plain']['images_per_second_min']:.0f}-"
            f"{r['plain']['images_per_second_max']:.0f})",
            f"{r['ratio_median']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
            f"{r['checkpoint_seconds'] * 1e3:.0f} ms / {r['checkpoint_mb']:.1f} MB",
            f"{r['loader_images_per_second']:.0f}",
        ]
        for r in results
    ]
    headers = ["case", "PxK", "deepmetric img/s", "plain img/s", "ratio", "last.pt", "loader img/s"]
    print(format_table(headers, rows))
    # cases measured before (another --cases) are kept, each with the machine it ran on
    machine = machine_info(args.threads, "cpu")
    kept = []
    if RESULTS.is_file():
        measured = {r["case"] for r in results}
        kept = [r for r in json.loads(RESULTS.read_text())["results"] if r["case"] not in measured]
    write_json(RESULTS, {"results": kept + [{**r, "machine": machine} for r in results]})


if __name__ == "__main__":
    main()
