"""The trainer's data path (:mod:`deepmetric.training.loading`): lazy datasets read from real PNG
files through a ``DataLoader`` (with and without worker processes), per-sample seeds, a resume in
the middle of an epoch, unreadable files, and a lazy validation set."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset

from deepmetric import data, losses, miners
from deepmetric.samplers import PKSampler
from deepmetric.training import TrainConfig, Trainer, load_checkpoint
from deepmetric.training.loading import SeededBatchSampler, sample_seeds
from tests.lazy_pngs import LazyPNGs, small_model, write_pngs


def as_array_dataset(lazy: LazyPNGs) -> data.ArrayDataset:
    """The deterministic decodings of ``lazy`` in memory."""
    xs = [lazy.decode(i) for i in range(len(lazy))]
    return data.ArrayDataset(torch.stack([x for x in xs if x is not None]), lazy.labels)


def make_trainer(train: Dataset, val: Dataset | None, run_dir: Path | None, **options) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(**{"epochs": 2, "p": 3, "k": 4, "lr": 3e-3, "progress": False, **options})
    return Trainer(
        small_model(),
        losses.TripletMarginLoss(margin=0.2),
        train,
        config,
        val_set=val,
        miner=miners.MultiSimilarityMiner(),
        run_dir=run_dir,
    )


def weights(trainer: Trainer) -> list[Tensor]:
    return [t.detach().clone() for t in trainer.model.state_dict().values()]


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> tuple[LazyPNGs, LazyPNGs]:
    folder = tmp_path_factory.mktemp("pngs")
    return write_pngs(folder / "train", range(4), 12), write_pngs(folder / "val", range(4, 7), 8)


# -- seeds ------------------------------------------------------------------------------------


def test_seeds_depend_on_the_position_and_a_rank_gets_its_slots_of_the_global_batch() -> None:
    labels = torch.arange(8).repeat_interleave(6)
    one = SeededBatchSampler(PKSampler(labels, 4, 3, seed=5, rank=0, world_size=1), 7, True)
    halves = [
        SeededBatchSampler(PKSampler(labels, 4, 3, seed=5, rank=r, world_size=2), 7, True)
        for r in range(2)
    ]
    whole = list(one)
    shares = [list(h) for h in halves]
    for b, batch in enumerate(whole):
        assert shares[0][b] + shares[1][b] == batch  # indices and seeds of the global slots
        assert [s for _, s in batch] == sample_seeds(7, 0, b, 12)
    seeds = [s for batch in whole for _, s in batch]
    assert len(set(seeds)) == len(seeds)
    second_epoch = [s for batch in one for _, s in batch]  # the iteration advanced the epoch
    assert not set(seeds) & set(second_epoch)
    plain = SeededBatchSampler(PKSampler(labels, 4, 3, seed=5), 7, False)
    assert list(plain) == [[i for i, _ in batch] for batch in whole]


# -- exact resume with workers, and the interrupted epoch's record -----------------------------


def test_workers_and_a_resume_mid_epoch_give_the_weights_and_records_of_one_straight_run(
    tmp_path: Path, pngs: tuple[LazyPNGs, LazyPNGs]
) -> None:
    train, val = pngs
    straight = make_trainer(train, val, tmp_path / "straight", num_workers=0)
    straight.fit()

    first = make_trainer(train, val, tmp_path / "resumed", num_workers=2)
    per_epoch = len(first.sampler)
    first.fit(max_steps=per_epoch + 2)  # stops two steps into epoch 2
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch_sums"]["steps"] == 2
    second = make_trainer(train, val, tmp_path / "resumed", num_workers=2)
    second.fit()

    for a, b in zip(weights(straight), weights(second), strict=True):
        assert torch.equal(a, b)
    # the interrupted epoch's record averages all its steps, as the straight run's does
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert len(records) == len(straight.history) == 2
    for mine, theirs in zip(records, straight.history, strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine.keys() - {"seconds"}:
            assert mine[key] == theirs[key], key
    # and the augmentations took effect: without the seeded noise and flips the run differs
    plain = make_trainer(as_array_dataset(train), None, None, num_workers=0)
    plain.fit()
    pairs = zip(weights(plain), weights(straight), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


def test_interrupted_epoch_of_an_array_dataset_keeps_its_running_loss(tmp_path: Path) -> None:
    digits = data.load_digits()
    train = digits.subset(torch.where(digits.labels < 4)[0][:96])
    straight = make_trainer(train, None, tmp_path / "a", epochs=1)
    straight.fit()
    stopped = make_trainer(train, None, tmp_path / "b", epochs=1)
    stopped.fit(max_steps=3)
    resumed = make_trainer(train, None, tmp_path / "b", epochs=1)
    history = resumed.fit()
    steps = len(straight.sampler)
    assert history[0]["step"] == steps > 3
    # the mean of all the epoch's losses, not of the steps after the resume
    assert history[0]["train_loss"] == straight.history[0]["train_loss"]


# -- unreadable files ---------------------------------------------------------------------------


def test_an_unreadable_training_file_is_skipped_named_once_and_counted(tmp_path: Path) -> None:
    train = write_pngs(tmp_path / "train", range(3), 8, broken=5)
    trainer = make_trainer(train, None, tmp_path / "run", epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit()
    named = [w for w in caught if "unreadable" in str(w.message)]
    assert len(named) == 1 and str(train.paths[5]) in str(named[0].message)
    for epoch, record in enumerate(history):
        drawn = trainer.sampler.epoch_batches(epoch)  # every slot of the epoch's batches
        assert record["skipped_files"] == int((drawn == 5).sum()) > 0
    assert trainer.skipped_files == [str(train.paths[5])]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["skipped_indices"] == [5]


def test_a_lazy_validation_set_scores_as_the_same_images_in_memory(
    pngs: tuple[LazyPNGs, LazyPNGs],
) -> None:
    train, val = pngs
    trainer = make_trainer(train, None, None, epochs=1)
    trainer.fit(max_steps=2)
    lazy_scores = trainer.evaluate(val)
    memory_scores = trainer.evaluate(as_array_dataset(val))
    assert lazy_scores == pytest.approx(memory_scores, abs=1e-6)


def test_auto_workers_decode_files_and_leave_memory_alone(tmp_path: Path) -> None:
    from deepmetric.inference import loader_workers

    lazy = write_pngs(tmp_path, range(2), 2)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert loader_workers("auto", lazy) == min(4, cores or 1)
    assert loader_workers("auto", as_array_dataset(lazy)) == 0
    assert loader_workers(3, as_array_dataset(lazy)) == 3  # a number is taken as it is


def test_persistent_workers_live_across_epochs_and_exit_when_training_ends(
    tmp_path: Path,
) -> None:
    import multiprocessing

    photos = write_pngs(tmp_path, range(3), 4)
    trainer = make_trainer(photos, None, None, num_workers=1, epochs=2)
    trainer.fit(max_steps=1)  # mid-run: the worker stays for the next epochs
    alive = multiprocessing.active_children()
    assert len(alive) == 1
    trainer.fit()
    assert len(trainer.history) == 2
    assert not alive[0].is_alive() and not multiprocessing.active_children()
