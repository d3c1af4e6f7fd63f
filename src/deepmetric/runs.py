"""Run configuration: what a ``deepmetric train`` run is made of, read from YAML and flags, and
the pieces it builds (data, model, loss, miner).

A config file names every part; any key left out takes its default::

    dataset: omniglot          # omniglot | digits | folder:PATH | csv:PATH | arrays:PATH
    image_size: 28
    test_classes: 0.2          # held-out classes for the final evaluation
    val_classes: 0.1           # classes that choose the best checkpoint
    rotations: true            # rotated copies (90/180/270°) as extra training classes
    augment: null              # random affine distortions of training images: a mapping of
                               # deepmetric.augment.RandomAffine's arguments ({} = defaults)
    test_time_augment: 0       # also score the trained network on the mean embedding of each
                               # image and this many distorted copies (needs augment)
    model: {channels: 64, embedding_size: 128}
    loss: {name: TripletMarginLoss, margin: 0.1}
    miner: {name: MultiSimilarityMiner, epsilon: 0.1}
    train: {epochs: 10, p: 32, k: 4, lr: 0.001}
    hdml: false                # hardness-aware synthetic negatives (Zheng et al., 2019)
    hdml_options: {}           # keyword arguments of deepmetric.hdml.HDML, e.g. {alpha: 1.0}
    projection: pca            # the report's 2-D embedding map: pca | umap (needs umap-learn)
    out: runs/omniglot

Unknown keys are errors that name the key.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from . import data as data_module
from . import losses as losses_module
from . import miners as miners_module
from .augment import RandomAffine
from .data import ArrayDataset
from .hdml import HDML
from .models import EmbeddingNet, SmallConvNet
from .training import TrainConfig


@dataclass
class ModelConfig:
    """The embedder: :class:`~deepmetric.models.SmallConvNet` trunk + embedding head."""

    channels: int = 64
    blocks: int = 4
    embedding_size: int = 128
    hidden: list[int] = field(default_factory=list)
    batch_norm: bool = False
    normalize: bool = True


#: Methods of the report's 2-D embedding map (see :func:`deepmetric.report.project_2d`).
PROJECTIONS = ("pca", "umap")


@dataclass
class RunConfig:
    """Everything a training run needs; see the module docstring for the YAML form."""

    dataset: str = "omniglot"
    image_size: int = 28
    test_classes: float = 0.2
    val_classes: float = 0.1
    rotations: bool = True
    augment: dict[str, float] | None = None
    test_time_augment: int = 0
    split_seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: dict[str, Any] = field(
        default_factory=lambda: {"name": "TripletMarginLoss", "margin": 0.1}
    )
    miner: dict[str, Any] | None = field(
        default_factory=lambda: {"name": "MultiSimilarityMiner", "epsilon": 0.1}
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    hdml: bool = False
    hdml_options: dict[str, Any] = field(default_factory=dict)
    projection: str = "pca"
    out: str = "runs/train"

    def __post_init__(self) -> None:
        copies = self.test_time_augment
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
            raise ValueError(f"config key 'test_time_augment' must be an int >= 0, got {copies!r}")
        if copies and self.augment is None:
            raise ValueError("config key 'test_time_augment' needs the distortions of 'augment'")
        if self.projection not in PROJECTIONS:
            raise ValueError(
                f"config key 'projection' must be one of {', '.join(PROJECTIONS)}, "
                f"got {self.projection!r}"
            )

    def check_optional_packages(self) -> None:
        """``ValueError`` if the run asks for an optional package that is not installed
        (``projection: umap`` needs umap-learn). Called when a run starts, before training,
        and not when a config is loaded: a finished run's folder stays usable without it."""
        if self.projection == "umap" and importlib.util.find_spec("umap") is None:
            raise ValueError(
                "config key 'projection' is 'umap' but the umap-learn package is not "
                "installed: pip install umap-learn, or use projection: pca"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build and validate; a ``ValueError`` names any unknown or malformed key."""
        if not isinstance(values, dict):
            raise ValueError("the config must be a mapping of keys to values")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        kwargs = dict(values)
        if "model" in kwargs:
            kwargs["model"] = _sub_config(ModelConfig, kwargs["model"], "model")
        if "train" in kwargs:
            train = kwargs["train"]
            if not isinstance(train, dict):
                raise ValueError("config key 'train' must be a mapping")
            try:
                kwargs["train"] = TrainConfig.from_dict(train)
            except (TypeError, ValueError) as error:
                raise ValueError(f"config key 'train': {error}") from error
        for key in ("loss", "miner"):
            spec = kwargs.get(key)
            if spec is not None and (not isinstance(spec, dict) or "name" not in spec):
                raise ValueError(f"config key '{key}' must be a mapping with a 'name'")
        augment = kwargs.get("augment")
        if augment is not None:
            if not isinstance(augment, dict):
                raise ValueError("config key 'augment' must be a mapping (or null for none)")
            build_augment(augment)  # names a bad key now, not after loading the data
        if not isinstance(kwargs.get("hdml", False), bool):
            raise ValueError("config key 'hdml' must be true or false")
        if kwargs.get("hdml_options") is None:
            kwargs["hdml_options"] = {}
        if not isinstance(kwargs["hdml_options"], dict):
            raise ValueError("config key 'hdml_options' must be a mapping")
        config = cls(**kwargs)
        for key, kind in (("image_size", int), ("test_classes", float), ("val_classes", float)):
            if not isinstance(getattr(config, key), (int, float)) or isinstance(
                getattr(config, key), bool
            ):
                raise ValueError(f"config key '{key}' must be a number ({kind.__name__})")
        return config


def _sub_config(cls: type, values: Any, name: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config key '{name}' must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in '{name}': {', '.join(unknown)}")
    return cls(**values)


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run config (``ValueError`` if missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    return RunConfig.from_dict(values)


def save_config(config: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


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


def _construct(module: Any, spec: dict[str, Any], what: str, extra: dict[str, Any]) -> Any:
    spec = dict(spec)
    name = spec.pop("name")
    names = getattr(module, "__all__", [])
    if name not in names or name.startswith("Base"):
        raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(sorted(names))}")
    cls = getattr(module, name)
    if not inspect.isclass(cls):
        raise ValueError(f"{name!r} is not a {what} class")
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
