"""``KIND:PATH`` dataset specs, as the command line takes them, -> an :class:`ImageDataset`."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .images import ImageDataset, image_csv, image_folder
from .standard import cars196, cub200, inshop, stanford_online_products

SPEC_FORMS = {
    "folder": "folder:PATH (PATH/<class>/<image>)",
    "csv": "csv:FILE (path,label[,split,is_query,is_gallery] rows)",
    "cub": "cub:PATH (CUB-200-2011)",
    "cars196": "cars196:PATH (folder of cars_annos.mat)",
    "sop": "sop:PATH (Stanford Online Products)",
    "inshop": "inshop:PATH (In-Shop Clothes Retrieval)",
}


def open_dataset(
    spec: str,
    *,
    split: str | None = None,
    transform: Callable[..., Tensor] | None = None,
    mode: str = "RGB",
) -> ImageDataset:
    """Open ``spec``, one of ``folder:PATH``, ``csv:PATH``, ``cub:PATH``, ``cars196:PATH``,
    ``sop:PATH`` or ``inshop:PATH``, lazily (files listed, not decoded).

    ``split``: for ``csv`` the rows of that split (``train``/``val``/``test``; None keeps all);
    for the benchmarks the split of their own convention, ``"train"`` when None (``test``;
    In-Shop also ``query``, ``gallery``); a folder has no splits (use
    :func:`~deepmetric.data.split_by_class`). The built-in ``digits``/``omniglot`` and NumPy
    arrays are in-memory datasets: see :func:`deepmetric.data.load_omniglot` and friends.
    """
    kind, sep, path = spec.partition(":")
    if not sep or not path or kind not in SPEC_FORMS:
        raise ValueError(
            f"unknown dataset {spec!r}: expected one of {'; '.join(SPEC_FORMS.values())}"
        )
    if kind == "folder":
        if split is not None:
            raise ValueError(
                f"a folder has no splits (got split={split!r}): split its classes with "
                f"split_by_class, or list the images in a CSV with a split column"
            )
        return image_folder(path, transform=transform, mode=mode)
    if kind == "csv":
        return image_csv(path, split=split, transform=transform, mode=mode)
    readers = {
        "cub": cub200,
        "cars196": cars196,
        "sop": stanford_online_products,
        "inshop": inshop,
    }
    return readers[kind](path, split or "train", transform=transform, mode=mode)
