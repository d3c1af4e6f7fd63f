"""CrossBatchMemory: PML parity over consecutive steps, every pair-based loss against an explicit
reference (a hand-kept queue and the loss's public API with an explicit index tuple), the queue
itself, self-pairs, enqueue_mask, state_dict, and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import Tensor

from deepmetric import losses, miners
from deepmetric.losses.base import BaseMetricLossFunction
from deepmetric.losses.contrastive import ContrastiveLoss
from deepmetric.losses.cross_batch_memory import CrossBatchMemory, loss_excluding_self
from deepmetric.losses.multi_similarity import MultiSimilarityLoss
from deepmetric.losses.ntxent import NTXentLoss
from deepmetric.losses.proxy import ClassWeightLoss
from deepmetric.losses.triplet import TripletMarginLoss
from deepmetric.miners import BatchHardMiner, MultiSimilarityMiner

DIM = 6


def _steps(n_steps: int, batch: int, n_classes: int = 3, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        emb = torch.randn(batch, DIM, generator=g, dtype=torch.float64).to(dtype)
        yield emb, torch.randint(0, n_classes, (batch,), generator=g)


def _value_and_grad(fn, emb: Tensor, *args, **kwargs) -> tuple[float, Tensor]:
    emb = emb.detach().clone().requires_grad_(True)
    loss = fn(emb, *args, **kwargs)
    loss.backward()
    assert emb.grad is not None
    return loss.item(), emb.grad


def _assert_same(ours: tuple[float, Tensor], theirs: tuple[float, Tensor], rtol=1e-5) -> None:
    assert ours[0] == pytest.approx(theirs[0], rel=rtol, abs=1e-9)
    torch.testing.assert_close(ours[1], theirs[1], rtol=rtol * 10, atol=1e-8)


class ReferenceQueue:
    """A FIFO memory kept by hand: the slots a batch goes to, and the occupied rows."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.emb = torch.zeros(size, DIM, dtype=torch.float64)
        self.labels = torch.zeros(size, dtype=torch.long)
        self.written = 0  # rows written so far, ever

    def push(self, emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        slots = [(self.written + i) % self.size for i in range(len(emb))]
        for row, slot in enumerate(slots):
            self.emb[slot] = emb[row].detach()
            self.labels[slot] = labels[row]
        self.written += len(emb)
        used = min(self.written, self.size)
        return self.emb[:used].clone(), self.labels[:used].clone(), slots


def _self_free_pairs(labels: Tensor, ref_labels: Tensor, slots: list[int] | None) -> tuple:
    """Every (query, memory) pair as an explicit tuple; query i's own slot is not a positive."""
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    positive = same.clone()
    if slots is not None:
        for i, slot in enumerate(slots):
            positive[i, slot] = False
    a1, p = torch.where(positive)
    a2, n = torch.where(~same)
    return a1, p, a2, n


# ---------------------------------------------------------------------------------------------
# Parity with PML's CrossBatchMemory
# ---------------------------------------------------------------------------------------------

PML_CASES = [
    ("ContrastiveLoss", {}),
    ("TripletMarginLoss", {"margin": 0.3}),
    ("MultiSimilarityLoss", {}),
    ("NTXentLoss", {"temperature": 0.5}),
    ("GeneralizedLiftedStructureLoss", {}),
    ("CircleLoss", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), PML_CASES)
def test_parity_with_pml_over_consecutive_steps(name: str, kwargs: dict) -> None:
    # memory 20, batches of 8: the queue wraps around on the third step
    ours = CrossBatchMemory(getattr(losses, name)(**kwargs), DIM, memory_size=20).double()
    theirs = pml_losses.CrossBatchMemory(getattr(pml_losses, name)(**kwargs), DIM, 20)
    for emb, labels in _steps(5, 8):
        _assert_same(_value_and_grad(ours, emb, labels), _value_and_grad(theirs, emb, labels))
    assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled == theirs.has_been_filled
    torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory)
    assert torch.equal(ours.label_memory, theirs.label_memory)


def test_parity_with_pml_in_float32() -> None:
    ours = CrossBatchMemory(TripletMarginLoss(margin=0.3), DIM, memory_size=20)
    theirs = pml_losses.CrossBatchMemory(pml_losses.TripletMarginLoss(margin=0.3), DIM, 20)
    for emb, labels in _steps(4, 8, dtype=torch.float32):
        _assert_same(_value_and_grad(ours, emb, labels), _value_and_grad(theirs, emb, labels))


@pytest.mark.parametrize(
    ("loss_name", "miner_name"),
    [("TripletMarginLoss", "MultiSimilarityMiner"), ("ContrastiveLoss", "BatchHardMiner")],
)
def test_parity_with_pml_with_a_miner(loss_name: str, miner_name: str) -> None:
    # every query has another positive in the memory, so excluding its own copy before mining
    # (here) or after (PML) selects the same tuples
    miner_kwargs = {"epsilon": 0.2} if miner_name == "MultiSimilarityMiner" else {}
    ours = CrossBatchMemory(
        getattr(losses, loss_name)(), DIM, 24, miner=getattr(miners, miner_name)(**miner_kwargs)
    ).double()
    theirs = pml_losses.CrossBatchMemory(
        getattr(pml_losses, loss_name)(), DIM, 24, getattr(pml_miners, miner_name)(**miner_kwargs)
    )
    for emb, labels in _steps(5, 8):
        labels = torch.arange(4).repeat(2)  # two per class in every batch
        _assert_same(_value_and_grad(ours, emb, labels), _value_and_grad(theirs, emb, labels))
        assert ours.miner is not None


def test_parity_with_pml_with_an_enqueue_mask() -> None:
    # MoCo-style: the second half (keys) is enqueued, the first half (queries) is compared
    ours = CrossBatchMemory(NTXentLoss(temperature=0.2), DIM, memory_size=20).double()
    theirs = pml_losses.CrossBatchMemory(pml_losses.NTXentLoss(temperature=0.2), DIM, 20)
    mask = torch.tensor([False] * 4 + [True] * 4)
    for step, (emb, _) in enumerate(_steps(6, 8)):
        labels = torch.arange(4).repeat(2) + 4 * step
        _assert_same(
            _value_and_grad(ours, emb, labels, enqueue_mask=mask),
            _value_and_grad(theirs, emb, labels, enqueue_mask=mask),
        )
    assert ours.queue_idx == theirs.queue_idx


def test_user_indices_tuple_is_added_to_the_memory_pairs() -> None:
    loss = ContrastiveLoss(pos_margin=0.1, neg_margin=1.5)
    ours = CrossBatchMemory(loss, DIM, memory_size=20).double()
    theirs = pml_losses.CrossBatchMemory(
        pml_losses.ContrastiveLoss(pos_margin=0.1, neg_margin=1.5), DIM, 20
    )
    queue = ReferenceQueue(20)
    for step, (emb, labels) in enumerate(_steps(3, 8)):
        user = miners.BatchHardMiner()(emb, labels)  # indexes the batch itself
        got = _value_and_grad(ours, emb, labels, user)
        mem_emb, mem_labels, slots = queue.push(emb, labels)
        if step == 0:  # the batch sits at slots 0..7: PML's unmapped indices agree
            _assert_same(got, _value_and_grad(theirs, emb, labels, user))
        # every self-free pair, then the user's triplets as pairs, partners moved to their slots
        a, p, n = user
        slot = torch.tensor(slots)
        extra = (a, slot[p], a, slot[n])
        tuple_ = tuple(
            torch.cat([x, y])
            for x, y in zip(_self_free_pairs(labels, mem_labels, slots), extra, strict=True)
        )
        _assert_same(got, _value_and_grad(loss, emb, labels, tuple_, mem_emb, mem_labels))


# ---------------------------------------------------------------------------------------------
# Every pair-based loss of the library
# ---------------------------------------------------------------------------------------------

REQUIRED_ARGS = {"RankedListLoss": {"margin": 0.4, "Tn": 1.0}}


def _pair_based_loss_names() -> list[str]:
    names = []
    for name in losses.__all__:
        cls = getattr(losses, name)
        if not isinstance(cls, type) or not issubclass(cls, BaseMetricLossFunction):
            continue  # e.g. CrossBatchMemory itself
        if cls is BaseMetricLossFunction or issubclass(cls, ClassWeightLoss):
            continue  # no reference set: refused, see the next test
        if name == "NCALoss":
            continue  # a tuple weights its queries rather than choosing pairs: see test_nca.py
        names.append(name)
    return names


@pytest.mark.parametrize("name", _pair_based_loss_names())
def test_every_pair_based_loss_against_an_explicit_queue(name: str) -> None:
    """CrossBatchMemory(loss) == loss(batch, explicit self-free pairs, ref_emb=hand-kept queue)."""
    loss = getattr(losses, name)(**REQUIRED_ARGS.get(name, {}))
    cbm = CrossBatchMemory(loss, DIM, memory_size=20).double()
    queue = ReferenceQueue(20)
    checked = 0
    for emb, labels in _steps(4, 8, n_classes=3, seed=7):
        got = _value_and_grad(cbm, emb, labels)
        mem_emb, mem_labels, slots = queue.push(emb, labels)
        pairs = _self_free_pairs(labels, mem_labels, slots)
        expected = _value_and_grad(loss, emb, labels, pairs, mem_emb, mem_labels)
        _assert_same(got, expected)
        assert math.isfinite(got[0]) and bool(torch.isfinite(got[1]).all())
        checked += got[0] != 0
    assert checked > 0


def test_proxy_and_classification_losses_are_refused() -> None:
    refused = 0
    for name in losses.__all__:
        cls = getattr(losses, name)
        if (
            isinstance(cls, type)
            and issubclass(cls, ClassWeightLoss)
            and cls is not ClassWeightLoss
        ):
            with pytest.raises(ValueError, match="ref_emb"):
                CrossBatchMemory(cls(num_classes=3, embedding_size=DIM), DIM)
            refused += 1
    assert refused >= 7


def _triplet_loop(queries, labels, refs, ref_labels, slots, margin) -> Tensor:
    """Slow swap-triplet loss: Euclidean distance of L2-normalised vectors, mean over the triplets
    with a positive loss (AvgNonZeroReducer)."""
    q = torch.nn.functional.normalize(queries, dim=1)
    r = torch.nn.functional.normalize(refs, dim=1)
    active = []
    for a, p, n in itertools.product(range(len(q)), range(len(r)), range(len(r))):
        if ref_labels[p] != labels[a] or p == slots[a] or ref_labels[n] == labels[a]:
            continue
        an = torch.minimum((q[a] - r[n]).norm(), (r[p] - r[n]).norm())
        value = torch.relu((q[a] - r[p]).norm() - an + margin)
        if value > 0:
            active.append(value)
    return torch.stack(active).mean() if active else (queries * 0).sum()


def test_triplet_swap_against_a_loop() -> None:
    """PML issue 748: with swap=True, PML indexes the batch×memory matrix with two memory indices
    (an IndexError, or a wrong distance); here the positive-negative distance is between
    memory rows."""
    cbm = CrossBatchMemory(TripletMarginLoss(margin=0.4, swap=True), DIM, 12).double()
    queue = ReferenceQueue(12)
    for emb, labels in _steps(4, 5, n_classes=2, seed=3):
        got = _value_and_grad(cbm, emb, labels)
        mem_emb, mem_labels, slots = queue.push(emb, labels)
        expected = _value_and_grad(_triplet_loop, emb, labels, mem_emb, mem_labels, slots, 0.4)
        _assert_same(got, expected)


# ---------------------------------------------------------------------------------------------
# The queue, self-pairs and enqueue_mask
# ---------------------------------------------------------------------------------------------


def test_queue_contents_and_position() -> None:
    cbm = CrossBatchMemory(ContrastiveLoss(), DIM, memory_size=10).double()
    queue = ReferenceQueue(10)
    for step, (emb, labels) in enumerate(_steps(6, 4)):
        cbm(emb, labels)
        mem_emb, mem_labels, _ = queue.push(emb, labels)
        assert cbm.queue_idx == (4 * (step + 1)) % 10
        assert cbm.has_been_filled == (4 * (step + 1) >= 10)
        assert torch.equal(cbm.embedding_memory[: len(mem_emb)], mem_emb)
        assert torch.equal(cbm.label_memory[: len(mem_labels)], mem_labels)
    cbm.reset_queue()
    assert cbm.queue_idx == 0 and not cbm.has_been_filled
    assert not cbm.embedding_memory.any()


def test_own_copy_is_not_a_positive_closed_form() -> None:
    """Step 1 stores a (class 0) and b (class 1); step 2 sends c (class 0) and d (class 1).
    Positive pairs are (c, a) and (d, b) only; c is not paired with its own copy."""
    a, b, c, d = (torch.tensor([[x, y]], dtype=torch.float64) for x, y in
                  ((0.0, 0.0), (3.0, 0.0), (0.0, 0.5), (3.0, 2.0)))  # fmt: skip
    loss = ContrastiveLoss(pos_margin=0, neg_margin=10, distance=_plain_euclidean())
    cbm = CrossBatchMemory(loss, 2, memory_size=8).double()
    first = cbm(torch.cat([a, b]), torch.tensor([0, 1]))
    assert first.item() == pytest.approx(10 - 3)  # only the negative pairs (a, b) and (b, a)
    value = cbm(torch.cat([c, d]), torch.tensor([0, 1])).item()
    dist = lambda x, y: float((x - y).norm())  # noqa: E731
    pos = [dist(c, a), dist(d, b)]
    neg = [10 - dist(c, b), 10 - dist(c, d), 10 - dist(d, a), 10 - dist(d, c)]
    assert value == pytest.approx(sum(pos) / 2 + sum(neg) / 4, rel=1e-12)


def _plain_euclidean():
    from deepmetric.distances import LpDistance

    return LpDistance(normalize_embeddings=False)


@pytest.mark.parametrize(
    "name", ["TripletMarginLoss", "NTXentLoss", "NPairsLoss", "ContrastiveLoss"]
)
def test_a_first_batch_of_distinct_classes_has_no_positive(name: str) -> None:
    """Each sample's only same-label reference is its own copy: no positive pair at all."""
    cbm = CrossBatchMemory(getattr(losses, name)(), DIM, memory_size=16)
    emb = torch.randn(6, DIM, requires_grad=True)
    loss = cbm(emb, torch.arange(6))
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    if name == "ContrastiveLoss":  # its negative pairs remain, nothing pulls together
        plain = ContrastiveLoss()(emb.detach(), torch.arange(6))
        assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    else:  # losses made of positive pairs (or triplets): exactly zero, zero gradient
        assert loss.item() == 0 and not emb.grad.any()


def test_enqueue_mask_enqueues_masked_rows_and_queries_the_others() -> None:
    loss = MultiSimilarityLoss()
    cbm = CrossBatchMemory(loss, DIM, memory_size=12).double()
    queue = ReferenceQueue(12)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        emb = torch.randn(6, DIM, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 2, (6,), generator=g)
        mask = torch.rand(6, generator=g) < 0.5
        got = _value_and_grad(cbm, emb, labels, enqueue_mask=mask)
        mem_emb, mem_labels, _ = queue.push(emb[mask], labels[mask])
        if len(mem_emb) == 0 or bool(mask.all()):
            assert got[0] == 0 and not got[1].any()
            continue

        def queries_only(e: Tensor, m=mask, y=labels, r=mem_emb, ry=mem_labels) -> Tensor:
            return loss(e[~m], y[~m], None, r, ry)

        _assert_same(got, _value_and_grad(queries_only, emb))
        assert not got[1][mask].any()  # enqueued rows are references only: no gradient
        assert cbm.queue_idx == queue.written % 12


def test_an_empty_enqueue_does_not_fill_the_queue() -> None:
    # PML marks the queue as full after an empty enqueue, then compares with 1024 zero rows
    cbm = CrossBatchMemory(ContrastiveLoss(), DIM, memory_size=8)
    loss = cbm(torch.randn(3, DIM), torch.arange(3), enqueue_mask=torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0 and cbm.queue_idx == 0 and not cbm.has_been_filled


def test_two_forwards_then_one_backward() -> None:
    """Gradient accumulation: the second call updates the memory before the first backward."""
    cbm = CrossBatchMemory(TripletMarginLoss(margin=0.3), DIM, memory_size=16).double()
    (e1, l1), (e2, l2) = _steps(2, 6, seed=9)
    x1, x2 = e1.clone().requires_grad_(), e2.clone().requires_grad_()
    total = cbm(x1, l1) + cbm(x2, l2)
    total.backward()
    one_at_a_time = CrossBatchMemory(TripletMarginLoss(margin=0.3), DIM, 16).double()
    v1, g1 = _value_and_grad(one_at_a_time, e1, l1)
    v2, g2 = _value_and_grad(one_at_a_time, e2, l2)
    assert total.item() == pytest.approx(v1 + v2, rel=1e-12) and v1 > 0 and v2 > 0
    torch.testing.assert_close(x1.grad, g1)
    torch.testing.assert_close(x2.grad, g2)


# ---------------------------------------------------------------------------------------------
# Buffers: state_dict, dtype and device
# ---------------------------------------------------------------------------------------------


def test_state_dict_round_trip_resumes_identically() -> None:
    batches = list(_steps(6, 5))
    cbm = CrossBatchMemory(MultiSimilarityLoss(), DIM, memory_size=12).double()
    for emb, labels in batches[:3]:
        cbm(emb, labels)
    state = cbm.state_dict()
    assert {"embedding_memory", "label_memory", "queue_position", "queue_full"} <= set(state)
    resumed = CrossBatchMemory(MultiSimilarityLoss(), DIM, memory_size=12).double()
    resumed.load_state_dict(state)
    assert resumed.queue_idx == cbm.queue_idx and resumed.has_been_filled == cbm.has_been_filled
    for emb, labels in batches[3:]:
        assert resumed(emb, labels).item() == cbm(emb, labels).item()


def test_memory_dtype_and_device() -> None:
    cbm = CrossBatchMemory(ContrastiveLoss(), DIM, memory_size=8)
    assert cbm.embedding_memory.dtype == torch.float32
    assert cbm.double().embedding_memory.dtype == torch.float64
    emb = torch.randn(4, DIM)  # float32 embeddings with a float64 memory
    loss = cbm(emb, torch.tensor([0, 0, 1, 1]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.equal(cbm.embedding_memory[:4], emb.double())
    moved = cbm.to(torch.device("cpu"))
    assert moved.embedding_memory.device.type == "cpu" and moved.label_memory.dtype == torch.long


# ---------------------------------------------------------------------------------------------
# Helpers and bad input
# ---------------------------------------------------------------------------------------------


def test_loss_excluding_self_equals_the_plain_loss_on_the_batch_itself() -> None:
    """References = the batch itself, each query's copy excluded: the ordinary loss."""
    emb, labels = next(_steps(1, 12, n_classes=3, seed=11))
    for loss in (TripletMarginLoss(margin=0.2), NTXentLoss(), ContrastiveLoss()):
        own = torch.arange(12)
        excluded = _value_and_grad(
            lambda e, f=loss, i=own: loss_excluding_self(f, e, labels, None, e, labels, i), emb
        )
        _assert_same(excluded, _value_and_grad(loss, emb, labels), rtol=1e-9)


@pytest.mark.parametrize("name", _pair_based_loss_names())
def test_loss_excluding_self_against_explicit_pairs_with_odd_copies(name: str) -> None:
    """Separate references holding copies of some queries, some of them under another label
    (which no caller makes, but the pairs must then follow the masks' rule: only a same-label
    copy is dropped, and only from the positives), checked against the loss given every pair
    explicitly, built by a loop."""
    loss = getattr(losses, name)(**REQUIRED_ARGS.get(name, {}))
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (10,), generator=g)
    ref_labels = torch.randint(0, 3, (16,), generator=g)
    self_index = torch.tensor([3, -1, 7, 0, -1, 12, 15, 9, -1, 1])
    ref_labels[self_index[:5].clamp_min(0)] = labels[:5]  # same-label copies (and two -1s)
    ref_labels[torch.tensor([15, 9])] = (labels[torch.tensor([6, 7])] + 1) % 3  # other labels
    emb = torch.randn(10, DIM, generator=g, dtype=torch.float64)
    ref = torch.randn(16, DIM, generator=g, dtype=torch.float64)
    pos, neg = [], []
    for i in range(10):
        for j in range(16):
            if labels[i] != ref_labels[j]:
                neg.append((i, j))
            elif int(self_index[i]) != j:
                pos.append((i, j))
    a1, p = torch.tensor(pos).T
    a2, n = torch.tensor(neg).T
    got = _value_and_grad(
        lambda e: loss_excluding_self(loss, e, labels, None, ref, ref_labels, self_index), emb
    )
    expected = _value_and_grad(loss, emb, labels, (a1, p, a2, n), ref, ref_labels)
    _assert_same(got, expected, rtol=1e-9)
    assert got[0] != 0


def test_bad_input_raises_and_leaves_the_memory_unchanged() -> None:
    cbm = CrossBatchMemory(ContrastiveLoss(), DIM, memory_size=4)
    emb, labels = torch.randn(3, DIM), torch.arange(3)
    cbm(emb, labels)
    before = cbm.state_dict()
    bad_calls = [
        ((torch.randn(3, DIM + 1), labels), {}, "embedding_size"),
        ((torch.randn(5, DIM), torch.arange(5)), {}, "memory of size 4"),
        ((emb, labels), {"enqueue_mask": torch.ones(3)}, "boolean"),
        ((emb, labels), {"enqueue_mask": torch.ones(2, dtype=torch.bool)}, "shape"),
        ((emb, labels, BatchHardMiner()(emb, labels)), {"enqueue_mask": torch.ones(3).bool()},
         "mutually exclusive"),
        ((emb, None), {}, "labels"),
        ((emb.masked_fill(torch.eye(3, DIM).bool(), float("nan")), labels), {}, "NaN"),
        ((emb, labels, (torch.tensor([0]), torch.tensor([7]), torch.tensor([1]))), {}, "outside"),
    ]  # fmt: skip
    for args, kwargs, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            cbm(*args, **kwargs)
        for key, value in cbm.state_dict().items():
            assert torch.equal(value, before[key])
    with pytest.raises(ValueError, match="memory_size"):
        CrossBatchMemory(ContrastiveLoss(), DIM, memory_size=0)
    with pytest.raises(ValueError, match="embedding_size"):
        CrossBatchMemory(ContrastiveLoss(), 0)
    with pytest.raises(ValueError, match="miner"):
        CrossBatchMemory(ContrastiveLoss(), DIM, miner=ContrastiveLoss())  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 64),
    n_classes=st.integers(1, 64),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    duplicate=st.booleans(),
    name=st.sampled_from(["ContrastiveLoss", "TripletMarginLoss", "MultiSimilarityLoss",
                          "NTXentLoss", "LiftedStructureLoss", "MarginLoss"]),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_random_batches_give_finite_values_and_gradients(
    batch: int, n_classes: int, scale: float, duplicate: bool, name: str, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    cbm = CrossBatchMemory(getattr(losses, name)(), DIM, memory_size=64).double()
    miner = MultiSimilarityMiner() if seed % 2 else None
    if miner is not None:
        cbm = CrossBatchMemory(getattr(losses, name)(), DIM, memory_size=64, miner=miner).double()
    for _ in range(2):
        emb = torch.randn(batch, DIM, generator=g, dtype=torch.float64) * scale
        if duplicate:
            emb[batch // 2 :] = emb[0]
        labels = torch.randint(0, n_classes, (batch,), generator=g)
        value, grad = _value_and_grad(cbm, emb, labels)
        assert math.isfinite(value) and bool(torch.isfinite(grad).all())


def test_pml_state_dict_loads_strictly_and_fills_the_memory() -> None:
    g = torch.Generator().manual_seed(5)
    theirs = pml_losses.CrossBatchMemory(
        pml_losses.ContrastiveLoss(), embedding_size=8, memory_size=16
    )
    theirs(torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g))
    ours = CrossBatchMemory(ContrastiveLoss(), embedding_size=8, memory_size=16)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory)
    torch.testing.assert_close(ours.label_memory, theirs.label_memory)
    assert ours.queue_idx == 0 and not ours.has_been_filled  # PML's position is not saved
    # our own state_dict still round-trips the position, and a missing memory is an error
    ours(torch.randn(5, 8, generator=g), torch.randint(0, 3, (5,), generator=g))
    again = CrossBatchMemory(ContrastiveLoss(), embedding_size=8, memory_size=16)
    again.load_state_dict(ours.state_dict(), strict=True)
    assert again.queue_idx == 5
    with pytest.raises(RuntimeError, match="queue_position"):
        again.load_state_dict({"label_memory": ours.label_memory}, strict=True)
