"""Image datasets that hold paths and labels, decoded one sample at a time.

:class:`ImageDataset` lists files; pixels are decoded in :meth:`ImageDataset.__getitem__`, in
whatever ``DataLoader`` worker process asks for them, so memory holds a batch rather than the
dataset. Two readers build one from the user's own data without decoding anything:

* :func:`image_folder` — ``root/<class>/<image>``, nested folders allowed inside a class;
* :func:`image_csv` — a CSV of ``path,label`` rows with optional ``split``, ``is_query`` and
  ``is_gallery`` columns.

The standard benchmarks' own layouts are read by :mod:`deepmetric.data.standard`, and
:func:`open_dataset` turns a command-line spec such as ``folder:photos/`` or ``cub:CUB_200_2011``
into a dataset.

Decoding (:func:`decode_image`) opens every format Pillow reads (:data:`IMAGE_SUFFIXES`), applies
the EXIF orientation, takes the first frame of animations and multi-page TIFFs, composites
transparent images on white, maps 16-bit images to 8 bits by their full range, and converts to
``"RGB"`` (what pretrained backbones take) or ``"L"`` (grey). A file that cannot be decoded gives
``x = None`` and one warning naming it; :func:`collate_samples` drops such samples from the batch
and reports their indices, so an epoch goes on past a corrupt file.
"""

from __future__ import annotations

import copy
import csv
import inspect
import operator
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from ..transforms import to_tensor

MODES = ("RGB", "L")
SPLITS = ("train", "val", "test")


def _openable_suffixes() -> tuple[str, ...]:
    """Every file suffix Pillow can open, less the identify-only formats (stub plugins such as
    HDF5 and GRIB, and MPEG) whose files would only ever fail to decode."""
    Image.init()
    suffixes = {".mpo"}  # camera multi-picture JPEGs: opened by the JPEG plugin
    for suffix, fmt in Image.registered_extensions().items():
        factory = Image.OPEN.get(fmt, (None,))[0]
        if factory is None or fmt == "MPEG":
            continue
        if inspect.isclass(factory) and issubclass(factory, ImageFile.StubImageFile):
            continue
        suffixes.add(suffix.lower())
    return tuple(sorted(suffixes))


IMAGE_SUFFIXES: tuple[str, ...] = _openable_suffixes()

# What a broken file raises while Pillow decodes it (truncated data, bad headers, bad zlib
# streams, absurd sizes); anything else is a bug and propagates.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

# Modes with more than 8 bits per pixel: mapped to 8 bits by their full range (16-bit PGM/PNG/
# TIFF hold 0-65535 in Pillow's "I" and "I;16" modes; Pillow already rescales a PGM's own maxval
# to that range). A plain ``convert("L")`` would clip every value above 255 to white.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert a loaded image to ``mode`` ("RGB" or "L") as a model needs it."""
    if image.mode in _WIDE_MODES:
        wide = np.asarray(image, dtype=np.float64)
        eight = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        image = Image.fromarray(eight, mode="L")
    elif image.mode == "F":
        # Float images (PFM, float TIFF) are taken to be in [0, 1].
        floats = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(floats * 255.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Transparent pixels carry arbitrary colours (often black): show the image on white, as
        # a catalogue photo with a transparent background is meant to be seen.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image if image.mode == mode else image.convert(mode)


def decode_image(
    path: str | Path,
    mode: str = "RGB",
    decode_size: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """Decode one image file as ``mode`` ("RGB" or "L").

    The first frame of an animated GIF or multi-page TIFF; EXIF orientation applied; transparent
    images composited on white; 16-bit images mapped to 8 bits by their full range (value ×
    255 / 65535); float images taken as ``[0, 1]``. ``decode_size(width, height)``, where given,
    is the smallest size worth decoding, which lets a JPEG decode at 1/2, 1/4 or 1/8 scale.

    Raises whatever Pillow raises on a broken file (one of :data:`DECODE_ERRORS`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    with Image.open(path) as image:
        if decode_size is not None and image.format == "JPEG":
            image.draft(None, decode_size(*image.size))
        image.load()
        if image.getexif().get(0x0112, 1) != 1:  # 0x0112: the EXIF Orientation tag
            transposed = ImageOps.exif_transpose(image)
            assert transposed is not None  # not in place: a new image
            return _to_mode(transposed, mode)
        return _to_mode(image, mode)


class ImageDataset(Dataset[tuple[Tensor | None, int, int]]):
    """Image files and their integer labels, decoded one at a time.

    Sample ``i`` is ``(x, label, i)``: ``x`` the image at ``paths[i]`` decoded as ``mode`` and
    passed through ``transform`` (a ``(C, H, W)`` float32 tensor; without a transform the image
    at its own size in ``[0, 1]``), or ``None`` if the file cannot be decoded, in which case one
    warning names the file (once per file and process) and :func:`collate_samples` leaves it out.

    Indexing with ``(i, seed)`` hands the transform a ``torch.Generator`` seeded with ``seed``, so
    the augmentation of a sample depends only on ``(i, seed)``, not on the worker process that
    decodes it; a plain ``i`` hands it ``None`` (evaluation: deterministic transforms).

    Attributes:
        paths: absolute paths, ``(N,)``.
        labels: ``(N,)`` int64, indices into ``class_names``.
        class_names: name of each class.
        transform: ``(image, generator) -> Tensor`` (see :mod:`deepmetric.transforms`) or None.
        mode: ``"RGB"`` or ``"L"``, what images are converted to before the transform.
        is_query, is_gallery: ``(N,)`` bool marks for retrieval evaluation where the source has
            them (a CSV's columns, In-Shop's partition), else None.
    """

    #: The trainer hands each training sample a seed of its own (``ds[(i, seed)]``), so that
    #: a resumed run draws the same augmentations whatever worker decodes the sample.
    accepts_sample_seeds = True

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Tensor | np.ndarray | Sequence[int],
        class_names: Sequence[str] | None = None,
        *,
        transform: Callable[..., Tensor] | None = None,
        mode: str = "RGB",
        is_query: Tensor | np.ndarray | Sequence[bool] | None = None,
        is_gallery: Tensor | np.ndarray | Sequence[bool] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        label_tensor = torch.as_tensor(np.asarray(labels))
        if label_tensor.ndim != 1 or label_tensor.is_floating_point() or label_tensor.is_complex():
            raise ValueError("labels must be a 1-D integer sequence")
        if len(label_tensor) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(label_tensor)} labels")
        self.paths: list[Path] = [Path(os.path.abspath(p)) for p in paths]
        self.labels: Tensor = label_tensor.long()
        n_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.class_names: list[str] = (
            list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
        )
        if len(self.labels) and (int(self.labels.min()) < 0 or n_classes > len(self.class_names)):
            raise ValueError(
                f"labels must lie in [0, {len(self.class_names)}) (one per class name), got "
                f"{int(self.labels.min())}..{int(self.labels.max())}"
            )
        self.transform = transform
        self.mode = mode
        self.is_query = self._marks(is_query, "is_query")
        self.is_gallery = self._marks(is_gallery, "is_gallery")
        self._warned: set[Path] = set()

    def _marks(
        self, marks: Tensor | np.ndarray | Sequence[bool] | None, name: str
    ) -> Tensor | None:
        if marks is None:
            return None
        tensor = torch.as_tensor(np.asarray(marks, dtype=bool))
        if tensor.shape != self.labels.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected ({len(self)},)")
        return tensor

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (
            f"ImageDataset({len(self)} images, {len(set(self.labels.tolist()))} classes, "
            f"mode={self.mode!r}, transform={self.transform!r})"
        )

    @property
    def input_channels(self) -> int:
        """Channels of a decoded sample: 3 for RGB, 1 for grey."""
        return 3 if self.mode == "RGB" else 1

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor | None, int, int]:
        if isinstance(key, tuple):
            raw_index, seed = key
            generator: torch.Generator | None = torch.Generator().manual_seed(int(seed))
        else:
            raw_index, generator = key, None
        index = operator.index(raw_index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        path = self.paths[index]
        label = int(self.labels[index])
        decode_size = getattr(self.transform, "decode_size", None)
        try:
            image = decode_image(path, self.mode, decode_size)
        except DECODE_ERRORS as error:
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
            return None, label, index
        x = to_tensor(image) if self.transform is None else self.transform(image, generator)
        return x, label, index

    def subset(self, indices: Tensor | np.ndarray | Sequence[int]) -> ImageDataset:
        """The samples at ``indices``, in that order (class names, transform and mode kept)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        picked = copy.copy(self)
        picked.paths = [self.paths[i] for i in idx.tolist()]
        picked.labels = self.labels[idx]
        picked.class_names = list(self.class_names)
        picked.is_query = None if self.is_query is None else self.is_query[idx]
        picked.is_gallery = None if self.is_gallery is None else self.is_gallery[idx]
        picked._warned = set()
        return picked

    def with_transform(self, transform: Callable[..., Tensor] | None) -> ImageDataset:
        """A copy that applies ``transform`` (the lists of paths and labels are shared)."""
        changed = copy.copy(self)
        changed.transform = transform
        changed._warned = set()
        return changed


def collate_samples(
    items: Sequence[tuple[Any, ...]],
) -> tuple[Tensor, Tensor, list[int]]:
    """``DataLoader`` ``collate_fn`` for :class:`ImageDataset` (``(x, label, index)`` samples)
    and :class:`~deepmetric.data.ArrayDataset` (``(x, label)``).

    Samples whose ``x`` is None (unreadable files) are dropped. Returns ``(x, labels, skipped)``:
    ``x`` the ``(B', ...)`` stack of the others, ``labels`` ``(B',)`` int64, and ``skipped`` the
    dataset indices of the dropped samples. When every sample of a batch was dropped, ``x`` and
    ``labels`` are empty tensors of shape ``(0,)``: the caller skips that batch.
    """
    xs: list[Tensor] = []
    labels: list[int] = []
    skipped: list[int] = []
    for item in items:
        if len(item) == 3:
            x, label, index = item
        elif len(item) == 2:
            (x, label), index = item, None
        else:
            raise ValueError(f"samples must be (x, label) or (x, label, index), got {len(item)}")
        if x is None:
            if index is None:
                raise ValueError("a sample without an index cannot be skipped: x is None")
            skipped.append(int(index))
            continue
        xs.append(x)
        labels.append(int(label))
    if not xs:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    return torch.stack(xs), torch.tensor(labels, dtype=torch.long), skipped


# -- readers --------------------------------------------------------------------------------------


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` at any depth, sorted; hidden files and folders (``.DS_Store``,
    macOS ``._name.jpg`` resource forks, ``.ipynb_checkpoints``) left out."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append(os.path.join(directory, name))
    return [Path(p) for p in sorted(found)]


def image_folder(
    root: str | Path, *, transform: Callable[..., Tensor] | None = None, mode: str = "RGB"
) -> ImageDataset:
    """The images of ``root/<class>/...``: each first-level sub-folder of ``root`` is a class
    (classes sorted by name), holding its images at any depth (``root/<class>/<a>/<b>.jpg``).

    Lists files without decoding them; every suffix in :data:`IMAGE_SUFFIXES` counts, case
    ignored. Hidden files and folders are skipped, and so is a class folder with no images (with a
    warning). A class with a single image is kept (see :func:`deepmetric.data.trainable_classes`).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    class_dirs = sorted(
        (entry.name for entry in os.scandir(root) if entry.is_dir() and entry.name[0] != "."),
    )
    if not class_dirs:
        loose = _list_images(root)
        hint = f" ({len(loose)} images lie in it directly)" if loose else ""
        raise ValueError(
            f"{root} has no class sub-folders{hint}: put each class's images in their own "
            f"folder, {root}/<class name>/<image>"
        )
    paths: list[Path] = []
    labels: list[int] = []
    class_names: list[str] = []
    empty: list[str] = []
    for name in class_dirs:
        images = _list_images(root / name)
        if not images:
            empty.append(name)
            continue
        paths.extend(images)
        labels.extend([len(class_names)] * len(images))
        class_names.append(name)
    if not paths:
        raise ValueError(
            f"no images found in the class folders of {root} (looked for "
            f"{', '.join(IMAGE_SUFFIXES)})"
        )
    if empty:
        shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
        warnings.warn(
            f"{len(empty)} class folder(s) of {root} hold no images and are left out: {shown}",
            stacklevel=2,
        )
    return ImageDataset(paths, labels, class_names, transform=transform, mode=mode)


def check_files_exist(paths: Sequence[Path], source: str | Path) -> None:
    """Raise a ``ValueError`` naming the missing files of a listing (up to three of them)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise ValueError(
            f"{len(missing)} of the {len(paths)} images listed by {source} do not exist "
            f"(e.g. {shown}): check the paths are relative to the listing's folder"
        )


_TRUE = ("1", "true")
_FALSE = ("0", "false")


def image_csv(
    csv_path: str | Path,
    *,
    split: str | None = None,
    transform: Callable[..., Tensor] | None = None,
    mode: str = "RGB",
) -> ImageDataset:
    """The images listed in a CSV file.

    The header row is required and names the columns (any order, case ignored): ``path`` and
    ``label`` always; ``split`` (``train``, ``val`` or ``test``), ``is_query`` and ``is_gallery``
    (``0``/``1``/``true``/``false``) optionally; other columns are ignored. Relative paths are
    relative to the CSV's folder. ``split`` keeps the rows of that split (the file must have a
    ``split`` column); ``is_query``/``is_gallery`` become the dataset's boolean marks.

    Labels may be any strings; the classes of the kept rows are sorted by name and numbered from
    0, so the same name can get another index in another split. Every listed file must exist.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"CSV file not found: {csv_path}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or None, got {split!r}")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{csv_path} is empty: it needs a header row 'path,label'")
        columns = [c.strip().lower() for c in header]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise ValueError(
                f"{csv_path} lacks the column(s) {', '.join(missing)}: the header row must name "
                f"path and label (and optionally split, is_query, is_gallery); found "
                f"{', '.join(columns) or 'nothing'}"
            )
        if split is not None and "split" not in columns:
            raise ValueError(f"{csv_path} has no 'split' column to select split={split!r} by")
        where = {name: columns.index(name) for name in columns}
        rows = []
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(columns):
                raise ValueError(
                    f"{csv_path} line {line}: {len(row)} fields where the header names "
                    f"{len(columns)}"
                )
            rows.append((line, [cell.strip() for cell in row]))

    def flag(line: int, row: list[str], name: str) -> bool:
        value = row[where[name]].lower()
        if value not in _TRUE + _FALSE:
            raise ValueError(
                f"{csv_path} line {line}: {name} is {row[where[name]]!r}; write 0, 1, true or false"
            )
        return value in _TRUE

    paths, names, queries, galleries = [], [], [], []
    for line, row in rows:
        if not row[where["path"]] or not row[where["label"]]:
            raise ValueError(f"{csv_path} line {line}: empty path or label")
        if "split" in where:
            row_split = row[where["split"]].lower()
            if row_split not in SPLITS:
                raise ValueError(
                    f"{csv_path} line {line}: split {row[where['split']]!r} is not one of "
                    f"{', '.join(SPLITS)}"
                )
            if split is not None and row_split != split:
                continue
        if "is_query" in where:
            queries.append(flag(line, row, "is_query"))
        if "is_gallery" in where:
            galleries.append(flag(line, row, "is_gallery"))
        paths.append(csv_path.parent / row[where["path"]])
        names.append(row[where["label"]])
    if not paths:
        chosen = f" with split {split!r}" if split is not None else ""
        raise ValueError(f"{csv_path} lists no images{chosen}")
    check_files_exist(paths, csv_path)
    class_names = sorted(set(names))
    index = {name: i for i, name in enumerate(class_names)}
    return ImageDataset(
        paths,
        [index[name] for name in names],
        class_names,
        transform=transform,
        mode=mode,
        is_query=queries if "is_query" in where else None,
        is_gallery=galleries if "is_gallery" in where else None,
    )
