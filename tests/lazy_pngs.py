"""A lazy dataset of real PNG files, written to the contract of ``deepmetric.data``'s lazy image
datasets (``labels`` / ``class_names`` / ``paths``, ``ds[(index, seed)]`` -> ``(x | None, label)``),
and a small model: shared by the training-data and inference tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from deepmetric import data, models


class LazyPNGs(Dataset[tuple[Tensor | None, int, int]]):
    """Grey PNG files decoded on each access; the random transform adds seeded noise and flips
    the image horizontally with probability 1/2."""

    accepts_sample_seeds = True

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.class_names = [str(c) for c in range(int(self.labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> Tensor | None:
        try:
            with Image.open(self.paths[index]) as image:
                pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        except OSError:
            return None
        return torch.from_numpy(pixels.copy()).unsqueeze(0)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor | None, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        x = self.decode(index)
        if x is not None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
            if float(torch.rand(1, generator=generator)) < 0.5:
                x = x.flip(-1)
            x = x + 0.05 * torch.randn(x.shape, generator=generator)
        return x, int(self.labels[index]), index


def write_pngs(folder: Path, classes: range, per_class: int, broken: int | None = None) -> LazyPNGs:
    """``per_class`` digits of each class as 8-bit PNG files; the file of sample ``broken`` is
    replaced by bytes that are no image."""
    digits = data.load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for c in classes:
        for i in torch.where(digits.labels == c)[0][:per_class].tolist():
            path = folder / f"{c}_{i}.png"
            pixels = (digits.x[i, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(path)
            paths.append(path)
            labels.append(c)
    if broken is not None:
        paths[broken].write_bytes(b"not a png")
    return LazyPNGs(paths, labels)


def small_model() -> models.EmbeddingNet:
    return models.EmbeddingNet(models.SmallConvNet(1, channels=8, blocks=2), 8, embedding_size=8)
