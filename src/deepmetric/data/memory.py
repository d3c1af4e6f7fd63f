"""Datasets held in memory as one tensor: built-in data (no download) and small user datasets.

Built in:

* :func:`load_digits` — scikit-learn's bundled 8×8 digits (1,797 images, 10 classes): a
  seconds-long smoke test.
* :func:`load_omniglot` — Omniglot's two small background subsets (242 distinct characters ×
  20 drawers; Lake et al., Science 2015), shipped inside the package with its MIT licence.
* :func:`load_omniglot_runs` — the 20 official 20-way one-shot runs, on characters that are in no
  background subset.

The user's own small data, decoded up front into an :class:`ArrayDataset`:
:func:`load_image_folder` (one sub-folder per class), :func:`load_image_csv` (``path,label``
rows) and :func:`load_arrays` (``.npz``/``.npy`` features or images with labels). Unreadable
images are skipped with a warning naming each file and a count at the end. For photographs, or
more images than fit in memory, :mod:`deepmetric.data.images` reads the same layouts lazily.
"""

from __future__ import annotations

import csv
import io
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..transforms import SmallImageTransform
from .images import DECODE_ERRORS, IMAGE_SUFFIXES, decode_image


@dataclass
class ArrayDataset(Dataset[tuple[Tensor, Tensor]]):
    """Samples and integer labels held in memory.

    ``x``: ``(N, ...)`` float32 (images ``(N, C, H, W)`` in ``[0, 1]``, or features ``(N, D)``);
    ``labels``: ``(N,)`` int64; ``class_names[labels[i]]`` names sample ``i``'s class.
    """

    x: Tensor
    labels: Tensor
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.x) != len(self.labels):
            raise ValueError(f"{len(self.x)} samples but {len(self.labels)} labels")
        if self.labels.ndim != 1 or self.labels.is_floating_point():
            raise ValueError("labels must be a 1-D integer tensor")
        self.labels = self.labels.long()
        if not self.class_names:
            n = int(self.labels.max()) + 1 if len(self.labels) else 0
            self.class_names = [str(i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.labels[index]

    def subset(self, indices: Tensor | np.ndarray | Sequence[int]) -> ArrayDataset:
        """The samples at ``indices`` (labels and class names unchanged)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ArrayDataset(self.x[idx], self.labels[idx], list(self.class_names))


# -- built-in data --------------------------------------------------------------------------------


def load_digits() -> ArrayDataset:
    """scikit-learn's bundled digits: ``(1797, 1, 8, 8)`` images in ``[0, 1]``, labels 0-9."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return ArrayDataset(x, torch.tensor(digits.target), [str(i) for i in range(10)])


def _omniglot_file(name: str) -> Path:
    path = Path(str(resources.files("deepmetric") / "datasets" / "omniglot" / name))
    if not path.is_file():
        raise ValueError(f"built-in Omniglot file missing from the installation: {path}")
    return path


def _decode_grey(data: bytes, size: int, invert: bool) -> np.ndarray:
    """PNG bytes -> ``(size, size)`` float32 in [0, 1]; Omniglot strokes become 1 when inverted."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        grey = img.convert("L").resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(grey, dtype=np.float32) / 255.0
    return 1.0 - arr if invert else arr


def load_omniglot(size: int = 28) -> ArrayDataset:
    """Omniglot's small background subsets: every distinct character (alphabet/character) is a
    class, 20 drawings each, strokes bright on dark, resized to ``size``×``size``.

    Returns ``(4840, 1, size, size)`` images (the 50 characters present in both subsets counted
    once) with ``class_names`` like ``"Greek/character01"``.
    """
    images: dict[tuple[str, str, str], np.ndarray] = {}
    for name in ("images_background_small1.zip", "images_background_small2.zip"):
        with zipfile.ZipFile(_omniglot_file(name)) as archive:
            for member in archive.namelist():
                if not member.endswith(".png"):
                    continue
                _, alphabet, character, filename = member.split("/")
                key = (alphabet, character, filename)
                if key not in images:
                    images[key] = _decode_grey(archive.read(member), size, invert=True)
    keys = sorted(images)
    class_names = sorted({f"{a}/{c}" for a, c, _ in keys})
    class_index = {n: i for i, n in enumerate(class_names)}
    x = torch.from_numpy(np.stack([images[k] for k in keys])).unsqueeze(1)
    labels = torch.tensor([class_index[f"{a}/{c}"] for a, c, _ in keys])
    return ArrayDataset(x, labels, class_names)


@dataclass
class OneShotRun:
    """One 20-way one-shot task: 20 ``support`` images (one per class) and 20 ``query`` images;
    ``query_labels[i]`` is the index of the support image of query ``i``'s class."""

    support: Tensor  # (20, 1, H, W)
    query: Tensor  # (20, 1, H, W)
    query_labels: Tensor  # (20,)


def load_omniglot_runs(size: int = 28) -> list[OneShotRun]:
    """The 20 official 20-way one-shot runs of Lake et al. (2015), on evaluation alphabets that
    no background subset contains."""
    runs = []
    with zipfile.ZipFile(_omniglot_file("all_runs.zip")) as archive:
        for r in range(1, 21):
            lines = archive.read(f"run{r:02d}/class_labels.txt").decode().split()
            pairs = list(zip(lines[0::2], lines[1::2], strict=True))
            support_names = sorted({train for _, train in pairs})
            support_index = {n: i for i, n in enumerate(support_names)}
            support = [_decode_grey(archive.read(n), size, True) for n in support_names]
            query = [_decode_grey(archive.read(test), size, True) for test, _ in pairs]
            runs.append(
                OneShotRun(
                    torch.from_numpy(np.stack(support)).unsqueeze(1),
                    torch.from_numpy(np.stack(query)).unsqueeze(1),
                    torch.tensor([support_index[train] for _, train in pairs]),
                )
            )
    return runs


# -- the user's own data --------------------------------------------------------------------------


def _load_images(
    paths: Sequence[Path], class_ids: Sequence[int], size: int, grayscale: bool
) -> tuple[Tensor, Tensor]:
    """Decode (:func:`~deepmetric.data.images.decode_image`) and resize every image to ``size`` ×
    ``size``; skip unreadable ones with a warning each and a count."""
    transform = SmallImageTransform(size)
    mode = "L" if grayscale else "RGB"
    arrays, kept, skipped = [], [], []
    for path, label in tqdm(list(zip(paths, class_ids, strict=True)), desc="loading images"):
        try:
            image = decode_image(path, mode)
        except DECODE_ERRORS as error:
            warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
            skipped.append(path)
            continue
        arrays.append(transform(image))
        kept.append(label)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {len(paths)}", stacklevel=2)
    if not arrays:
        raise ValueError("no readable images found")
    return torch.stack(arrays), torch.tensor(kept)


def load_image_folder(root: str | Path, size: int = 28, grayscale: bool = True) -> ArrayDataset:
    """``root/<class name>/<image>``: one sub-folder per class, classes sorted by name, images
    at any depth inside it (every suffix of :data:`~deepmetric.data.images.IMAGE_SUFFIXES`).

    Returns ``(N, C, size, size)`` images in ``[0, 1]``, ``C`` = 1 when ``grayscale`` else 3."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not class_names:
        raise ValueError(f"{root} has no class sub-folders")
    paths, ids = [], []
    for i, name in enumerate(class_names):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                paths.append(path)
                ids.append(i)
    x, labels = _load_images(paths, ids, size, grayscale)
    return ArrayDataset(x, labels, class_names)


def load_image_csv(csv_path: str | Path, size: int = 28, grayscale: bool = True) -> ArrayDataset:
    """A CSV of ``path,label`` rows (a header row ``path,label`` is optional); relative paths are
    relative to the CSV's folder. Labels may be any strings; classes are sorted by name."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"CSV file not found: {csv_path}")
    with csv_path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if rows and [c.strip().lower() for c in rows[0]] == ["path", "label"]:
        rows = rows[1:]
    for number, row in enumerate(rows, start=1):
        if len(row) != 2:
            raise ValueError(f"{csv_path} row {number}: expected 'path,label', got {row}")
    class_names = sorted({label.strip() for _, label in rows})
    index = {n: i for i, n in enumerate(class_names)}
    paths = [(csv_path.parent / p.strip()) for p, _ in rows]
    x, labels = _load_images(paths, [index[label.strip()] for _, label in rows], size, grayscale)
    return ArrayDataset(x, labels, class_names)


def load_arrays(path: str | Path, labels_path: str | Path | None = None) -> ArrayDataset:
    """Features or images with labels from NumPy files.

    * ``.npz`` holding ``x`` (or ``features``/``images``/``embeddings``) and ``y``/``labels``;
    * ``.npy`` of samples plus ``labels_path``, a ``.npy`` of integer labels.
    Images may be ``(N, H, W)`` (a channel axis is added) or ``(N, C, H, W)``; uint8 is scaled to
    [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"array file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            x_key = next(
                (k for k in ("x", "features", "images", "embeddings") if k in archive), None
            )
            y_key = next((k for k in ("y", "labels") if k in archive), None)
            if x_key is None or y_key is None:
                raise ValueError(f"{path} needs arrays 'x' and 'y' (found {list(archive.keys())})")
            x_np, y_np = archive[x_key], archive[y_key]
    else:
        if labels_path is None:
            raise ValueError("a .npy of samples needs labels_path (a .npy of labels)")
        if not Path(labels_path).is_file():
            raise ValueError(f"labels file not found: {labels_path}")
        x_np = np.load(path, allow_pickle=False)
        y_np = np.load(labels_path, allow_pickle=False)
    if not np.issubdtype(y_np.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y_np.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(x_np))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if not torch.isfinite(x).all():
        raise ValueError(f"{path} contains NaN or Inf")
    return ArrayDataset(x, torch.from_numpy(y_np.astype(np.int64)))
