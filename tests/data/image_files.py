"""Image and CSV files written for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _save(path: Path, image: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _noise(seed: int, size: tuple[int, int] = (24, 18)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
