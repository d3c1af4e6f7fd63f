"""The pieces a run is built from: its dataset, model, loss, miner, augmentation and HDML,
each from the typed :class:`~deepmetric.config.RunConfig` (see :mod:`deepmetric.config` for
the YAML form). Names of losses and miners are checked against what the packages export, and
their keyword arguments against the classes' signatures, before anything is built.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import data as data_module
from . import losses as losses_module
from . import miners as miners_module
from ._config import check_kwargs
from .augment import RandomAffine
from .config import (
    PHOTO_AUGMENT,
    PROJECTIONS,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_config,
    save_config,
)
from .data import ArrayDataset
from .hdml import HDML
from .models import EmbeddingNet, build_embedder
from .transforms import EvalTransform, TrainTransform, Transform

__all__ = [
    "PROJECTIONS",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "build_augment",
    "build_hdml",
    "build_loss",
    "build_miner",
    "build_data",
    "build_model",
    "check_batch_shape",
    "dataset_kind",
    "choices",
    "load_config",
    "load_dataset",
    "save_config",
    "with_rotations",
]


# -- building the pieces --------------------------------------------------------------------------


def load_dataset(spec: str, image_size: int = 28) -> ArrayDataset:
    """``omniglot``, ``digits``, ``folder:PATH``, ``csv:PATH`` or ``arrays:PATH``."""
    if spec == "omniglot":
        return data_module.load_omniglot(size=image_size)
    if spec == "digits":
        return data_module.load_digits()
    kind, _, path = spec.partition(":")
    if kind == "folder" and path:
        return data_module.load_image_folder(path, size=image_size)
    if kind == "csv" and path:
        return data_module.load_image_csv(path, size=image_size)
    if kind == "arrays" and path:
        return data_module.load_arrays(path)
    raise ValueError(
        f"unknown dataset {spec!r}: use omniglot, digits, folder:PATH, csv:PATH or arrays:PATH"
    )


def with_rotations(dataset: ArrayDataset) -> ArrayDataset:
    """Add the 90°, 180° and 270° rotations of every image as new classes (Santoro et al.,
    2016; Vinyals et al., 2016): four times the classes for a character set."""
    n_classes = len(dataset.class_names)
    xs, ys, names = [dataset.x], [dataset.labels], list(dataset.class_names)
    for quarter in (1, 2, 3):
        xs.append(torch.rot90(dataset.x, quarter, dims=(-2, -1)))
        ys.append(dataset.labels + quarter * n_classes)
        names += [f"{n}@rot{90 * quarter}" for n in dataset.class_names]
    return ArrayDataset(torch.cat(xs), torch.cat(ys), names)


def build_augment(options: dict[str, float] | None) -> RandomAffine | None:
    """:class:`~deepmetric.augment.RandomAffine` with the keyword arguments ``options`` (None:
    no augmentation); ``ValueError`` naming a bad key."""
    if options is None:
        return None
    accepted = inspect.signature(RandomAffine).parameters
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise ValueError(
            f"unknown key(s) in 'augment': {', '.join(unknown)} (accepted: {', '.join(accepted)})"
        )
    try:
        return RandomAffine(**{k: float(v) for k, v in options.items()})
    except (TypeError, ValueError) as error:
        raise ValueError(f"config key 'augment': {error}") from error


def build_model(config: ModelConfig, sample: Tensor | Sequence[int]) -> EmbeddingNet:
    """The embedder for inputs shaped like ``sample`` (a sample, or its shape: ``(C, H, W)``
    images or ``(D,)`` features; features get an MLP trunk).

    Images go through :func:`deepmetric.models.build_embedder` with the config's trunk; the
    built-in ``small_cnn`` takes the images' channels.
    """
    shape = tuple(sample.shape) if isinstance(sample, Tensor) else tuple(int(n) for n in sample)
    if len(shape) != 3:
        width = config.channels * 4
        features = 1
        for n in shape:
            features *= n
        trunk = nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU())
        return EmbeddingNet(
            trunk,
            width,
            config.embedding_size,
            hidden=tuple(config.hidden),
            batch_norm=config.batch_norm,
            normalize=config.normalize,
        )
    options = dict(config.options)
    if config.trunk == "small_cnn":
        options = {"channels": config.channels, "blocks": config.blocks, **options}
    return build_embedder(
        config.trunk,
        weights=config.weights,
        key_map=config.key_map,
        embedding_size=config.embedding_size,
        hidden=tuple(config.hidden),
        batch_norm=config.batch_norm,
        normalize=config.normalize,
        in_channels=shape[0],
        **options,
    )


def model_channels(config: RunConfig) -> int:
    """Channels of the model's input: ``model.in_channels``, else grey for the built-in
    character sets and RGB for photos (and for any pretrained trunk)."""
    if config.model.in_channels is not None:
        return config.model.in_channels
    if dataset_kind(config.dataset) == "images" or config.model.trunk != "small_cnn":
        return 3
    return 1


#: Input side of ``small_cnn`` on photos when ``image_size`` is null: small enough to train
#: from scratch on two CPU cores, large enough to keep a photo's shapes and colours.
PHOTO_SIZE_SMALL_CNN = 64


@dataclass
class RunData:
    """The splits of a run's dataset, ready for training and scoring.

    Attributes:
        train: the training classes (with rotated copies as new classes where asked), with the
            random training transform for photos.
        val: classes that choose the best checkpoint (None: none held out).
        test: classes held out for the final scores (empty: none).
        input_shape: one model input, ``(C, H, W)`` or ``(D,)``.
        source_classes: the training classes before rotated copies were added.
        one_shot_runs: Omniglot's 20 official one-shot runs (only for ``omniglot``).
        lazy: images decoded from files on demand (photos) rather than held in memory.
    """

    train: Any
    val: Any | None
    test: Any
    input_shape: tuple[int, ...]
    source_classes: int
    one_shot_runs: list[data_module.OneShotRun]
    lazy: bool


def dataset_kind(spec: str) -> str:
    """``"builtin"`` (omniglot, digits), ``"arrays"`` (a NumPy file, in memory) or ``"images"``
    (files decoded on demand: folder, csv and the standard benchmarks)."""
    if spec in ("omniglot", "digits"):
        return "builtin"
    kind, sep, path = spec.partition(":")
    if kind == "arrays" and sep and path:
        return "arrays"
    if sep and path and kind in data_module.SPEC_FORMS:
        return "images"
    forms = [
        "omniglot",
        "digits",
        "arrays:PATH (.npz with x and y)",
        *data_module.SPEC_FORMS.values(),
    ]
    raise ValueError(f"unknown dataset {spec!r}: use one of {'; '.join(forms)}")


def photo_transforms(
    config: RunConfig, model: EmbeddingNet
) -> tuple[Transform, Transform | None, int]:
    """``(evaluation transform, training transform or None, input side)`` for photos, from the
    model's own input spec (its normalisation) and ``image_size``."""
    spec = getattr(model, "input_spec", None)
    channels = model_channels(config)
    mean = tuple(spec.mean) if spec is not None else (0.0,) * channels
    std = tuple(spec.std) if spec is not None else (1.0,) * channels
    if config.image_size is not None:
        size = config.image_size
    elif config.model.trunk == "small_cnn" or spec is None:
        size = PHOTO_SIZE_SMALL_CNN
    else:
        size = spec.size
    evaluation = EvalTransform(size, resize=round(size / config.eval_crop), mean=mean, std=std)
    training = None
    if config.photo_augment is not None:
        options = {**PHOTO_AUGMENT, **config.photo_augment}
        training = TrainTransform(size, mean=mean, std=std, **options)
    return evaluation, training, size


def _split_images(config: RunConfig, mode: str) -> tuple[Any, Any | None, Any]:
    """Train / validation / test of a lazy image dataset: the benchmarks' own class split
    (validation classes drawn from their training classes), else :func:`split_by_class`."""
    kind = config.dataset.partition(":")[0]
    if kind in ("cub", "cars196", "sop", "inshop"):
        train = data_module.open_dataset(config.dataset, split="train", mode=mode)
        test = data_module.open_dataset(config.dataset, split="test", mode=mode)
        split = data_module.split_by_class(train.labels, 0, config.val_classes, config.split_seed)
        val = train.subset(split.val) if len(split.val) else None
        return train.subset(split.train), val, test
    dataset = data_module.open_dataset(config.dataset, mode=mode)
    split = data_module.split_by_class(
        dataset.labels, config.test_classes, config.val_classes, seed=config.split_seed
    )
    val = dataset.subset(split.val) if len(split.val) else None
    return dataset.subset(split.train), val, dataset.subset(split.test)


def build_data(config: RunConfig, model: EmbeddingNet | None = None) -> RunData:
    """The run's data: built-in and NumPy datasets in memory, photos as lazy image datasets
    whose transforms follow ``model``'s input spec (``ValueError`` for photos without a model).

    Classes with fewer than two images stay in the evaluation splits but are dropped from
    training (they have no positive pair), with a warning that names how many.
    """
    kind = dataset_kind(config.dataset)
    runs: list[data_module.OneShotRun] = []
    if kind == "images":
        if model is None:
            raise ValueError("photos need the model: its input spec sets size and normalisation")
        mode = "RGB" if model_channels(config) == 3 else "L"
        evaluation, training, size = photo_transforms(config, model)
        train, val, test = _split_images(config, mode)
        train = train.with_transform(training or evaluation)
        val = None if val is None else val.with_transform(evaluation)
        test = test.with_transform(evaluation)
        shape: tuple[int, ...] = (model_channels(config), size, size)
        lazy = True
    else:
        size = config.image_size or 28
        dataset = load_dataset(config.dataset, size)
        split = data_module.split_by_class(
            dataset.labels, config.test_classes, config.val_classes, seed=config.split_seed
        )
        train = dataset.subset(split.train)
        val = dataset.subset(split.val) if len(split.val) else None
        test = dataset.subset(split.test)
        shape = tuple(dataset.x.shape[1:])
        lazy = False
        if config.dataset == "omniglot":
            runs = data_module.load_omniglot_runs(size)
    train = _without_single_image_classes(train)
    source_classes = len(torch.unique(train.labels))
    if config.uses_rotations:
        if lazy or len(shape) != 3:
            raise ValueError(
                "rotations (rotated copies as new classes) are for in-memory character images "
                f"(omniglot, digits), not {config.dataset}: set rotations: false"
            )
        train = with_rotations(train)
    return RunData(train, val, test, shape, source_classes, runs, lazy)


def _without_single_image_classes(dataset: Any) -> Any:
    keep = data_module.trainable_classes(dataset.labels, 2)
    dropped = len(torch.unique(dataset.labels)) - len(keep)
    if dropped == 0:
        return dataset
    warnings.warn(
        f"{dropped} training class(es) have a single image: no positive pair, so they are not "
        "used for training (classes held out for evaluation keep theirs)",
        stacklevel=3,
    )
    rows = torch.isin(dataset.labels, torch.as_tensor(keep)).nonzero().flatten()
    return dataset.subset(rows)


def check_batch_shape(labels: Tensor, p: int, k: int) -> None:
    """``ValueError`` before training when a P×K batch cannot be drawn sensibly: fewer training
    classes than ``p``, or ``k`` above the largest class (every sample would repeat)."""
    classes, counts = torch.unique(labels, return_counts=True)
    if len(classes) < p:
        raise ValueError(
            f"p={p} classes per batch, but the training split has {len(classes)} classes: "
            "lower --p, or hold out fewer classes (--test-classes, --val-classes)"
        )
    largest = int(counts.max())
    if k > largest:
        raise ValueError(
            f"k={k} samples per class, but the largest training class has {largest}: "
            f"lower --k (at most {largest})"
        )


def choices(module: Any) -> list[str]:
    """The class names a config may give for a loss (``module`` = :mod:`deepmetric.losses`)
    or a miner: exported, concrete ``nn.Module`` classes, not the abstract bases."""
    names = []
    for name in getattr(module, "__all__", []):
        value = getattr(module, name, None)
        if (
            inspect.isclass(value)
            and issubclass(value, nn.Module)
            and not name.startswith("Base")
            and not inspect.isabstract(value)
        ):
            names.append(name)
    return sorted(names)


def _construct(module: Any, spec: dict[str, Any], what: str, extra: dict[str, Any]) -> Any:
    spec = dict(spec)
    name = spec.pop("name")
    names = choices(module)
    if name not in names:
        raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(names)}")
    cls = getattr(module, name)
    check_kwargs(cls, spec, what)
    accepted = inspect.signature(cls).parameters
    for key, value in extra.items():  # num_classes / embedding_size for proxy losses
        if key in accepted and key not in spec:
            spec[key] = value
    try:
        return cls(**spec)
    except TypeError as error:
        raise ValueError(f"bad arguments for {what} {name}: {error}") from error


def build_loss(spec: dict[str, Any], num_classes: int, embedding_size: int) -> nn.Module:
    """A loss of :mod:`deepmetric.losses` by class name, with its keyword arguments."""
    extra = {"num_classes": num_classes, "embedding_size": embedding_size}
    loss: nn.Module = _construct(losses_module, spec, "loss", extra)
    return loss


def build_miner(spec: dict[str, Any] | None) -> nn.Module | None:
    """A miner of :mod:`deepmetric.miners` by class name (None: no miner)."""
    if spec is None:
        return None
    miner: nn.Module = _construct(miners_module, spec, "miner", {})
    return miner


def build_hdml(
    model: EmbeddingNet, loss: nn.Module, num_classes: int, options: dict[str, Any]
) -> HDML:
    """:class:`~deepmetric.hdml.HDML` around ``loss`` for ``model`` (its trunk width, embedding
    width and head), with the keyword arguments ``options`` (``ValueError`` naming a bad one)."""
    accepted = inspect.signature(HDML).parameters
    fixed = ("head", "metric_loss", "feature_size", "embedding_size", "num_classes")
    unknown = sorted(k for k in options if k not in accepted or k in fixed)
    if unknown:
        raise ValueError(f"unknown key(s) in 'hdml_options': {', '.join(unknown)}")
    try:
        return HDML(
            model.embed_features,
            loss,
            feature_size=model.trunk_features,
            embedding_size=model.embedding_size,
            num_classes=num_classes,
            **options,
        )
    except TypeError as error:
        raise ValueError(f"bad 'hdml_options': {error}") from error
