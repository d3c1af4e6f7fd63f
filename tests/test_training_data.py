"""The trainer's data path: lazy datasets read from real PNG files through a ``DataLoader`` (with
and without worker processes), per-sample seeds, unreadable files, and the one ``embed``.

``LazyPNGs`` is a stand-in for ``deepmetric.data``'s lazy image datasets, written to their
contract: ``labels`` / ``class_names`` / ``paths``, ``ds[(index, seed)]`` -> ``(x | None,
label, index)`` with a random transform seeded by ``seed``, ``ds[index]`` with the
deterministic one, ``accepts_sample_seeds = True``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from deepmetric import data, losses, miners, models
from deepmetric.inference import Embedded, collate_samples, embed, embed_dataset
from deepmetric.samplers import PKSampler
from deepmetric.training import TrainConfig, Trainer, load_checkpoint
from deepmetric.training.loading import SeededBatchSampler, sample_seeds


class LazyPNGs(Dataset[tuple[Tensor | None, int, int]]):
    """Grey PNG files decoded on each access; the random transform adds seeded noise and flips
    the image horizontally with probability 1/2."""

    accepts_sample_seeds = True

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.class_names = [str(c) for c in range(int(self.labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> Tensor | None:
        try:
            with Image.open(self.paths[index]) as image:
                pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        except OSError:
            return None
        return torch.from_numpy(pixels.copy()).unsqueeze(0)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor | None, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        x = self.decode(index)
        if x is not None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
            if float(torch.rand(1, generator=generator)) < 0.5:
                x = x.flip(-1)
            x = x + 0.05 * torch.randn(x.shape, generator=generator)
        return x, int(self.labels[index]), index


def write_pngs(folder: Path, classes: range, per_class: int, broken: int | None = None) -> LazyPNGs:
    """``per_class`` digits of each class as 8-bit PNG files; the file of sample ``broken`` is
    replaced by bytes that are no image."""
    digits = data.load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    paths, labels = [], []
    for c in classes:
        for i in torch.where(digits.labels == c)[0][:per_class].tolist():
            path = folder / f"{c}_{i}.png"
            pixels = (digits.x[i, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(path)
            paths.append(path)
            labels.append(c)
    if broken is not None:
        paths[broken].write_bytes(b"not a png")
    return LazyPNGs(paths, labels)


def as_array_dataset(lazy: LazyPNGs) -> data.ArrayDataset:
    """The deterministic decodings of ``lazy`` in memory."""
    xs = [lazy.decode(i) for i in range(len(lazy))]
    return data.ArrayDataset(torch.stack([x for x in xs if x is not None]), lazy.labels)


def small_model() -> models.EmbeddingNet:
    return models.EmbeddingNet(models.SmallConvNet(1, channels=8, blocks=2), 8, embedding_size=8)


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


def test_collate_drops_unreadable_items_and_accepts_pairs() -> None:
    x, labels, skipped = collate_samples(
        [(torch.ones(2), 1, 4), (None, 0, 7), (torch.zeros(2), 2, 9)]
    )
    assert torch.equal(x, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert labels.tolist() == [1, 2] and skipped == [7]
    x, labels, skipped = collate_samples([(torch.ones(3), torch.tensor(5))])
    assert x.shape == (1, 3) and labels.tolist() == [5] and skipped == []
    x, labels, skipped = collate_samples([(None, 0, 1)])
    assert len(x) == 0 and len(labels) == 0 and skipped == [1]


# -- embed ----------------------------------------------------------------------------------------


def test_embed_streams_a_lazy_dataset_and_reports_the_rows_it_kept(tmp_path: Path) -> None:
    lazy = write_pngs(tmp_path / "pngs", range(3), 5, broken=6)
    model = small_model().eval()
    readable = [i for i in range(len(lazy)) if i != 6]
    with torch.no_grad():
        expected = torch.cat([model(lazy.decode(i).unsqueeze(0)) for i in readable])  # type: ignore[union-attr]
    for workers in (0, 2):
        with pytest.warns(UserWarning, match=str(lazy.paths[6].name)):
            result = embed_dataset(model, lazy, batch_size=4, num_workers=workers)
        assert isinstance(result, Embedded)
        assert result.kept_indices.tolist() == readable
        assert result.skipped_indices == [6]
        assert result.labels is not None and torch.equal(result.labels, lazy.labels[readable])
        torch.testing.assert_close(result.embeddings, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="embed_dataset"), pytest.warns(UserWarning):
        embed(model, lazy)


def test_embed_of_a_tensor_or_array_dataset_matches_the_model_in_eval_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 4))
    model.train()
    x = torch.randn(37, 1, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    torch.testing.assert_close(embed(model, x, batch_size=8), expected)
    assert model.training  # the mode is restored
    dataset = data.ArrayDataset(x, torch.arange(37) % 3)
    result = embed_dataset(model, dataset, 5, indices=[3, 30, 1])
    torch.testing.assert_close(result.embeddings, expected[[3, 30, 1]])
    assert result.labels is not None and result.labels.tolist() == [0, 0, 1]
    assert embed(model, dataset, progress=True).dtype == torch.float32


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
