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
:mod:`deepmetric.distributed.launch`); with more than one process it trains data-parallel, and a
run ends with the weights one process would reach on the same global batches (up to float
rounding):

* each process takes its disjoint share of every P×K batch (:class:`PKSampler`'s rank split:
  ``P / world_size`` classes × K samples), so the global batch is the one-process batch;
* the model is wrapped in ``DistributedDataParallel``, its BatchNorm layers compute the global
  batch's statistics (:mod:`deepmetric.distributed.sync_batchnorm`), the loss and the miner in
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

**Data.** The training set is an :class:`~deepmetric.data.ArrayDataset` (samples in memory,
optionally distorted batch by batch by ``augment``) or a lazy dataset that reads its samples
from disk (see :mod:`deepmetric.inference`), read through a ``DataLoader`` with
``num_workers`` worker processes that stay alive between epochs. A lazy dataset that declares
``accepts_sample_seeds`` gets a seed per sample from the run's position
(:mod:`deepmetric.training.loading`), so its random transforms are reproduced exactly on resume
and with any number of workers. A file it cannot read is left out of its batch, named in a
warning once, and counted in the epoch record's ``skipped_files``.

**Stopping.** SIGINT (Ctrl-C) or SIGTERM during :meth:`Trainer.fit` lets the current step
finish, writes a resumable ``last.pt`` (in the middle of the epoch, exact) and raises
:class:`TrainingInterrupted`; the next ``fit`` on the same ``run_dir`` continues where it
stopped, and the interrupted epoch's ``train_loss`` averages all of its steps (the running sums
are in the checkpoint). A second Ctrl-C while the step finishes stops at once.

**Fine-tuning.** ``backbone_lr``, ``freeze_backbone_epochs`` and ``freeze_bn`` act on
``model.trunk``; ``amp`` (bf16/fp16 autocast), ``channels_last`` and ``accumulate`` (the
gradient cache of Gao et al., 2021, for P×K batches larger than memory) on the whole step. See
:class:`TrainConfig`.
"""

from ..inference import Embedded, embed, embed_dataset
from .checkpoint import CHECKPOINT_VERSION, atomic_save, load_checkpoint, open_summary_writer
from .config import TrainConfig
from .trainer import (
    RETRIEVAL_METRICS,
    Trainer,
    TrainingInterrupted,
    process_rank,
    resolve_device,
    retrieval_metrics,
)

__all__ = [
    "CHECKPOINT_VERSION",
    "RETRIEVAL_METRICS",
    "Embedded",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "atomic_save",
    "embed",
    "embed_dataset",
    "load_checkpoint",
    "open_summary_writer",
    "process_rank",
    "resolve_device",
    "retrieval_metrics",
]
