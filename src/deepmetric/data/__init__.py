"""Datasets: built-in (no download), the user's own, the standard benchmarks, and class-disjoint
splits.

Two kinds of dataset:

* :class:`ArrayDataset` (:mod:`deepmetric.data.memory`) holds every sample in one tensor: the
  built-in :func:`load_digits`, :func:`load_omniglot` and :func:`load_omniglot_runs`, and small
  user data decoded up front (:func:`load_image_folder`, :func:`load_image_csv`,
  :func:`load_arrays`). Samples are ``(x, label)``.
* :class:`ImageDataset` (:mod:`deepmetric.data.images`) holds paths and labels and decodes each
  image when asked, in ``DataLoader`` worker processes, through a transform of
  :mod:`deepmetric.transforms`: photographs, and datasets larger than memory. Readers list files
  without decoding them: :func:`image_folder`, :func:`image_csv`, and the benchmarks
  :func:`cub200`, :func:`cars196`, :func:`stanford_online_products` and :func:`inshop`
  (:mod:`deepmetric.data.standard`); :func:`open_dataset` parses ``KIND:PATH`` specs. Samples are
  ``(x, label, index)`` with ``x = None`` for an unreadable file; :func:`collate_samples` batches
  both kinds and reports the skipped indices.

Evaluation is on classes never seen in training: :func:`split_by_class` splits *classes*, not
samples, into train / validation / test; :func:`trainable_classes` names the classes with enough
images for P×K batches.
"""

from .images import (
    DECODE_ERRORS,
    IMAGE_SUFFIXES,
    ImageDataset,
    check_files_exist,
    collate_samples,
    decode_image,
    image_csv,
    image_folder,
)
from .memory import (
    ArrayDataset,
    OneShotRun,
    load_arrays,
    load_digits,
    load_image_csv,
    load_image_folder,
    load_omniglot,
    load_omniglot_runs,
)
from .spec import SPEC_FORMS, open_dataset
from .splits import ClassSplit, split_by_class, trainable_classes
from .standard import cars196, cub200, inshop, stanford_online_products

__all__ = [
    "DECODE_ERRORS",
    "IMAGE_SUFFIXES",
    "SPEC_FORMS",
    "ArrayDataset",
    "ClassSplit",
    "ImageDataset",
    "OneShotRun",
    "cars196",
    "check_files_exist",
    "collate_samples",
    "cub200",
    "decode_image",
    "image_csv",
    "image_folder",
    "inshop",
    "load_arrays",
    "load_digits",
    "load_image_csv",
    "load_image_folder",
    "load_omniglot",
    "load_omniglot_runs",
    "open_dataset",
    "split_by_class",
    "stanford_online_products",
    "trainable_classes",
]
