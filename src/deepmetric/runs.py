"""The pieces a run is built from: its dataset, model, loss, miner, augmentation and HDML,
each from the typed :class:`~deepmetric.config.RunConfig` (see :mod:`deepmetric.config` for
the YAML form). Names of losses and miners are checked against what the packages export, and
their keyword arguments against the classes' signatures, before anything is built.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from . import data as data_module
from . import losses as losses_module
from . import miners as miners_module
from ._config import check_kwargs
from .augment import RandomAffine
from .config import PROJECTIONS, ModelConfig, RunConfig, TrainConfig, load_config, save_config
from .data import ArrayDataset
from .hdml import HDML
from .models import EmbeddingNet, SmallConvNet

__all__ = [
    "PROJECTIONS",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "build_augment",
    "build_hdml",
    "build_loss",
    "build_miner",
    "build_model",
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


def build_model(config: ModelConfig, sample: Tensor) -> EmbeddingNet:
    """The embedder for inputs shaped like ``sample`` (``(C, H, W)`` images or ``(D,)``
    features; features get an MLP trunk)."""
    if sample.ndim == 3:
        trunk: nn.Module = SmallConvNet(sample.shape[0], config.channels, config.blocks)
        width = config.channels
    else:
        width = config.channels * 4
        trunk = nn.Sequential(nn.Flatten(), nn.Linear(sample.numel(), width), nn.ReLU())
    return EmbeddingNet(
        trunk,
        width,
        config.embedding_size,
        hidden=tuple(config.hidden),
        batch_norm=config.batch_norm,
        normalize=config.normalize,
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
