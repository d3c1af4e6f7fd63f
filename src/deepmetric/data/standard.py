"""The standard deep metric learning benchmarks, read from a local copy in their own layouts.

Nothing is downloaded: each reader takes the folder the dataset's archive unpacks to and lists
its images (no decoding) as an :class:`~deepmetric.data.ImageDataset`. Splits follow the
convention of the DML literature since Song et al. (2016, "Deep Metric Learning via Lifted
Structured Feature Embedding"): the classes are split in two halves, training on the first and
testing on the second (classes never seen in training).

* :func:`cub200` — CUB-200-2011 (Wah et al., 2011): classes 1-100 train, 101-200 test.
* :func:`cars196` — Cars196 (Krause et al., 2013), from ``cars_annos.mat``: classes 1-98 train,
  99-196 test.
* :func:`stanford_online_products` — SOP (Song et al., 2016): its ``Ebay_train.txt`` and
  ``Ebay_test.txt`` lists (11,318 / 11,316 products).
* :func:`inshop` — In-Shop Clothes Retrieval (Liu et al., 2016, DeepFashion): its
  ``list_eval_partition.txt`` (train / query / gallery).

Labels are numbered from 0 over the classes of the chosen split, in the order of the dataset's
own class ids; ``class_names`` keeps the dataset's names (or ids) for each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from torch import Tensor

from .images import ImageDataset, check_files_exist

Transform = Callable[..., Tensor]
Key = TypeVar("Key", int, str)


def _find(root: str | Path, marker: str, nested: Sequence[str]) -> Path:
    """The folder holding ``marker``: ``root`` itself or one of its ``nested`` sub-folders (the
    folder an archive unpacks to)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder not found: {root}")
    for folder in (root, *(root / n for n in nested)):
        if (folder / marker).is_file():
            return folder
    raise ValueError(f"{root} does not hold {marker}: point to the unpacked dataset's folder")


def _check_split(split: str, accepted: Sequence[str], name: str) -> None:
    if split not in accepted:
        raise ValueError(f"{name} split must be one of {', '.join(accepted)}, got {split!r}")


def _read_rows(path: Path, fields: int, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of at least ``fields`` fields, after ``skip`` header lines."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if number <= skip or not line.strip():
                continue
            parts = line.split()
            if len(parts) < fields:
                raise ValueError(f"{path} line {number}: expected {fields} fields, got {line!r}")
            rows.append(parts)
    return rows


def _dataset(
    paths: list[Path],
    class_keys: list[Key],
    names: dict[Key, str],
    transform: Transform | None,
    mode: str,
    source: Path,
    **marks: np.ndarray,
) -> ImageDataset:
    """Number the classes present in ``class_keys`` from 0 in sorted order of their keys."""
    if not paths:
        raise ValueError(f"{source} lists no images for this split")
    check_files_exist(paths, source)
    keys = sorted(set(class_keys))
    index = {key: i for i, key in enumerate(keys)}
    class_names = [names.get(key, str(key)) for key in keys]
    labels = [index[key] for key in class_keys]
    return ImageDataset(paths, labels, class_names, transform=transform, mode=mode, **marks)


def cub200(
    root: str | Path,
    split: str = "train",
    *,
    transform: Transform | None = None,
    mode: str = "RGB",
) -> ImageDataset:
    """CUB-200-2011 from the folder ``CUB_200_2011`` (or its parent).

    Layout: ``images.txt`` (``<image id> <path under images/>``), ``image_class_labels.txt``
    (``<image id> <class id>``), ``classes.txt`` (``<class id> <name>``, e.g.
    ``001.Black_footed_Albatross``) and ``images/<class>/<image>.jpg``. ``split="train"``: classes
    1-100 (5,864 images); ``"test"``: classes 101-200 (5,924 images). The dataset's own
    ``train_test_split.txt`` splits images, not classes, and is not used.
    """
    _check_split(split, ("train", "test"), "CUB-200-2011")
    folder = _find(root, "images.txt", ["CUB_200_2011"])
    images = {int(row[0]): row[1] for row in _read_rows(folder / "images.txt", 2)}
    classes = {int(row[0]): int(row[1]) for row in _read_rows(folder / "image_class_labels.txt", 2)}
    names = {int(row[0]): row[1] for row in _read_rows(folder / "classes.txt", 2)}
    wanted = range(1, 101) if split == "train" else range(101, 201)
    paths: list[Path] = []
    keys: list[int] = []
    for image_id in sorted(images):
        if image_id not in classes:
            raise ValueError(f"{folder}/image_class_labels.txt has no class for image {image_id}")
        if classes[image_id] in wanted:
            paths.append(folder / "images" / images[image_id])
            keys.append(classes[image_id])
    return _dataset(paths, keys, names, transform, mode, folder / "images.txt")


def cars196(
    root: str | Path,
    split: str = "train",
    *,
    transform: Transform | None = None,
    mode: str = "RGB",
) -> ImageDataset:
    """Cars196 (Stanford Cars) from the folder holding ``cars_annos.mat`` and ``car_ims/``.

    ``cars_annos.mat`` (read with SciPy) holds ``annotations``, a struct array with one element
    per image (``relative_im_path`` such as ``car_ims/000001.jpg``, ``class`` 1-196, bounding box,
    and the classification benchmark's ``test`` flag, not used here), and ``class_names``.
    ``split="train"``: classes 1-98 (8,054 images); ``"test"``: classes 99-196 (8,131 images).
    The Kaggle re-packaging (``cars_train/``, ``devkit/cars_train_annos.mat``) is not this layout.
    """
    _check_split(split, ("train", "test"), "Cars196")
    folder = _find(root, "cars_annos.mat", ["cars196", "CARS_196"])
    try:
        from scipy.io import loadmat
    except ImportError as error:  # scipy comes with scikit-learn, a dependency
        raise ValueError("reading cars_annos.mat needs scipy (pip install scipy)") from error
    mat = loadmat(folder / "cars_annos.mat", squeeze_me=True)
    if "annotations" not in mat:
        raise ValueError(f"{folder / 'cars_annos.mat'} holds no 'annotations'")
    annotations = np.atleast_1d(mat["annotations"])
    fields = annotations.dtype.names or ()
    if "relative_im_path" not in fields or "class" not in fields:
        raise ValueError(
            f"{folder / 'cars_annos.mat'} annotations lack relative_im_path/class (has {fields})"
        )
    raw_names = np.atleast_1d(mat.get("class_names", np.array([])))
    names = {i + 1: str(n) for i, n in enumerate(raw_names)}
    wanted = range(1, 99) if split == "train" else range(99, 197)
    paths: list[Path] = []
    keys: list[int] = []
    for annotation in annotations:
        class_id = int(annotation["class"])
        if class_id in wanted:
            paths.append(folder / str(annotation["relative_im_path"]))
            keys.append(class_id)
    return _dataset(paths, keys, names, transform, mode, folder / "cars_annos.mat")


def stanford_online_products(
    root: str | Path,
    split: str = "train",
    *,
    transform: Transform | None = None,
    mode: str = "RGB",
) -> ImageDataset:
    """Stanford Online Products from the folder ``Stanford_Online_Products`` (or its parent).

    Layout: ``Ebay_train.txt`` and ``Ebay_test.txt``, each a header line ``image_id class_id
    super_class_id path`` and one line per image (``path`` such as
    ``bicycle_final/111085122871_0.JPG``, relative to the folder). ``split="train"``:
    ``Ebay_train.txt`` (59,551 images of 11,318 products); ``"test"``: ``Ebay_test.txt``
    (60,502 images of 11,316 products). Class names are the product ids (``class_id``).
    """
    _check_split(split, ("train", "test"), "Stanford Online Products")
    listing = f"Ebay_{split}.txt"
    folder = _find(root, listing, ["Stanford_Online_Products"])
    rows = _read_rows(folder / listing, 4, skip=1)
    paths = [folder / row[3] for row in rows]
    keys = [int(row[1]) for row in rows]
    return _dataset(paths, keys, {}, transform, mode, folder / listing)


INSHOP_SPLITS = ("train", "query", "gallery", "test")


def inshop(
    root: str | Path,
    split: str = "train",
    *,
    transform: Transform | None = None,
    mode: str = "RGB",
) -> ImageDataset:
    """In-Shop Clothes Retrieval from its benchmark folder.

    Layout: ``Eval/list_eval_partition.txt`` (or at the top): a first line with the number of
    images, a header line ``image_name item_id evaluation_status``, then one line per image such
    as ``img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train``; image paths are
    relative to the folder or to its ``Img/`` sub-folder. ``split`` is ``"train"`` (25,882 images
    of 3,997 items), ``"query"`` (14,218) or ``"gallery"`` (12,612), or ``"test"`` for query and
    gallery together with ``is_query``/``is_gallery`` marks. Query, gallery and test number their
    classes over the items of query and gallery together, so their labels agree.
    """
    _check_split(split, INSHOP_SPLITS, "In-Shop")
    folder = Path(root)
    listing = _find(root, "list_eval_partition.txt", ["Eval"]) / "list_eval_partition.txt"
    rows = _read_rows(listing, 3, skip=2)
    with listing.open(encoding="utf-8") as handle:
        first = handle.readline().strip()
    if first.isdigit() and int(first) != len(rows):
        raise ValueError(f"{listing} announces {first} images but lists {len(rows)}")
    statuses = {row[2] for row in rows}
    unknown = statuses - {"train", "query", "gallery"}
    if unknown:
        raise ValueError(f"{listing}: unknown evaluation status(es) {sorted(unknown)}")
    image_root = folder
    if rows and not (folder / rows[0][0]).is_file() and (folder / "Img" / rows[0][0]).is_file():
        image_root = folder / "Img"
    group = {"train"} if split == "train" else {"query", "gallery"}
    class_keys = sorted({row[1] for row in rows if row[2] in group})
    wanted = group if split in ("train", "test") else {split}
    picked = [row for row in rows if row[2] in wanted]
    paths = [image_root / row[0] for row in picked]
    keys = [row[1] for row in picked]
    marks = {}
    if split != "train":
        marks = {
            "is_query": np.array([row[2] == "query" for row in picked]),
            "is_gallery": np.array([row[2] == "gallery" for row in picked]),
        }
    # Number the classes over the whole group, so query and gallery labels agree.
    index = {key: i for i, key in enumerate(class_keys)}
    if not paths:
        raise ValueError(f"{listing} lists no images for split {split!r}")
    check_files_exist(paths, listing)
    return ImageDataset(
        paths,
        [index[key] for key in keys],
        class_keys,
        transform=transform,
        mode=mode,
        **marks,
    )
