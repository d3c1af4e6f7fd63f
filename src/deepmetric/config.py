"""What a ``deepmetric train`` run is made of: the run config read from YAML and flags.

This module imports neither torch nor any model code, so that ``deepmetric --help`` and config
checks are instant. Every key is typed; a wrong type, an unknown key or a value out of range is
a ``ValueError`` that names the key and what it accepts, raised before anything runs or is
written (see :mod:`deepmetric._config`).

A config file names every part; any key left out takes its default::

    dataset: omniglot          # omniglot | digits | arrays:PATH (in memory) | folder:PATH |
                               # csv:PATH | cub:PATH | cars196:PATH | sop:PATH | inshop:PATH
    image_size: null           # input side; null: 28 for omniglot, 8 for digits, 64 for photos
                               # with small_cnn, the trunk's own size (224) for pretrained ones
    test_classes: 0.2          # held-out classes for the final evaluation
    val_classes: 0.1           # classes that choose the best checkpoint
    rotations: null            # rotated copies (90/180/270°) as extra training classes;
                               # null: only for omniglot
    augment: null              # random affine distortions of training images: a mapping of
                               # deepmetric.augment.RandomAffine's arguments ({} = defaults)
    photo_augment: {}          # photos: random resized crop, flip, colour jitter (keyword
                               # arguments of deepmetric.transforms.TrainTransform; keys left
                               # out take PHOTO_AUGMENT's values; null: no augmentation)
    eval_crop: 0.875           # photos: the evaluation's centre crop keeps this fraction of the
                               # resized shorter side (0.875 = 224 of 256, ImageNet's; 1.0 keeps
                               # the whole square, for photos already cropped to the subject)
    test_time_augment: 0       # also score the trained network on the mean embedding of each
                               # image and this many distorted copies (needs augment)
    model: {trunk: small_cnn, embedding_size: 128}   # or trunk: efficientnet_lite0, hf:DIR
    loss: {name: TripletMarginLoss, margin: 0.1}
    miner: {name: MultiSimilarityMiner, epsilon: 0.1}
    train: {epochs: 10, p: 32, k: 4, lr: 0.001}
    hdml: false                # hardness-aware synthetic negatives (Zheng et al., 2019)
    hdml_options: {}           # keyword arguments of deepmetric.hdml.HDML, e.g. {alpha: 1.0}
    projection: pca            # the report's 2-D embedding map: pca | umap (needs umap-learn)
    out: runs/omniglot
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ._config import build_dataclass
from .io import atomic_write_text

__all__ = [
    "METRIC_NAMES",
    "PROJECTIONS",
    "RETRIEVAL_METRICS",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "parse_yaml",
    "save_config",
]


AMP_MODES = ("auto", "none", "bf16", "fp16")

#: Learning-rate schedules (see :class:`TrainConfig`).
SCHEDULERS = ("auto", "cosine", "step", "none")

#: The most ``DataLoader`` workers ``num_workers: auto`` starts for images read from files.
AUTO_WORKERS = 4


def _check_int(name: str, value: object, minimum: int) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


@dataclass
class TrainConfig:
    """Every option of a training run (also the keys of a run's YAML config).

    Attributes:
        epochs: passes over the training data (one pass = ``len(PKSampler)`` batches).
        p: classes per batch (batch size ``p * k``).
        k: samples per class in a batch.
        lr: learning rate of the model (AdamW).
        loss_lr: learning rate of the loss's own parameters (proxies, class weights).
        weight_decay: AdamW weight decay of the model.
        scheduler: ``"cosine"`` (cosine decay to 0 over the run, after ``warmup_epochs`` of
            linear warm-up), ``"step"`` (x0.1 at 2/3 of the run), ``"none"`` (constant), or
            ``"auto"``: constant for images decoded from files (photos), cosine for data held
            in memory (Omniglot, digits, arrays). On photos a cosine decay to 0 halves the
            mean learning rate of a short run and lost to a plain loop on faces; constant won
            there and tied on two product sets (benchmarks/photo_defaults.py).
        warmup_epochs: linear warm-up length.
        grad_clip: clip the gradient norm of the model and loss parameters to this (None: no
            clipping).
        eval_every: evaluate on the validation split every this many epochs.
        metric: the validation metric that chooses the best checkpoint (larger is better).
        patience: stop after this many evaluations without improvement (None: never).
        checkpoint_every: also write ``last.pt`` every this many steps (None: per epoch only).
        seed: seeds the model's random numbers, the sampler and the augmentations.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:n]"``.
        amp: mixed precision (``torch.autocast``): ``"auto"`` (bfloat16 on CUDA where supported,
            else float16 with a gradient scaler; none on the CPU), ``"bf16"`` (also on the CPU),
            ``"fp16"`` (CUDA only, with a gradient scaler) or ``"none"``. ``true`` / ``false``
            (older configs) mean ``"auto"`` / ``"none"``.
        embed_batch_size: images per forward pass when embedding (validation, scores, index,
            search). Its activations, not the dataset, set the memory of these passes: the small
            CNN at 64 px holds about 1 MB per image per layer, so 512 photos took 0.7 GB more
            than the training steps.
        progress: show tqdm progress bars.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` for the
            process, so that the same seed gives the same weights (multi-threaded CPU
            ``index_add`` and several CUDA kernels otherwise sum in a varying order); switch off
            for the last few percent of speed. (Its filling of new tensors with NaN, a
            debugging aid, is switched off: ``torch.utils.deterministic``.)
        tensorboard: also write the per-epoch metrics to ``run_dir/tensorboard``; needs the
            ``tensorboard`` package (a warning says so when it is missing).
        num_workers: ``DataLoader`` worker processes that read (and, for image datasets,
            decode and transform) the training and evaluation samples; 0 reads them in the
            training process. ``"auto"``: for images read from files, one per CPU core, at most
            4 (decoding JPEGs in the training process would leave the
            network waiting); 0 for data held in memory, which needs no decoding.
        persistent_workers: keep the workers alive from one epoch to the next (no re-spawn);
            only used with ``num_workers > 0``.
        pin_memory: page-locked batches for faster copies to the GPU: ``"auto"`` (on CUDA),
            ``true`` or ``false``.
        prefetch_factor: batches each worker loads ahead (None: PyTorch's default, 2).
        backbone_lr: learning rate of ``model.trunk`` (a pretrained backbone is usually
            fine-tuned at a tenth of the head's rate or less); None: ``lr``. Needs a model
            with a ``trunk`` (as :class:`~deepmetric.models.EmbeddingNet`).
        freeze_backbone_epochs: the trunk's parameters get no updates during the first this
            many epochs (the head learns on fixed features first).
        freeze_bn: the trunk's BatchNorm layers stay in evaluation mode: their running
            statistics are never updated, and they normalise with them (their scale and shift
            are still trained). Small P×K batches give noisy batch statistics.
        channels_last: the model and its 4-D inputs in ``torch.channels_last`` memory format
            (faster convolutions on recent GPUs and with AMP).
        accumulate: split each P×K batch into this many micro-batches whose activations are
            never in memory together, with the gradient of the whole batch (gradient cache,
            Gao et al., 2021: see :func:`deepmetric.training.steps.cached_gradient_step`).
    """

    epochs: int = 10
    p: int = 32
    k: int = 4
    lr: float = 1e-3
    loss_lr: float = 1e-2
    weight_decay: float = 0.0
    scheduler: Literal["auto", "cosine", "step", "none"] = "auto"
    warmup_epochs: int = 0
    grad_clip: float | None = None
    eval_every: int = 1
    metric: str = "mean_average_precision_at_r"
    patience: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "none", "bf16", "fp16"] | bool = "auto"
    embed_batch_size: int = 128
    progress: bool = True
    deterministic: bool = True
    tensorboard: bool = False
    num_workers: int | Literal["auto"] = "auto"
    persistent_workers: bool = True
    pin_memory: bool | Literal["auto"] = "auto"
    prefetch_factor: int | None = None
    backbone_lr: float | None = None
    freeze_backbone_epochs: int = 0
    freeze_bn: bool = False
    channels_last: bool = False
    accumulate: int = 1

    def __post_init__(self) -> None:
        for name in ("epochs", "p", "k", "eval_every", "embed_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.p < 2:
            raise ValueError(f"p must be >= 2 (a batch needs negatives), got {self.p}")
        if self.lr <= 0 or self.loss_lr <= 0:
            raise ValueError("lr and loss_lr must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
        if self.warmup_epochs != 0 and not 0 < self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        for name in ("patience", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")
        if self.metric not in RETRIEVAL_METRICS:
            raise ValueError(
                f"metric must be one of {', '.join(RETRIEVAL_METRICS)}, got {self.metric!r}"
            )
        self._check_amp()
        if isinstance(self.num_workers, str) and self.num_workers != "auto":
            raise ValueError(
                f"num_workers must be an integer >= 0 or auto, got {self.num_workers!r}"
            )
        if self.num_workers != "auto":
            _check_int("num_workers", self.num_workers, 0)
        _check_bool("persistent_workers", self.persistent_workers)
        if self.pin_memory not in ("auto", True, False):
            raise ValueError(f"pin_memory must be auto, true or false, got {self.pin_memory!r}")
        if self.prefetch_factor is not None:
            _check_int("prefetch_factor", self.prefetch_factor, 1)
            if self.num_workers == 0:
                raise ValueError("prefetch_factor needs num_workers > 0 (workers prefetch)")
        if self.backbone_lr is not None:
            if isinstance(self.backbone_lr, bool) or not isinstance(self.backbone_lr, int | float):
                raise ValueError(f"backbone_lr must be a number, got {self.backbone_lr!r}")
            if not self.backbone_lr > 0:
                raise ValueError(f"backbone_lr must be > 0, got {self.backbone_lr}")
        _check_int("freeze_backbone_epochs", self.freeze_backbone_epochs, 0)
        if self.freeze_backbone_epochs > self.epochs:
            raise ValueError(
                f"freeze_backbone_epochs={self.freeze_backbone_epochs} is more than "
                f"epochs={self.epochs}: the backbone would never train"
            )
        _check_bool("freeze_bn", self.freeze_bn)
        _check_bool("channels_last", self.channels_last)
        _check_int("accumulate", self.accumulate, 1)
        if self.accumulate > self.p * self.k:
            raise ValueError(
                f"accumulate={self.accumulate} micro-batches is more than the batch's "
                f"p*k={self.p * self.k} samples"
            )
        device = self.device
        if device not in ("auto", "cpu") and not (
            device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())
        ):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")

    def _check_amp(self) -> None:
        if self.amp is True or self.amp is False:  # the boolean of older configs
            self.amp = "auto" if self.amp else "none"
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.amp == "fp16" and self.device == "cpu":
            raise ValueError("amp: fp16 needs CUDA; on the CPU use amp: bf16 (or none)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; a ``ValueError`` names an unknown or mistyped key."""
        config: TrainConfig = build_dataclass(cls, values, "train")
        return config


#: The retrieval metrics of validation and of the result table, by their one name (the
#: AccuracyCalculator's): ``precision_at_1`` is Recall@1.
RETRIEVAL_METRICS = (
    "precision_at_1",
    "recall_at_2",
    "recall_at_4",
    "recall_at_8",
    "r_precision",
    "mean_average_precision_at_r",
)


#: One display name per retrieval metric, in the result table, ``evaluate``, the report and
#: its curves (the keys are the AccuracyCalculator's, used by ``metrics.jsonl`` and
#: ``train.metric``).
METRIC_NAMES = {
    "precision_at_1": "Recall@1",
    "recall_at_2": "Recall@2",
    "recall_at_4": "Recall@4",
    "recall_at_8": "Recall@8",
    "r_precision": "R-precision",
    "mean_average_precision_at_r": "MAP@R",
}


@dataclass
class ModelConfig:
    """The embedder: a trunk (:func:`deepmetric.models.build_backbone`) + embedding head.

    Attributes:
        trunk: ``small_cnn`` (the built-in 4-block CNN, trained from scratch),
            ``efficientnet_lite0`` (ImageNet weights shipped in the ``efficientnet`` extra),
            ``hf:FOLDER`` (a Hugging Face ``transformers`` vision model saved in a local folder:
            DINOv2, ViT, CLIP, ConvNeXt, ResNet), ``torchvision:NAME`` / ``timm:NAME`` (their
            extras), or ``package.module:factory`` (your own ``nn.Module``).
        weights: a local ``.pth`` / ``.safetensors`` file of trunk weights (nothing is ever
            downloaded).
        key_map: prefix rewrites for a checkpoint saved by other code, e.g. ``{"module.": ""}``.
        in_channels: 1 (grey) or 3 (RGB); null: grey for the built-in character data, RGB for
            photos and pretrained trunks.
        options: further keyword arguments of the trunk (e.g. ``{pretrained: false}``).
        channels: width of ``small_cnn``.
        blocks: depth of ``small_cnn``.
        embedding_size: width of the embedding.
        hidden: widths of hidden layers of an MLP head.
        batch_norm: BatchNorm in the head.
        normalize: L2-normalise the embedding.
    """

    trunk: str = "small_cnn"
    weights: str | None = None
    key_map: dict[str, str] | None = None
    in_channels: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    channels: int = 64
    blocks: int = 4
    embedding_size: int = 128
    hidden: list[int] = field(default_factory=list)
    batch_norm: bool = False
    normalize: bool = True

    def __post_init__(self) -> None:
        for name in ("channels", "blocks", "embedding_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")
        if self.in_channels not in (None, 1, 3):
            raise ValueError(f"in_channels must be 1, 3 or null, got {self.in_channels}")
        if not self.trunk:
            raise ValueError("trunk must name a trunk, e.g. small_cnn or efficientnet_lite0")


#: The photo augmentation's settings that differ from :class:`~deepmetric.transforms.
#: TrainTransform`'s own; a run's ``photo_augment`` overrides them key by key. Crops of at
#: least half the photo: with the transform's (0.16, 1), the range of long ImageNet-style
#: schedules, a short run from scratch ended below a plain loop on resized photos
#: (benchmarks/photo_defaults.py: tuned on products, confirmed on faces).
PHOTO_AUGMENT: dict[str, Any] = {"scale": [0.5, 1.0]}

#: Methods of the report's 2-D embedding map (see :func:`deepmetric.report.project_2d`).
PROJECTIONS = ("pca", "umap")


@dataclass
class RunConfig:
    """Everything a training run needs; see the module docstring for the YAML form."""

    dataset: str = "omniglot"
    image_size: int | None = None
    test_classes: int | float = 0.2
    val_classes: int | float = 0.1
    rotations: bool | None = None
    augment: dict[str, float] | None = None
    photo_augment: dict[str, Any] | None = field(default_factory=dict)
    eval_crop: float = 0.875
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
    projection: Literal["pca", "umap"] = "pca"
    out: str = "runs/train"

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if not 0 < self.eval_crop <= 1:
            raise ValueError(f"eval_crop must lie in (0, 1], got {self.eval_crop}")
        if self.test_time_augment < 0:
            raise ValueError(f"test_time_augment must be an int >= 0, got {self.test_time_augment}")
        if self.test_time_augment and self.augment is None:
            raise ValueError("test_time_augment needs the distortions of 'augment'")
        for key in ("test_classes", "val_classes"):
            value = getattr(self, key)
            if not 0 <= value < 1 and not (value >= 1 and float(value).is_integer()):
                raise ValueError(
                    f"{key} must be a fraction of the classes in [0, 1) or a whole number of "
                    f"classes, got {value}"
                )
        if self.photo_augment is not None:
            from .transforms import TrainTransform

            try:
                TrainTransform(**{**PHOTO_AUGMENT, **self.photo_augment})
            except (TypeError, ValueError) as error:
                raise ValueError(f"photo_augment: {error}") from error
        if self.augment is not None:
            # the distortion's own checks name a bad key or value now, not after loading data
            # (imports torch, which a config without augmentation does not need)
            from .runs import build_augment

            build_augment(self.augment)
        for key in ("loss", "miner"):
            spec = getattr(self, key)
            if spec is not None and not isinstance(spec.get("name"), str):
                raise ValueError(f"'{key}' must be a mapping with a 'name' (a class name)")
        if not self.out:
            raise ValueError("out must name a folder")

    @property
    def uses_rotations(self) -> bool:
        """Rotated copies as extra classes: as configured, or (null) only for Omniglot, whose
        characters stay characters when rotated; photos of a face or a product do not."""
        return self.dataset == "omniglot" if self.rotations is None else self.rotations

    def check_optional_packages(self) -> None:
        """``ValueError`` if the run asks for an optional package that is not installed
        (``projection: umap`` needs umap-learn). Called when a run starts, before training,
        and not when a config is loaded: a finished run's folder stays usable without it."""
        if self.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError(
                "config key 'train.tensorboard' is true but the tensorboard package is not "
                "installed: pip install tensorboard, or set tensorboard: false (metrics.jsonl "
                "and the report hold the same curves)"
            )
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
        config: RunConfig = build_dataclass(cls, values, "")
        return config


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``1e-4`` is a number (PyYAML follows
    YAML 1.1, where an exponent needs a dot, and would read a learning rate as a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text -> plain values (``ValueError`` for malformed YAML); never runs code."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ValueError(f"not valid YAML: {error}") from error


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run config (``ValueError`` if missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        values = parse_yaml(path.read_text()) or {}
    except ValueError as error:
        raise ValueError(f"{path} is {error}") from error
    return RunConfig.from_dict(values)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write ``config`` as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
