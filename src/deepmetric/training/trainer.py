"""The :class:`Trainer` (see :mod:`deepmetric.training` for what a run does)."""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..config import RETRIEVAL_METRICS
from ..distributed import (
    DistributedLossWrapper,
    DistributedMinerWrapper,
    gather_rows,
    is_distributed,
    world_size,
)
from ..distributed.sync_batchnorm import convert_sync_batchnorm
from ..evaluation import AccuracyCalculator
from ..hdml import HDML
from ..inference import embed_dataset, is_lazy_dataset, loader_workers
from ..losses.base import BaseMetricLossFunction
from ..losses.cross_batch_memory import CrossBatchMemory
from ..miners import BaseMiner
from ..samplers import PKSampler
from .checkpoint import CHECKPOINT_VERSION, atomic_save, load_checkpoint, open_summary_writer
from .config import TrainConfig
from .loading import train_loader
from .plugins import HDMLStep, StepPlugin
from .steps import autocast_dtype, cached_gradient_step, freeze_batchnorm


def retrieval_metrics(embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    """Leave-one-out retrieval of ``(N, E)`` embeddings among themselves: Recall@1
    (= ``precision_at_1``), Recall@2/4/8, R-precision and MAP@R."""
    calculator = AccuracyCalculator(include=RETRIEVAL_METRICS, k="max_bin_count")
    scores = calculator.get_accuracy(embeddings, labels)
    return {name: float(scores[name]) for name in RETRIEVAL_METRICS}


def process_rank() -> int:
    """This process's rank in the default ``torch.distributed`` process group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TrainingInterrupted(Exception):
    """:meth:`Trainer.fit` stopped on SIGINT or SIGTERM, after writing ``checkpoint``
    (``run_dir/last.pt``, None without a ``run_dir``); ``fit`` again to continue exactly.

    Attributes:
        signal_number: the signal that stopped the run.
        checkpoint: the checkpoint written (None when the trainer has no ``run_dir``).
    """

    def __init__(self, signal_number: int, checkpoint: Path | None) -> None:
        name = signal.Signals(signal_number).name
        where = f"; resume from {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"training interrupted by {name}{where}")
        self.signal_number = signal_number
        self.checkpoint = checkpoint


def _lr_factor(config: TrainConfig, steps_per_epoch: int, photos: bool) -> Callable[[int], float]:
    """The learning rate's factor at each step; ``photos``: the data is decoded from files,
    which ``scheduler: auto`` trains at a constant rate."""
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    scheduler = config.scheduler
    if scheduler == "auto":
        scheduler = "none" if photos else "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if scheduler == "step":
            return 0.1 if step >= 2 * total // 3 else 1.0
        return 1.0

    return factor


def _frozen_until(factor: Callable[[int], float], steps: int) -> Callable[[int], float]:
    """``factor``, but 0 for the first ``steps`` steps (a frozen parameter group)."""

    def frozen(step: int) -> float:
        return 0.0 if step < steps else factor(step)

    return frozen


def _trunk(model: nn.Module) -> nn.Module | None:
    trunk = getattr(model, "trunk", None)
    return trunk if isinstance(trunk, nn.Module) else None


class Trainer:
    """Train an embedder with any loss (and optional miner) on P×K batches.

    Args:
        model: maps a batch of inputs ``(B, ...)`` to embeddings ``(B, E)``.
        loss: a deepmetric (or PML-style) loss ``loss(embeddings, labels, indices_tuple)``.
        train_set: an :class:`~deepmetric.data.ArrayDataset` (``x``, ``labels``) or a lazy
            dataset (``labels``; ``dataset[(index, seed)]`` -> ``(x | None, label, index)``
            when it declares ``accepts_sample_seeds``, see :mod:`deepmetric.training.loading`).
        config: a :class:`TrainConfig`.
        val_set: validation data of classes unseen in training (for the best checkpoint), in
            memory or lazy (then streamed through a ``DataLoader``, unreadable files left out).
        miner: optional ``miner(embeddings, labels) -> indices_tuple``.
        augment: optional ``augment(x, generator) -> x`` applied to each training batch; it
            must draw its random numbers from ``generator`` for exact resume.
        run_dir: folder for ``last.pt``, ``best.pt``, ``metrics.jsonl`` and ``tensorboard/``
            (None: nothing written).
        hdml: optional :class:`~deepmetric.hdml.HDML` built on this ``loss`` (its
            ``metric_loss``) and on ``model.embed_features`` (its ``head``): the shorthand of
            ``plugin=HDMLStep(hdml, model, loss)`` (:class:`~deepmetric.training.plugins.HDMLStep`).
            One ``backward`` of the three HDML losses trains the model and the loss
            (``J_metric``), HDML's generator (``J_gen``) and its classifier (cross-entropy), each
            in its own optimizer group at the learning rates of :meth:`HDML.parameter_groups`
            (generator 1e-2, classifier 1e-3, both scaled by the same schedule; ``grad_clip``
            applies to the model and loss only). HDML's weights, running means and optimizer
            state are in the checkpoint. The epoch's ``train_loss`` is the metric loss on the
            real batch (``J_m``), so it compares with a run without HDML; the record also holds
            the HDML losses' means.
        plugin: optional :class:`~deepmetric.training.plugins.StepPlugin` that computes the
            step's losses instead of ``loss(model(x), labels, miner(...))`` and brings its own
            trainable modules (single-process, ``accumulate: 1``).

    Under ``torch.distributed`` with more than one process (see the module docstring), build it
    in every process with the same arguments: ``model``, ``loss`` and ``miner`` stay the plain
    modules (what the checkpoints hold), and the steps go through their distributed wrappers.
    ``rank`` and ``world_size`` are this process's place in the group (0 and 1 without one).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        train_set: Dataset[Any],
        config: TrainConfig | None = None,
        *,
        val_set: Dataset[Any] | None = None,
        miner: nn.Module | None = None,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        run_dir: str | Path | None = None,
        hdml: HDML | None = None,
        plugin: StepPlugin | None = None,
    ) -> None:
        self.config = config or TrainConfig()
        self.rank, self.world_size = process_rank(), world_size()
        self.distributed = self.world_size > 1
        self.device = resolve_device(self.config.device)
        if self.distributed and self.device.type == "cuda":  # the launcher's choice of GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        if isinstance(model, DistributedDataParallel):
            raise ValueError("pass the plain model: the Trainer wraps it in DDP itself")
        if hdml is not None:
            if plugin is not None:
                raise ValueError("pass hdml or plugin, not both (hdml is HDMLStep's shorthand)")
            plugin = HDMLStep(hdml, model, loss)
        if plugin is not None and not isinstance(plugin, StepPlugin):
            raise ValueError(f"plugin must follow StepPlugin, got {type(plugin).__name__}")
        if plugin is not None and plugin.name in self._CHECKPOINT_KEYS:
            raise ValueError(f"a plug-in cannot be named {plugin.name!r}: a checkpoint key")
        name = plugin.name if plugin is not None else ""
        if self.distributed and plugin is not None:
            raise ValueError(f"{name} is not supported in distributed training; use one process")
        if plugin is not None and self.config.accumulate > 1:
            raise ValueError(f"accumulate > 1 is not supported with {name}; use accumulate: 1")
        self._amp_dtype = autocast_dtype(self.config, self.device)
        # float16 needs its loss scaled so that small gradients do not underflow
        use_scaler = self._amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # the deterministic mode also fills each new tensor (torch.empty) with NaN to expose
            # reads of uninitialised memory: a debugging aid that the kernels' determinism does
            # not need, and that cost 10% of a small CNN's step on the CPU
            torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
        torch.manual_seed(self.config.seed)
        if self.distributed:  # BatchNorm over the global batch (a no-op for other layers)
            model = convert_sync_batchnorm(model, self.device)
        self.model = model.to(self.device)
        if self.config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.loss = loss.to(self.device)
        self.plugin = plugin
        if plugin is not None:
            plugin.module.to(self.device)
        self.hdml = hdml  # None, or the module of the HDML plug-in
        self.writer: Any | None = None  # TensorBoard, opened on the first log
        self.miner = miner
        self.augment = augment
        self.train_set = train_set
        self.val_set = val_set
        self.run_dir = Path(run_dir) if run_dir is not None else None
        labels = getattr(train_set, "labels", None)
        if not isinstance(labels, Tensor):
            raise ValueError(
                f"train_set must have a labels tensor (N,), {type(train_set).__name__} has not"
            )
        self.sampler = PKSampler(
            labels,
            p=self.config.p,
            k=self.config.k,
            seed=self.config.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.loader = train_loader(train_set, self.sampler, self.config, self.device)
        self._backbone: list[nn.Parameter] = []  # the trunk's trainable parameters, own group
        self.optimizer = self._make_optimizer()
        steps_per_epoch = len(self.sampler)
        factor = _lr_factor(self.config, steps_per_epoch, is_lazy_dataset(train_set))
        frozen = _frozen_until(factor, self.config.freeze_backbone_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            [frozen if g["name"] == "backbone" else factor for g in self.optimizer.param_groups],
        )
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimisation steps
        self.best_score = -math.inf
        self.evals_without_improvement = 0
        self.history: list[dict[str, float]] = []
        self.last_step_values: dict[str, float] = {}  # the plug-in's values of the last step
        self._skipped_seen: set[int] = set()  # dataset indices of unreadable training files
        self._reset_epoch_sums()
        self._stop_signal: int | None = None
        # what a training step calls: the modules themselves, or their distributed wrappers
        self._step_model, self._step_loss, self._step_miner = self._step_modules()

    _CHECKPOINT_KEYS = frozenset(
        {"version", "config", "model", "loss", "optimizer", "scheduler", "sampler", "rng_torch"}
        | {"rng_cuda", "rng_python", "generator", "epoch", "step", "best_score", "history"}
        | {"evals_without_improvement", "epoch_sums", "skipped_indices", "scaler"}
    )

    def _reset_epoch_sums(self, saved: dict[str, Any] | None = None) -> None:
        """The running sums of the epoch in progress (from a checkpoint's ``epoch_sums``):
        batches consumed, steps and the sum of their losses, skipped samples, seconds."""
        saved = saved or {}
        self._epoch_batches = int(saved.get("batches", 0))
        self._loss_steps = int(saved.get("steps", 0))
        # summed on the device in float64: no synchronisation per step, the same sum as floats
        self._loss_sum = torch.tensor(
            float(saved.get("loss", 0.0)), dtype=torch.float64, device=self.device
        )
        self._logged_sums: dict[str, float] = dict(saved.get("logged", saved.get("hdml", {})))
        self._epoch_skipped = int(saved.get("skipped", 0))
        self._epoch_seconds = float(saved.get("seconds", 0.0))
        self._epoch_started: float | None = None

    def _stop_epoch_clock(self) -> None:
        """Count the epoch's seconds so far (``fit`` returns in the middle of an epoch)."""
        if self._epoch_started is not None:
            self._epoch_seconds += time.perf_counter() - self._epoch_started
            self._epoch_started = None

    def _epoch_sums(self) -> dict[str, Any]:
        seconds = self._epoch_seconds
        if self._epoch_started is not None:
            seconds += time.perf_counter() - self._epoch_started
        return {
            "batches": self._epoch_batches,
            "steps": self._loss_steps,
            "loss": float(self._loss_sum),
            "logged": dict(self._logged_sums),
            "skipped": self._epoch_skipped,
            "seconds": seconds,
        }

    def _step_modules(self) -> tuple[nn.Module, nn.Module, nn.Module | None]:
        """``(model, loss, miner)`` for the training step. With more than one process: the model
        in DDP; the loss in :class:`DistributedLossWrapper` (and DDP when it has parameters, which
        keeps their copies identical); the miner in :class:`DistributedMinerWrapper`."""
        if not self.distributed:
            return self.model, self.loss, self.miner
        if not isinstance(self.loss, BaseMetricLossFunction | CrossBatchMemory):
            raise ValueError(
                f"distributed training needs a deepmetric loss, got {type(self.loss).__name__}"
            )
        if self.miner is not None and not isinstance(self.miner, BaseMiner):
            raise ValueError(
                f"distributed training needs a deepmetric miner, got {type(self.miner).__name__}"
            )
        device_ids = [self.device] if self.device.type == "cuda" else None
        model = DistributedDataParallel(self.model, device_ids=device_ids)
        loss: nn.Module = DistributedLossWrapper(self.loss)
        if any(p.requires_grad for p in loss.parameters()):
            loss = DistributedDataParallel(loss, device_ids=device_ids)
        miner = None if self.miner is None else DistributedMinerWrapper(self.miner)
        return model, loss, miner

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the model (``lr``, ``weight_decay``; the trunk in its own ``backbone``
        group when ``backbone_lr`` or ``freeze_backbone_epochs`` is set), the loss's own
        parameters (``loss_lr``, no decay) and a plug-in's own groups (HDML: its generator and
        classifier at HDML's rates)."""
        config = self.config
        options = {
            "backbone_lr": config.backbone_lr is not None,
            "freeze_backbone_epochs": config.freeze_backbone_epochs > 0,
            "freeze_bn": config.freeze_bn,
        }
        trunk = _trunk(self.model)
        for name, used in options.items():
            if used and trunk is None:
                raise ValueError(
                    f"{name} needs a model with a 'trunk' module (the backbone, as "
                    f"deepmetric.models.EmbeddingNet has); {type(self.model).__name__} has none"
                )
        if trunk is not None and (options["backbone_lr"] or options["freeze_backbone_epochs"]):
            self._backbone = [p for p in trunk.parameters() if p.requires_grad]
        in_backbone = {id(p) for p in self._backbone}
        model_params = [
            p for p in self.model.parameters() if p.requires_grad and id(p) not in in_backbone
        ]
        groups: list[dict[str, Any]] = [{"params": model_params, "name": "model"}]
        if self._backbone:
            lr = config.backbone_lr if config.backbone_lr is not None else config.lr
            groups.append({"params": self._backbone, "lr": lr, "name": "backbone"})
        loss_modules = [self.loss]
        if self.plugin is not None:
            loss_modules += self.plugin.loss_modules()
        seen: set[int] = set()
        loss_params = []
        for module in loss_modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    loss_params.append(p)
        if loss_params:
            groups.append(
                {"params": loss_params, "lr": config.loss_lr, "weight_decay": 0.0, "name": "loss"}
            )
        if self.plugin is not None:
            groups += self.plugin.parameter_groups(self.model, config.lr)
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)

    def _clipped_parameters(self) -> list[nn.Parameter]:
        """The model's and the loss's parameters (not a plug-in's, such as HDML's generator and
        classifier, whose losses are on another scale)."""
        names = ("model", "backbone", "loss")
        groups = [g for g in self.optimizer.param_groups if g.get("name") in names]
        return [p for g in groups for p in g["params"]]

    @property
    def last_hdml_losses(self) -> dict[str, float]:
        """The HDML losses of the last step (:attr:`last_step_values`, kept for older code)."""
        return self.last_step_values

    @property
    def skipped_files(self) -> list[str]:
        """The training files that could not be read so far (their ``paths`` when the dataset
        has them, else ``"sample <index>"``), each once."""
        return self._sample_names(sorted(self._skipped_seen))

    def _sample_names(self, indices: Sequence[int]) -> list[str]:
        paths = getattr(self.train_set, "paths", None)
        return [str(paths[i]) if paths is not None else f"sample {i}" for i in indices]

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly, also in the middle of an epoch (the
        epoch's running sums included, so that its record averages all its steps)."""
        # the loader's workers fetch ahead of the steps: the position is the batches consumed
        sampler = {**self.sampler.state_dict(), "epoch": self.epoch}
        sampler["position"] = self._epoch_batches
        return {
            "version": CHECKPOINT_VERSION,
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": sampler,
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rng_python": list(random.getstate()[1]),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "best_score": self.best_score,
            "evals_without_improvement": self.evals_without_improvement,
            "history": self.history,
            "hdml": None,  # older readers look here: None = trained without HDML
            **({self.plugin.name: self.plugin.module.state_dict()} if self.plugin else {}),
            "epoch_sums": self._epoch_sums(),
            "skipped_indices": sorted(self._skipped_seen),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = self.plugin.name if self.plugin is not None else "hdml"
        plugin_state = state.get(name)
        if (plugin_state is None) != (self.plugin is None):
            saved = "with" if plugin_state is not None else "without"
            now = "with" if self.plugin is not None else "without"
            label = "HDML" if name == "hdml" else name
            raise ValueError(
                f"the checkpoint was trained {saved} {label} but this trainer is {now}"
            )
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        if self.plugin is not None and plugin_state is not None:
            self.plugin.module.load_state_dict(plugin_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_torch"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        random.setstate((3, tuple(state["rng_python"]), None))
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best_score = float(state["best_score"])
        self.evals_without_improvement = int(state["evals_without_improvement"])
        self.history = list(state["history"])
        # checkpoints of older versions have no running sums: the epoch's record then
        # averages the steps after the resume
        sums = state.get("epoch_sums")
        if sums is None:
            sums = {"batches": int(state["sampler"]["position"])}
        self._reset_epoch_sums(sums)
        self._skipped_seen = set(state.get("skipped_indices", []))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save(self, name: str) -> Path | None:
        """Write the checkpoint ``run_dir/name`` (rank 0 only; None where nothing is written)."""
        if self.run_dir is None or self.rank != 0:
            return None
        path = self.run_dir / name
        atomic_save(self.state_dict(), path)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` (default: ``run_dir/last.pt`` if it exists). True if resumed."""
        if path is None:
            if self.run_dir is None or not (self.run_dir / "last.pt").is_file():
                return False
            path = self.run_dir / "last.pt"
        self.load_state_dict(load_checkpoint(path))
        return True

    # -- training ---------------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast:
        dtype = self._amp_dtype
        enabled = dtype is not None
        return torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=enabled)

    def _scaled(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def train_step(self, x: Tensor, labels: Tensor) -> float:
        """One optimisation step on a batch; returns the loss (with a plug-in, its reported loss:
        HDML's ``J_m``, the metric loss on the real batch; its other values are left in
        ``last_step_values``)."""
        return float(self._train_step(x, labels))

    def _train_step(self, x: Tensor, labels: Tensor) -> Tensor:
        """:meth:`train_step`, returning the loss as a tensor on the device (no
        synchronisation with the GPU)."""
        x = x.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.augment is not None:
            x = self._augmented(x)
        if self.config.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        if self.plugin is not None:
            with self._autocast():
                out = self.plugin.losses(self.model, x, labels, self.miner)
            self.last_step_values = out.logged
            self._scaled(out.loss).backward()
            reported = out.reported
        elif self.config.accumulate > 1:
            reported = cached_gradient_step(
                self._step_model,
                self._step_loss,
                self._step_miner,
                x,
                labels,
                self.config.accumulate,
                self._autocast,
                self._scaled,
            )
        else:
            with self._autocast():
                embeddings = self._step_model(x)
                miner = self._step_miner
                indices = miner(embeddings, labels) if miner is not None else None
                loss = self._step_loss(embeddings, labels, indices)
            self._scaled(loss).backward()
            reported = loss.detach()
        if self.config.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self._clipped_parameters(), self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return reported

    def _augmented(self, x: Tensor) -> Tensor:
        """``augment(x, generator)``; with several processes, of the global batch (the shares
        gathered in rank order, as the one-process batch), keeping this process's share: the
        generator draws what one process would, and stays the same on every rank."""
        assert self.augment is not None
        if not self.distributed:
            return self.augment(x, self.generator)
        share = len(x)  # PKSampler's shares are of equal size
        global_x = torch.cat(gather_rows(x, [share] * self.world_size))
        return self.augment(global_x, self.generator)[self.rank * share : (self.rank + 1) * share]

    def evaluate(self, dataset: Dataset[Any]) -> dict[str, float]:
        """Retrieval metrics of ``dataset`` (in memory or lazy) against itself (self-matches
        excluded; unreadable files left out).

        With several processes, call it on every one: each embeds its slice of ``dataset``, the
        embeddings are gathered, and every process returns rank 0's metrics."""
        if not self.distributed:
            result = embed_dataset(
                self.model,
                dataset,
                self.config.embed_batch_size,
                self.device,
                num_workers=loader_workers(self.config.num_workers, dataset),
            )
            assert result.labels is not None
            return retrieval_metrics(result.embeddings, result.labels)
        scores = retrieval_metrics(*self._embed_sharded(dataset))
        values = torch.tensor(list(scores.values()), dtype=torch.float64, device=self.device)
        dist.broadcast(values, src=0)  # identical already; this makes the decisions agree
        return dict(zip(scores, values.tolist(), strict=True))

    def _embed_sharded(self, dataset: Dataset[Any]) -> tuple[Tensor, Tensor]:
        """``(embeddings (M, E), labels (M,))`` of the readable samples on the CPU, each
        process embedding a slice of the dataset."""
        n, world = len(dataset), self.world_size  # type: ignore[arg-type]
        if n < world:
            raise ValueError(f"cannot split {n} validation samples across {world} processes")
        bounds = [n * r // world for r in range(world + 1)]
        local = embed_dataset(
            self.model,
            dataset,
            self.config.embed_batch_size,
            self.device,
            num_workers=loader_workers(self.config.num_workers, dataset),
            indices=range(bounds[self.rank], bounds[self.rank + 1]),
        )
        assert local.labels is not None
        count = torch.tensor([[len(local.kept_indices)]], device=self.device)
        sizes = [int(c) for c in gather_rows(count, [1] * world)]
        embeddings = torch.cat(gather_rows(local.embeddings.to(self.device), sizes)).cpu()
        labels = torch.cat(gather_rows(local.labels.to(self.device), sizes)).cpu()
        return embeddings, labels

    def fit(self, max_steps: int | None = None) -> list[dict[str, float]]:
        """Train until ``config.epochs`` (or early stopping, or ``max_steps`` total steps, after
        which ``last.pt`` is written so that a later ``fit`` continues exactly). Resumes from
        ``run_dir/last.pt`` when it exists. Returns the per-epoch history.

        SIGINT and SIGTERM (from the main thread's handlers, restored on return) finish the
        step in progress, write ``last.pt`` and raise :class:`TrainingInterrupted`.

        With several processes, call it on every one; it raises ``ValueError`` when they did not
        resume from the same point, and ``RuntimeError`` when their weights differ at the end."""
        resumed = self.resume()
        try:
            with self._signals_stop_training():
                if self.distributed:
                    self._check_processes_agree(resumed)
                history = self._fit(max_steps)
                if self.distributed:
                    self._check_replicas_agree()
                return history
        finally:
            for p in self._backbone:  # undo freeze_backbone_epochs
                p.requires_grad_(True)
            if self.writer is not None:
                self.writer.close()
                self.writer = None

    @contextlib.contextmanager
    def _signals_stop_training(self) -> Iterator[None]:
        """While training, SIGINT and SIGTERM ask the loop to stop after the step in progress
        (a second SIGINT stops at once with ``KeyboardInterrupt``); the previous handlers are
        restored afterwards. Python only runs handlers in the main thread: elsewhere, nothing
        is installed."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: FrameType | None) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, request_stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _stop_requested(self) -> int:
        """The signal that asked to stop (0: none); with several processes, any process's
        (every process then stops after the same step)."""
        signum = self._stop_signal or 0
        if self.distributed:
            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag)
        return signum

    def _check_processes_agree(self, resumed: bool) -> None:
        """``ValueError`` on every process unless all resumed, at the same step, or none did."""
        here = torch.tensor([[int(resumed), self.step]], device=self.device)
        everyone = [tuple(t[0].tolist()) for t in gather_rows(here, [1] * self.world_size)]
        if len(set(everyone)) > 1:
            raise ValueError(
                f"the processes disagree on where the run stands ((resumed, step) in rank order: "
                f"{everyone}); every process must read the same run_dir/last.pt"
            )

    def _check_replicas_agree(self) -> None:
        """``RuntimeError`` unless the model and loss parameters are identical on every process
        (compared through per-tensor float64 sums and sums of squares)."""
        params = [*self.model.parameters(), *self.loss.parameters()]
        if not params:
            return
        mine = torch.stack(
            [
                s
                for p in params
                for s in (p.detach().double().sum(), p.detach().double().square().sum())
            ]
        )
        everyone = gather_rows(mine.unsqueeze(0), [1] * self.world_size)
        differ = [r for r, theirs in enumerate(everyone) if not torch.equal(theirs, everyone[0])]
        if differ:
            raise RuntimeError(
                f"the weights of rank(s) {differ} differ from rank 0's after training "
                "(a non-deterministic kernel, or parameters changed outside the optimizer)"
            )

    def _begin_epoch(self) -> None:
        """Training mode (BatchNorm of the trunk frozen with ``freeze_bn``), the trunk frozen
        during the first ``freeze_backbone_epochs``, and the sampler at the epoch's first
        batch not yet consumed."""
        self._step_model.train()
        if self.plugin is not None:
            self.plugin.module.train()
        trunk = _trunk(self.model)
        if self.config.freeze_bn and trunk is not None:
            freeze_batchnorm(trunk)
        if not self.distributed:
            # the frozen group's learning rate is 0 (its schedule); without gradients the trunk's
            # backward is skipped too. DDP expects every parameter's gradient, so with several
            # processes the gradients are computed (and Adam's moments follow them) at lr 0.
            frozen = self.epoch < self.config.freeze_backbone_epochs
            for p in self._backbone:
                p.requires_grad_(not frozen)
        state = {**self.sampler.state_dict(), "epoch": self.epoch}
        state["position"] = self._epoch_batches
        self.sampler.load_state_dict(state)
        self._epoch_started = time.perf_counter()

    def _note_skipped(self, indices: list[int]) -> None:
        """Count the batch's unreadable samples and name each new one in a warning."""
        self._epoch_skipped += len(indices)
        new = sorted(set(indices) - self._skipped_seen)
        if new:
            self._skipped_seen.update(new)
            warnings.warn(
                f"skipped unreadable training file(s): {', '.join(self._sample_names(new))}",
                stacklevel=3,
            )

    def _fit(self, max_steps: int | None) -> list[dict[str, float]]:
        while self.epoch < self.config.epochs:
            if self.config.patience is not None and (
                self.evals_without_improvement >= self.config.patience
            ):
                break
            self._begin_epoch()
            show = self.config.progress and self.rank == 0
            bar = tqdm(
                total=len(self.sampler) - self._epoch_batches,
                desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                disable=not show,
                leave=False,
            )
            shown = time.perf_counter()
            for x, labels, skipped in self.loader:
                if skipped:
                    self._note_skipped(skipped)
                if len(x):  # a batch whose every file was unreadable makes no step
                    self._loss_sum += self._train_step(x, labels).double()
                    self._loss_steps += 1
                    for key, value in self.last_step_values.items():
                        self._logged_sums[key] = self._logged_sums.get(key, 0.0) + value
                self._epoch_batches += 1
                bar.update()
                if show and time.perf_counter() - shown > 1.0:  # reading the loss waits for the GPU
                    bar.set_postfix(loss=f"{float(self._loss_sum) / max(1, self._loss_steps):.4f}")
                    shown = time.perf_counter()
                if max_steps is not None and self.step >= max_steps:
                    bar.close()
                    self.save("last.pt")
                    self._stop_epoch_clock()
                    return self.history
                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                    self.save("last.pt")
                signum = self._stop_requested()
                if signum:
                    bar.close()
                    path = self.save("last.pt")
                    self._stop_epoch_clock()
                    raise TrainingInterrupted(signum, path)
            bar.close()
            self._end_epoch()
            signum = self._stop_requested()
            if signum:
                raise TrainingInterrupted(
                    signum, self.run_dir / "last.pt" if self.run_dir else None
                )
        if self.val_set is None and self.run_dir is not None:
            self.save("best.pt")
        # Training is over: a fresh loader lets the old one's persistent workers exit now
        # rather than sit beside the final evaluation (whose loader starts its own).
        self.loader = train_loader(self.train_set, self.sampler, self.config, self.device)
        return self.history

    def _end_epoch(self) -> None:
        """The epoch's record (its losses averaged over all its steps, resumed or not),
        validation, the best checkpoint, the log and ``last.pt``."""
        sums = self._epoch_sums()
        self._reset_epoch_sums()  # before best.pt is written: it resumes at the next epoch
        self.epoch += 1
        steps = max(1, sums["steps"])
        record: dict[str, float] = {
            "epoch": self.epoch,
            "step": self.step,
            "train_loss": sums["loss"] / steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": sums["seconds"],
        }
        record.update({k: v / steps for k, v in sums["logged"].items()})
        if is_lazy_dataset(self.train_set):
            record["skipped_files"] = sums["skipped"]
        if self.val_set is not None and (
            self.epoch % self.config.eval_every == 0 or self.epoch == self.config.epochs
        ):
            scores = self.evaluate(self.val_set)
            record.update({f"val_{k}": v for k, v in scores.items()})
            score = scores[self.config.metric]
            if score > self.best_score:
                self.best_score, self.evals_without_improvement = score, 0
                self.save("best.pt")
            else:
                self.evals_without_improvement += 1
        self.history.append(record)
        self._log(record)
        self.save("last.pt")

    def _log(self, record: dict[str, float]) -> None:
        """Append the epoch's record to ``metrics.jsonl`` and, when TensorBoard is installed
        (and ``config.tensorboard``), write its values as scalars at step ``epoch`` (rank 0
        only)."""
        if self.run_dir is None or self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.config.tensorboard and self.writer is None:
            # a resumed run discards what a crashed one logged for this epoch and later
            self.writer = open_summary_writer(
                self.run_dir / "tensorboard", purge_step=int(record["epoch"])
            )
        if self.writer is not None:
            epoch = int(record["epoch"])
            for key, value in record.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, global_step=epoch)
            self.writer.flush()
