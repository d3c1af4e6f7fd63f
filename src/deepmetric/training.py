"""The trainer: P×K batches -> embedder -> (miner) -> loss, with validation, checkpoints that
resume a run exactly, and a metrics log.

    trainer = Trainer(model, loss, train_set, config=TrainConfig(epochs=10), val_set=val_set,
                      miner=miners.MultiSimilarityMiner(), run_dir="runs/omniglot")
    history = trainer.fit()

What it does each epoch: draws class-balanced batches from :class:`deepmetric.samplers.PKSampler`,
optionally augments them, embeds, mines, computes the loss (whose parameters — proxies, ArcFace
weights — are optimised too, at ``loss_lr``), clips gradients, steps the optimizer and the
learning-rate schedule, and shows a progress bar with the running loss. Every ``eval_every``
epochs it embeds the validation split (classes never seen in training) and scores retrieval; the
best checkpoint is chosen on validation, never on test. Early stopping after ``patience``
evaluations without improvement.

Nothing is lost on a crash: ``last.pt`` is written (temp file + rename) at the end of every epoch
and every ``checkpoint_every`` steps, and holds the model, the loss, the optimizer, the scheduler,
the sampler's position and the random-number generators' states, so a resumed run ends with the
same weights as one that was never interrupted. Checkpoints load with
``torch.load(..., weights_only=True)``; metrics are appended to ``metrics.jsonl`` per epoch, and
also written as TensorBoard scalars to ``run_dir/tensorboard`` when the optional ``tensorboard``
package is installed.

With ``hdml=HDML(...)`` (:class:`deepmetric.hdml.HDML`, Zheng et al., CVPR 2019) each step also
synthesises hardness-aware negatives: the model must expose ``features(x)`` and
``embed_features(f)`` (as :class:`deepmetric.models.EmbeddingNet` does), and HDML's generator
and classifier are trained alongside, each with its own loss.

**Distributed training.** Build the trainer in every process of an initialised
``torch.distributed`` process group (``deepmetric train --nproc N`` or ``torchrun`` start them, see
:mod:`deepmetric._launch`); with more than one process it trains data-parallel, and a run ends with
the weights one process would reach on the same global batches (up to float rounding):

* each process takes its disjoint share of every P×K batch (:class:`PKSampler`'s rank split:
  ``P / world_size`` classes × K samples), so the global batch is the one-process batch;
* the model is wrapped in ``DistributedDataParallel``, its BatchNorm layers compute the global
  batch's statistics (:mod:`deepmetric._sync_batchnorm`), the loss and the miner in
  :class:`~deepmetric.distributed.DistributedLossWrapper` (in DDP too when it has parameters)
  and :class:`~deepmetric.distributed.DistributedMinerWrapper`, whose gradients after DDP's
  averaging are those of the global batch;
* ``augment`` runs on the global batch in every process (shares gathered, the same generator) and
  each keeps its share: the random numbers are those of one process;
* validation is sharded: each process embeds a slice, the embeddings are gathered, the metric is
  computed on every process and rank 0's values are broadcast, so the best-checkpoint and
  early-stopping decisions agree;
* only rank 0 writes (checkpoints, ``metrics.jsonl``, TensorBoard); the checkpoints hold the
  plain model (no ``module.`` prefix) and load in one process. The sampler's position counts
  global batches, so a run resumes from ``last.pt`` with any number of processes (every
  process reads it: ``run_dir`` must be on a folder they all see);
* on CUDA each process uses the current device (``torch.cuda.set_device(local_rank)``, done by
  the launcher), whatever index ``device`` names; HDML is single-process only.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._sync_batchnorm import convert_sync_batchnorm
from .config import TrainConfig
from .data import ArrayDataset
from .distributed import (
    DistributedLossWrapper,
    DistributedMinerWrapper,
    gather_rows,
    is_distributed,
    world_size,
)
from .evaluation import AccuracyCalculator
from .hdml import HDML
from .losses.base import BaseMetricLossFunction
from .losses.cross_batch_memory import CrossBatchMemory
from .miners import BaseMiner
from .samplers import PKSampler

CHECKPOINT_VERSION = 1


RETRIEVAL_METRICS = (
    "precision_at_1",
    "recall_at_2",
    "recall_at_4",
    "recall_at_8",
    "r_precision",
    "mean_average_precision_at_r",
)


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


@torch.no_grad()
def embed(
    model: nn.Module,
    x: Tensor,
    batch_size: int = 512,
    device: torch.device | None = None,
    progress: bool = False,
) -> Tensor:
    """Embed ``x`` (``(N, ...)``) in evaluation mode, in batches -> ``(N, E)`` float32 on CPU."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    starts = range(0, len(x), batch_size)
    for start in tqdm(starts, desc="embedding", disable=not progress, leave=False):
        out.append(model(x[start : start + batch_size].to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash mid-save leaves
    the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain data, never code)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a deepmetric checkpoint of version {CHECKPOINT_VERSION}")
    return state


def open_summary_writer(log_dir: Path, purge_step: int | None = None) -> Any | None:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``, or None when TensorBoard is
    not installed (``torch.utils.tensorboard`` needs the optional ``tensorboard`` package).

    ``purge_step``: events at this step or later, left by a run that crashed after logging
    them, are discarded (TensorBoard's own mechanism for resumed runs)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _hdml_model_parts(
    model: nn.Module, loss: nn.Module, hdml: HDML
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(model.features, model.embed_features)`` after checking that HDML fits the model and
    the loss; ``ValueError`` otherwise."""
    if not isinstance(hdml, HDML):
        raise ValueError(f"hdml must be a deepmetric.hdml.HDML, got {type(hdml).__name__}")
    features = getattr(model, "features", None)
    embed_features = getattr(model, "embed_features", None)
    if not callable(features) or not callable(embed_features):
        raise ValueError(
            "HDML needs a model with features(x) -> trunk features and embed_features(f) -> "
            f"embeddings (like deepmetric.models.EmbeddingNet); {type(model).__name__} has not"
        )
    if hdml.metric_loss is not loss:
        raise ValueError("hdml.metric_loss must be the trainer's loss (build HDML on the loss)")
    return features, embed_features


def _lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if config.scheduler == "step":
            return 0.1 if step >= 2 * total // 3 else 1.0
        return 1.0

    return factor


class Trainer:
    """Train an embedder with any loss (and optional miner) on P×K batches.

    Args:
        model: maps a batch of inputs ``(B, ...)`` to embeddings ``(B, E)``.
        loss: a deepmetric (or PML-style) loss ``loss(embeddings, labels, indices_tuple)``.
        train_set: an :class:`~deepmetric.data.ArrayDataset` (``x``, ``labels``).
        config: a :class:`TrainConfig`.
        val_set: validation data of classes unseen in training (for the best checkpoint).
        miner: optional ``miner(embeddings, labels) -> indices_tuple``.
        augment: optional ``augment(x, generator) -> x`` applied to each training batch; it
            must draw its random numbers from ``generator`` for exact resume.
        run_dir: folder for ``last.pt``, ``best.pt``, ``metrics.jsonl`` and ``tensorboard/``
            (None: nothing written).
        hdml: optional :class:`~deepmetric.hdml.HDML` built on this ``loss`` (its
            ``metric_loss``) and on ``model.embed_features`` (its ``head``). Each step then
            runs ``features = model.features(x)``, ``embeddings = model.embed_features(features)``,
            the miner on the embeddings, and ``hdml.step_losses(...)``; one ``backward`` of the
            three HDML losses trains the model and the loss (``J_metric``), HDML's generator
            (``J_gen``) and its classifier (cross-entropy), each in its own optimizer group at
            the learning rates of :meth:`HDML.parameter_groups` (generator 1e-2, classifier
            1e-3, both scaled by the same schedule; ``grad_clip`` applies to the model and loss
            only). HDML's weights, running means and optimizer state are in the checkpoint.
            The epoch's ``train_loss`` is the metric loss on the real batch (``J_m``), so it
            compares with a run without HDML; the record also holds the HDML losses' means.

    Under ``torch.distributed`` with more than one process (see the module docstring), build it
    in every process with the same arguments: ``model``, ``loss`` and ``miner`` stay the plain
    modules (what the checkpoints hold), and the steps go through their distributed wrappers.
    ``rank`` and ``world_size`` are this process's place in the group (0 and 1 without one).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        train_set: ArrayDataset,
        config: TrainConfig | None = None,
        *,
        val_set: ArrayDataset | None = None,
        miner: nn.Module | None = None,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        run_dir: str | Path | None = None,
        hdml: HDML | None = None,
    ) -> None:
        self.config = config or TrainConfig()
        self.rank, self.world_size = process_rank(), world_size()
        self.distributed = self.world_size > 1
        self.device = resolve_device(self.config.device)
        if self.distributed and self.device.type == "cuda":  # the launcher's choice of GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        if isinstance(model, DistributedDataParallel):
            raise ValueError("pass the plain model: the Trainer wraps it in DDP itself")
        if self.distributed and hdml is not None:
            raise ValueError("HDML is not supported in distributed training; use one process")
        # with HDML: (hdml, model.features, model.embed_features)
        self._hdml_parts: tuple[HDML, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None
        self._hdml_parts = None if hdml is None else (hdml, *_hdml_model_parts(model, loss, hdml))
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(self.config.seed)
        if self.distributed:  # BatchNorm over the global batch (a no-op for other layers)
            model = convert_sync_batchnorm(model, self.device)
        self.model = model.to(self.device)
        self.loss = loss.to(self.device)
        self.hdml = hdml.to(self.device) if hdml is not None else None
        self.writer: Any | None = None  # TensorBoard, opened on the first log
        self.miner = miner
        self.augment = augment
        self.train_set = train_set
        self.val_set = val_set
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.sampler = PKSampler(
            train_set.labels,
            p=self.config.p,
            k=self.config.k,
            seed=self.config.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.loader = DataLoader(train_set, batch_sampler=self.sampler)
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(self.config, len(self.sampler))
        )
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimisation steps
        self.best_score = -math.inf
        self.evals_without_improvement = 0
        self.history: list[dict[str, float]] = []
        self.last_hdml_losses: dict[str, float] = {}
        # what a training step calls: the modules themselves, or their distributed wrappers
        self._step_model, self._step_loss, self._step_miner = self._step_modules()

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
        """AdamW over the model (``lr``, ``weight_decay``), the loss's own parameters
        (``loss_lr``, no decay) and, with HDML, its generator and classifier (HDML's rates)."""
        model_params = [p for p in self.model.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": model_params, "name": "model"}]
        loss_modules = [self.loss]
        if self.hdml is not None:
            loss_modules.append(self.hdml.synthetic_loss)  # usually the loss itself
        seen: set[int] = set()
        loss_params = []
        for module in loss_modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    loss_params.append(p)
        if loss_params:
            groups.append(
                {
                    "params": loss_params,
                    "lr": self.config.loss_lr,
                    "weight_decay": 0.0,
                    "name": "loss",
                }
            )
        if self.hdml is not None:
            # HDML's own groups: [metric (the model and loss, set up above), generator, classifier]
            hdml_groups = self.hdml.parameter_groups(self.model, metric_lr=self.config.lr)
            groups += [{**g, "weight_decay": 0.0} for g in hdml_groups[1:]]
        return torch.optim.AdamW(groups, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def _clipped_parameters(self) -> list[nn.Parameter]:
        """The model's and the loss's parameters (not HDML's generator and classifier, whose
        losses are on another scale)."""
        groups = [g for g in self.optimizer.param_groups if g.get("name") in ("model", "loss")]
        return [p for g in groups for p in g["params"]]

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        return {
            "version": CHECKPOINT_VERSION,
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rng_python": list(random.getstate()[1]),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "best_score": self.best_score,
            "evals_without_improvement": self.evals_without_improvement,
            "history": self.history,
            "hdml": self.hdml.state_dict() if self.hdml is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        hdml_state = state.get("hdml")
        if (hdml_state is None) != (self.hdml is None):
            saved = "with" if hdml_state is not None else "without"
            now = "with" if self.hdml is not None else "without"
            raise ValueError(f"the checkpoint was trained {saved} HDML but this trainer is {now}")
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        if self.hdml is not None and hdml_state is not None:
            self.hdml.load_state_dict(hdml_state)
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
        enabled = self.config.amp and self.device.type == "cuda"
        dtype = torch.bfloat16
        if enabled and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def train_step(self, x: Tensor, labels: Tensor) -> float:
        """One optimisation step on a batch; returns the loss (with HDML: ``J_m``, the metric
        loss on the real batch; the step's HDML losses are left in ``last_hdml_losses``)."""
        x, labels = x.to(self.device), labels.to(self.device)
        if self.augment is not None:
            x = self._augmented(x)
        with self._autocast():
            if self._hdml_parts is None:
                embeddings = self._step_model(x)
                miner = self._step_miner
                indices = miner(embeddings, labels) if miner is not None else None
                loss = self._step_loss(embeddings, labels, indices)
                reported = loss.detach()
            else:
                hdml, trunk_features, embed_features = self._hdml_parts
                features = trunk_features(x)
                embeddings = embed_features(features)
                indices = self.miner(embeddings, labels) if self.miner is not None else None
                parts = hdml.step_losses(features, embeddings, labels, indices)
                loss = parts.total()  # the gradients of the three parts do not cross
                reported = parts.j_m
                self.last_hdml_losses = {
                    "hdml_metric_loss": float(parts.metric_loss.detach()),
                    "hdml_synthetic_loss": float(parts.j_syn),
                    "hdml_generator_loss": float(parts.generator_loss.detach()),
                    "hdml_classifier_loss": float(parts.classifier_loss.detach()),
                    "hdml_synthetic_weight": float(parts.synthetic_weight),
                }
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self._clipped_parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(reported)

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

    def evaluate(self, dataset: ArrayDataset) -> dict[str, float]:
        """Retrieval metrics of ``dataset`` against itself (self-matches excluded).

        With several processes, call it on every one: each embeds its slice of ``dataset``, the
        embeddings are gathered, and every process returns rank 0's metrics."""
        if not self.distributed:
            emb = embed(self.model, dataset.x, self.config.embed_batch_size, self.device)
            return retrieval_metrics(emb, dataset.labels)
        scores = retrieval_metrics(self._embed_sharded(dataset.x), dataset.labels)
        values = torch.tensor(list(scores.values()), dtype=torch.float64, device=self.device)
        dist.broadcast(values, src=0)  # identical already; this makes the decisions agree
        return dict(zip(scores, values.tolist(), strict=True))

    def _embed_sharded(self, x: Tensor) -> Tensor:
        """``(N, ...)`` -> ``(N, E)`` embeddings on the CPU, each process embedding a slice."""
        n, world = len(x), self.world_size
        if n < world:
            raise ValueError(f"cannot split {n} validation samples across {world} processes")
        bounds = [n * r // world for r in range(world + 1)]
        sizes = [end - start for start, end in zip(bounds, bounds[1:], strict=False)]
        mine = x[bounds[self.rank] : bounds[self.rank + 1]]
        local = embed(self.model, mine, self.config.embed_batch_size, self.device)
        return torch.cat(gather_rows(local.to(self.device), sizes)).cpu()

    def fit(self, max_steps: int | None = None) -> list[dict[str, float]]:
        """Train until ``config.epochs`` (or early stopping, or ``max_steps`` total steps, after
        which ``last.pt`` is written so that a later ``fit`` continues exactly). Resumes from
        ``run_dir/last.pt`` when it exists. Returns the per-epoch history.

        With several processes, call it on every one; it raises ``ValueError`` when they did not
        resume from the same point, and ``RuntimeError`` when their weights differ at the end."""
        resumed = self.resume()
        try:
            if self.distributed:
                self._check_processes_agree(resumed)
            history = self._fit(max_steps)
            if self.distributed:
                self._check_replicas_agree()
            return history
        finally:
            if self.writer is not None:
                self.writer.close()
                self.writer = None

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

    def _fit(self, max_steps: int | None) -> list[dict[str, float]]:
        self._step_model.train()
        if self.hdml is not None:
            self.hdml.train()
        while self.epoch < self.config.epochs:
            if self.config.patience is not None and (
                self.evals_without_improvement >= self.config.patience
            ):
                break
            self.sampler.set_epoch(self.epoch)
            start = time.perf_counter()
            losses: list[float] = []
            hdml_sums: dict[str, float] = {}
            bar = tqdm(
                self.loader,
                total=len(self.sampler) - self.sampler.state_dict()["position"],
                desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                disable=not self.config.progress or self.rank != 0,
                leave=False,
            )
            for x, labels in bar:
                losses.append(self.train_step(x, labels))
                for key, value in self.last_hdml_losses.items():
                    hdml_sums[key] = hdml_sums.get(key, 0.0) + value
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
                if max_steps is not None and self.step >= max_steps:
                    self.save("last.pt")
                    return self.history
                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                    self.save("last.pt")
            self.epoch += 1
            record: dict[str, float] = {
                "epoch": self.epoch,
                "step": self.step,
                "train_loss": sum(losses) / max(1, len(losses)),
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - start,
            }
            record.update({k: v / max(1, len(losses)) for k, v in hdml_sums.items()})
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
        if self.val_set is None and self.run_dir is not None:
            self.save("best.pt")
        return self.history

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
