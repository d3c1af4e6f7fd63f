"""PKSampler and MPerClassSampler: batch composition, coverage, exact length, determinism,
distributed split, resume, DataLoader use and PML 2.9.0 parity of MPerClassSampler."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning.samplers import MPerClassSampler as PMLMPerClassSampler
from torch.utils.data import DataLoader, TensorDataset

from deepmetric.samplers import MPerClassSampler, PKSampler, num_pk_batches


def labels_from_sizes(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Labels with ``sizes[c]`` samples of class ``10 * c - 7`` (not 0..C-1), in random order."""
    labels = np.repeat(10 * np.arange(len(sizes)) - 7, sizes)
    return np.random.default_rng(seed).permutation(labels)


def greedy_num_batches(sizes: list[int], p: int, k: int) -> int:
    """Slow, obvious count: fill batches from the P classes with the most K-chunks left until
    fewer than P classes have any (largest-first is optimal for this packing)."""
    left = [math.ceil(n / k) for n in sizes]
    batches = 0
    while sum(1 for m in left if m > 0) >= p:
        for c in sorted(range(len(left)), key=lambda c: -left[c])[:p]:
            left[c] -= 1
        batches += 1
    return batches


def assert_pk_batch(batch: list[int], labels: np.ndarray, p: int, k: int) -> None:
    """P distinct classes, K samples each, in consecutive groups of K; no sample twice within
    a class that has K samples or more; a smaller class repeats each sample evenly."""
    assert len(batch) == p * k
    groups = np.asarray(batch).reshape(p, k)
    group_labels = labels[groups]
    assert (group_labels == group_labels[:, :1]).all(), "a group of K mixes classes"
    assert len(set(group_labels[:, 0].tolist())) == p, "a class appears in two groups"
    for group, label in zip(groups, group_labels[:, 0], strict=True):
        n_class = int((labels == label).sum())
        counts = Counter(group.tolist())
        if n_class >= k:
            assert max(counts.values()) == 1
        else:  # with replacement, cyclically: every sample, floor or ceil(K / n) times each
            assert len(counts) == n_class
            assert set(counts.values()) <= {k // n_class, -(-k // n_class)}


sizes_strategy = st.lists(st.integers(1, 15), min_size=1, max_size=12)


# ----------------------------------------------------------------------------------------------
# PKSampler: composition, length, coverage
# ----------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_strategy, data=st.data())
def test_batches_are_p_classes_of_k_with_exact_length(sizes: list[int], data: st.DataObject):
    p = data.draw(st.integers(1, len(sizes)), label="p")
    k = data.draw(st.integers(1, 5), label="k")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    labels = labels_from_sizes(sizes, seed)
    sampler = PKSampler(labels, p=p, k=k, seed=seed)
    batches = list(sampler)

    expected = greedy_num_batches(sizes, p, k)
    assert len(batches) == len(sampler) == expected >= 1
    for batch in batches:
        assert_pk_batch(batch, labels, p, k)

    # a class never sends more chunks than it has, and when no class has more chunks than
    # there are batches, fewer than P chunks are left out of the epoch
    chunks = {c: math.ceil(int((labels == c).sum()) / k) for c in np.unique(labels)}
    appearances = Counter(int(labels[b[i * k]]) for b in batches for i in range(p))
    assert all(appearances[c] <= m for c, m in chunks.items())
    if max(chunks.values()) <= sum(chunks.values()) // p:
        assert sum(chunks.values()) - p * expected < p


@settings(max_examples=40, deadline=None)
@given(chunks=st.lists(st.integers(0, 30), min_size=1, max_size=20), p=st.integers(1, 8))
def test_num_pk_batches_matches_greedy_packing(chunks: list[int], p: int):
    # sizes equal to the chunk counts with K = 1 give exactly these chunk counts
    expected = greedy_num_batches([m for m in chunks if m > 0], p, 1)
    assert num_pk_batches(np.asarray(chunks, dtype=np.int64), p) == expected


def test_closed_form_length_balanced_and_dominant_class():
    # balanced: sum_c ceil(n_c / 4) = 3 * 10 + 5 * 3 = 45 chunks -> floor(45 / 4) = 11 batches
    labels = labels_from_sizes([40, 40, 40, 10, 10, 10, 10, 10])
    assert len(PKSampler(labels, p=4, k=4)) == 11
    # one class with 50 chunks and three with 1: max{b : min(50, b) + min(3, b) >= 2b} = 3
    labels = labels_from_sizes([100, 1, 2, 2])
    sampler = PKSampler(labels, p=2, k=2)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 3
    assert all(-7 in labels[b] for b in batches)  # the big class (label -7): every batch


def test_coverage_each_sample_about_once_per_epoch():
    sizes = np.random.default_rng(1).integers(4, 41, size=60).tolist()
    p, k = 8, 4
    labels = labels_from_sizes(sizes, seed=1)
    n = len(labels)
    chunks = sum(math.ceil(s / k) for s in sizes)
    sampler = PKSampler(labels, p=p, k=k, seed=3)
    counts = np.bincount(np.concatenate(list(sampler)), minlength=n)

    left_out_chunks = chunks - p * len(sampler)
    assert left_out_chunks < p  # no dominant class: fewer than P chunks are left out
    assert counts.max() <= 2  # once, or twice when filling up a class's last chunk
    # only samples of left-out chunks are missed: at most (P - 1) * K of N
    assert (counts == 0).sum() <= left_out_chunks * k
    assert (counts >= 1).mean() >= 1 - (p - 1) * k / n  # here >= 1 - 28 / N
    # duplicates come only from filling up last chunks: sum_c (ceil(n_c / K) * K - n_c)
    fill = sum(math.ceil(s / k) * k - s for s in sizes)
    assert counts.sum() == p * k * len(sampler)
    assert (counts == 2).sum() <= fill
    # the left-out chunks are random: three epochs together see every sample
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        counts += np.bincount(np.concatenate(list(sampler)), minlength=n)
    assert (counts >= 1).all()


def test_exact_coverage_when_k_divides_every_class():
    sizes = [8, 4, 12, 4, 16, 8, 8, 4]  # 16 chunks of 4, P = 4 -> 4 batches, nothing left out
    labels = labels_from_sizes(sizes)
    batches = list(PKSampler(labels, p=4, k=4, seed=5))
    assert len(batches) == 4
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(labels)))
    # classes appear in proportion to their size: n_c / K batches
    per_class = Counter(int(labels[b[0 + 4 * i]]) for b in batches for i in range(4))
    for label, size in zip(10 * np.arange(len(sizes)) - 7, sizes, strict=True):
        assert per_class[int(label)] == size // 4


@pytest.mark.parametrize("seed", range(5))
def test_large_classes_are_spread_over_the_epoch(seed: int):
    # a class 5x larger than the others (50 of 350 chunks, 87 batches) appears in every quarter
    # of the epoch about equally (12.5), not bunched at the end
    labels = labels_from_sizes([200] + [40] * 30)
    batches = list(PKSampler(labels, p=4, k=4, seed=seed))
    big = -7  # label of the first class
    quarters = np.array_split(np.arange(len(batches)), 4)
    per_quarter = [sum(big in labels[batches[i]] for i in quarter) for quarter in quarters]
    assert sum(per_quarter) >= 48  # all its chunks but the 350 - 4 * 87 = 2 left out
    assert min(per_quarter) >= 6


# ----------------------------------------------------------------------------------------------
# PKSampler: determinism, epochs, labels types
# ----------------------------------------------------------------------------------------------


def test_same_seed_and_epoch_give_same_batches():
    labels = labels_from_sizes([5, 9, 3, 12, 7, 1, 8])
    a = PKSampler(labels, p=3, k=2, seed=11)
    b = PKSampler(labels, p=3, k=2, seed=11)
    assert list(a) == list(b)
    assert list(PKSampler(labels, p=3, k=2, seed=12)) != list(PKSampler(labels, p=3, k=2, seed=11))

    a.set_epoch(4)
    b.set_epoch(4)
    epoch4 = list(a)
    assert epoch4 == list(b)
    a.set_epoch(5)
    assert list(a) != epoch4
    a.set_epoch(4)
    assert list(a) == epoch4


def test_finished_iteration_advances_the_epoch():
    labels = labels_from_sizes([5, 9, 3, 12, 7, 1, 8])
    sampler = PKSampler(labels, p=3, k=2, seed=1)
    first, second = list(sampler), list(sampler)
    fresh = PKSampler(labels, p=3, k=2, seed=1)
    fresh.set_epoch(1)
    assert first != second == list(fresh)
    assert sampler.state_dict()["epoch"] == 2
    # an abandoned iteration does not advance it, and a new iteration starts from batch 0
    next(iter(sampler))
    assert sampler.state_dict() == {"seed": 1, "epoch": 2, "position": 1, "num_batches": 8}
    fresh.set_epoch(2)
    assert list(sampler) == list(fresh)


@pytest.mark.parametrize(
    "convert",
    [
        lambda y: y.tolist(),
        lambda y: y.astype(np.int32),
        lambda y: (y + 7).astype(np.uint8),
        lambda y: torch.from_numpy(y),
        lambda y: torch.from_numpy(y).to(torch.int16),
        lambda y: torch.from_numpy(y + 7).to(torch.uint8),
    ],
)
def test_labels_as_list_array_or_tensor_of_any_integer_dtype(convert):
    labels = labels_from_sizes([5, 9, 3, 12, 7, 1, 8])
    expected = list(PKSampler(labels, p=3, k=2, seed=2))
    assert list(PKSampler(convert(labels), p=3, k=2, seed=2)) == expected


# ----------------------------------------------------------------------------------------------
# PKSampler: distributed split
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_ranks_get_disjoint_equal_class_shares_of_each_global_batch(world_size: int):
    labels = labels_from_sizes([6, 17, 3, 9, 25, 11, 4, 8, 13, 2, 30])
    p, k = 8, 3
    global_batches = list(PKSampler(labels, p=p, k=k, seed=9))
    samplers = [
        PKSampler(labels, p=p, k=k, seed=9, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert {len(s) for s in samplers} == {len(global_batches)}
    per_rank = [list(s) for s in samplers]
    assert {len(batches) for batches in per_rank} == {len(global_batches)}
    for step, global_batch in enumerate(global_batches):
        shares = [per_rank[r][step] for r in range(world_size)]
        assert all(len(share) == p * k // world_size for share in shares)
        share_classes = [set(labels[share].tolist()) for share in shares]
        assert all(len(c) == p // world_size for c in share_classes)  # whole classes
        assert sum(len(c) for c in share_classes) == p  # disjoint classes -> disjoint samples
        assert sum(shares, []) == global_batch  # rank order reassembles the global batch
    assert samplers[0].batch_size == p * k // world_size


def test_rank_and_world_size_default_to_the_process_group(monkeypatch):
    labels = labels_from_sizes([6, 17, 3, 9, 25, 11, 4, 8, 13, 2, 30])
    alone = PKSampler(labels, p=4, k=3)
    assert (alone.rank, alone.world_size) == (0, 1)
    # as if torch.distributed were initialised with 4 processes, this one being rank 3
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    in_group = PKSampler(labels, p=4, k=3)
    assert (in_group.rank, in_group.world_size) == (3, 4)
    assert [b[-3:] for b in alone] == list(in_group)  # the last class of each global batch
    assert PKSampler(labels, p=4, k=3, rank=0, world_size=1).world_size == 1  # explicit wins


# ----------------------------------------------------------------------------------------------
# PKSampler: resume
# ----------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(stop=st.integers(0, 30), epoch=st.integers(0, 3), world_size=st.sampled_from([1, 2]))
def test_resume_mid_epoch_gives_the_remaining_batches(stop: int, epoch: int, world_size: int):
    labels = labels_from_sizes([6, 17, 3, 9, 25, 11, 4, 8, 13, 2, 30])

    def make() -> PKSampler:
        return PKSampler(labels, p=4, k=3, seed=21, rank=world_size - 1, world_size=world_size)

    uninterrupted = make()
    uninterrupted.set_epoch(epoch)
    this_epoch, next_epoch = list(uninterrupted), list(uninterrupted)
    stop = min(stop, len(this_epoch))

    interrupted = make()
    interrupted.set_epoch(epoch)
    iterator = iter(interrupted)
    consumed = [next(iterator) for _ in range(stop)]
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert state["position"] == stop

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)  # a trainer's per-epoch call keeps the pending resume
    assert consumed + list(resumed) == this_epoch
    assert list(resumed) == next_epoch  # and the run goes on exactly as uninterrupted


def test_state_after_a_finished_epoch_starts_the_next_one():
    labels = labels_from_sizes([6, 17, 3, 9, 25])
    sampler = PKSampler(labels, p=2, k=3, seed=4)
    list(sampler)
    state = sampler.state_dict()
    assert state["epoch"] == 1 and state["position"] == 0
    resumed = PKSampler(labels, p=2, k=3, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert list(resumed) == list(sampler)


# ----------------------------------------------------------------------------------------------
# PKSampler: DataLoader
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_batches(num_workers: int):
    labels = labels_from_sizes([6, 17, 3, 9, 25, 11, 4, 8])
    dataset = TensorDataset(torch.arange(len(labels)).double(), torch.from_numpy(labels))
    sampler = PKSampler(labels, p=4, k=4, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)
    seen = list(loader)
    assert len(loader) == len(sampler) == len(seen)
    sampler.set_epoch(0)
    for (x, y), batch in zip(seen, sampler, strict=True):
        assert x.long().tolist() == batch
        assert_pk_batch(x.long().tolist(), labels, 4, 4)
        assert (y.view(4, 4) == y.view(4, 4)[:, :1]).all()


# ----------------------------------------------------------------------------------------------
# PKSampler: bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        (np.zeros((4, 2), dtype=np.int64), {}, "1-D"),
        ([0.0, 1.0, 2.0, 3.0], {}, "integers"),
        (np.array([0, 1, 2, 3], dtype=np.float32), {}, "integers"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), {}, "integer dtype"),
        (torch.tensor([True, False, True, False]), {}, "integer dtype"),
        (np.array([True, False]), {}, "integers"),
        (["a", "b"], {}, "integers"),
        ([], {}, "empty"),
        ([0, 0, 1, 1], {}, "2 distinct classes, fewer than p=3"),
        ([0, 1, 2, 3], {"p": 0}, "p must be >= 1"),
        ([0, 1, 2, 3], {"k": 0}, "k must be >= 1"),
        ([0, 1, 2, 3], {"p": 2.5}, "p must be an integer"),
        ([0, 1, 2, 3], {"k": True}, "k must be an integer"),
        ([0, 1, 2, 3], {"seed": -1}, "seed must be >= 0"),
        ([0, 1, 2, 3], {"p": 2, "rank": 2, "world_size": 2}, "rank must be < world_size"),
        ([0, 1, 2, 3], {"p": 2, "rank": -1, "world_size": 2}, "rank must be >= 0"),
        ([0, 1, 2, 3], {"world_size": 0, "rank": 0}, "world_size must be >= 1"),
        ([0, 1, 2, 3], {"p": 3, "world_size": 2, "rank": 0}, "multiple of world_size"),
    ],
)
def test_bad_arguments_raise_value_error(labels, kwargs, match):
    arguments = {"p": 3, "k": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        PKSampler(labels, **arguments)


def test_bad_state_raises_value_error():
    sampler = PKSampler(labels_from_sizes([6, 17, 3, 9, 25]), p=2, k=3)
    other = PKSampler(labels_from_sizes([6, 17, 3, 9, 25]), p=2, k=2).state_dict()
    with pytest.raises(ValueError, match="labels, p or k differ"):
        sampler.load_state_dict(other)
    with pytest.raises(ValueError, match="missing"):
        sampler.load_state_dict({"epoch": 0, "position": 0})
    with pytest.raises(ValueError, match="past the epoch"):
        sampler.load_state_dict(sampler.state_dict() | {"position": len(sampler) + 1})
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        sampler.set_epoch(-1)


# ----------------------------------------------------------------------------------------------
# MPerClassSampler: PML 2.9.0 parity
# ----------------------------------------------------------------------------------------------

MPER_LABELS = labels_from_sizes([1, 2, 3, 4, 5, 6, 7, 8, 9, 30, 12, 2])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"m": 4, "length_before_new_iter": 2000},
        {"m": 1, "length_before_new_iter": 1000},
        {"m": 4, "batch_size": 12, "length_before_new_iter": 2000},
        {"m": 3, "batch_size": 36, "length_before_new_iter": 1000},
        {"m": 2, "batch_size": 8, "length_before_new_iter": 100},
        {"m": 3, "batch_size": 9, "length_before_new_iter": 50},
        {"m": 5, "length_before_new_iter": 250},
        {"m": 5, "length_before_new_iter": 60},  # one pass exactly fills it
    ],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_mperclass_same_indices_as_pml(kwargs, as_tensor: bool):
    labels = torch.from_numpy(MPER_LABELS) if as_tensor else MPER_LABELS
    np.random.seed(123)  # noqa: NPY002 (both samplers use the global state)
    theirs = PMLMPerClassSampler(labels, **kwargs)
    their_runs = [[int(i) for i in theirs] for _ in range(2)]
    np.random.seed(123)  # noqa: NPY002 (both samplers use the global state)
    ours = MPerClassSampler(labels, **kwargs)
    our_runs = [list(ours) for _ in range(2)]
    assert len(ours) == len(theirs) == len(our_runs[0])
    assert our_runs == their_runs  # two iterations: the class order carries over as in PML
    assert ours.list_size == theirs.list_size
    assert ours.length_of_single_pass == theirs.length_of_single_pass
    assert ours.calculate_num_iters() == theirs.calculate_num_iters()


@pytest.mark.parametrize("kwargs", [{"m": 4}, {"m": 3, "batch_size": 36}, {"m": 7}])
def test_mperclass_default_length_as_pml(kwargs):
    ours = MPerClassSampler(MPER_LABELS, **kwargs)
    assert len(ours) == len(PMLMPerClassSampler(MPER_LABELS, **kwargs))
    assert len(ours) == 100000 - 100000 % (12 * kwargs["m"] if "batch_size" not in kwargs else 36)


def test_mperclass_yields_len_indices_where_pml_overruns():
    # m * num_classes = 60 > length_before_new_iter = 25: PML yields a whole pass anyway
    np.random.seed(0)  # noqa: NPY002
    theirs = [int(i) for i in PMLMPerClassSampler(MPER_LABELS, m=5, length_before_new_iter=25)]
    np.random.seed(0)  # noqa: NPY002
    ours = MPerClassSampler(MPER_LABELS, m=5, length_before_new_iter=25)
    assert len(theirs) == 60
    assert len(ours) == 25 == len(PMLMPerClassSampler(MPER_LABELS, m=5, length_before_new_iter=25))
    assert list(ours) == theirs[:25]


@settings(max_examples=25, deadline=None)
@given(sizes=sizes_strategy, data=st.data())
def test_mperclass_batches_hold_m_per_class(sizes: list[int], data: st.DataObject):
    labels = labels_from_sizes(sizes)
    m = data.draw(st.integers(1, 4), label="m")
    classes_per_batch = data.draw(st.integers(1, len(sizes)), label="classes per batch")
    batch_size = m * classes_per_batch
    length = data.draw(st.integers(batch_size, 5 * batch_size), label="length")
    sampler = MPerClassSampler(labels, m=m, batch_size=batch_size, length_before_new_iter=length)
    indices = list(sampler)
    assert len(indices) == len(sampler) == length - length % batch_size
    for start in range(0, len(indices), batch_size):
        groups = labels[indices[start : start + batch_size]].reshape(classes_per_batch, m)
        assert (groups == groups[:, :1]).all()
        assert len(set(groups[:, 0].tolist())) == classes_per_batch


def test_mperclass_in_a_dataloader():
    dataset = TensorDataset(torch.from_numpy(MPER_LABELS))
    sampler = MPerClassSampler(MPER_LABELS, m=4, batch_size=16, length_before_new_iter=160)
    loader = DataLoader(dataset, batch_size=16, sampler=sampler)
    batches = [y for (y,) in loader]
    assert len(batches) == len(loader) == 10
    for y in batches:
        assert torch.unique(y, return_counts=True)[1].tolist() == [4] * 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"m": 4, "batch_size": 10}, "m=4 must divide batch_size=10"),
        ({"m": 4, "batch_size": 52}, "must be >= batch_size=52"),
        ({"m": 4, "batch_size": 16, "length_before_new_iter": 8}, "length_before_new_iter=8"),
        ({"m": 0}, "m must be >= 1"),
        ({"m": 2, "length_before_new_iter": 0}, "length_before_new_iter must be >= 1"),
    ],
)
def test_mperclass_bad_arguments_raise_value_error_where_pml_asserts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MPerClassSampler(MPER_LABELS, **kwargs)
    if "batch_size" in kwargs:
        with pytest.raises(AssertionError):
            PMLMPerClassSampler(MPER_LABELS, **kwargs)
