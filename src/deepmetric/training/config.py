""":class:`TrainConfig`: every option of a training run, checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

AMP_MODES = ("auto", "none", "bf16", "fp16")


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
        p, k: classes per batch and samples per class (batch size ``p * k``).
        lr: learning rate of the model (AdamW).
        loss_lr: learning rate of the loss's own parameters (proxies, class weights).
        weight_decay: AdamW weight decay of the model.
        scheduler: ``"cosine"`` (cosine decay to 0 over the run, after ``warmup_epochs`` of
            linear warm-up), ``"step"`` (x0.1 at 2/3 of the run) or ``"none"``.
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
        embed_batch_size: batch size for embedding the validation data.
        progress: show tqdm progress bars.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` for the
            process, so that the same seed gives the same weights (multi-threaded CPU
            ``index_add`` and several CUDA kernels otherwise sum in a varying order); switch off
            for the last few percent of speed. (Its filling of new tensors with NaN, a
            debugging aid, is switched off: ``torch.utils.deterministic``.)
        tensorboard: also write the per-epoch metrics to ``run_dir/tensorboard`` when the
            ``tensorboard`` package is installed (silently skipped when it is not).
        num_workers: ``DataLoader`` worker processes that read (and, for image datasets,
            decode and transform) the training and validation samples; 0 reads them in the
            training process.
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
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    grad_clip: float | None = None
    eval_every: int = 1
    metric: str = "mean_average_precision_at_r"
    patience: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    embed_batch_size: int = 512
    progress: bool = True
    deterministic: bool = True
    tensorboard: bool = True
    num_workers: int = 0
    persistent_workers: bool = True
    pin_memory: bool | str = "auto"
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
        if self.lr <= 0 or self.loss_lr <= 0:
            raise ValueError("lr and loss_lr must be > 0")
        if self.scheduler not in ("cosine", "step", "none"):
            raise ValueError(f"scheduler must be cosine, step or none, got {self.scheduler!r}")
        if self.warmup_epochs != 0 and not 0 < self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
        self._check_amp()
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

    def _check_amp(self) -> None:
        if self.amp is True or self.amp is False:  # the boolean of older configs
            self.amp = "auto" if self.amp else "none"
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.amp == "fp16" and self.device == "cpu":
            raise ValueError("amp: fp16 needs CUDA; on the CPU use amp: bf16 (or none)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**values)
