"""DistributedLossWrapper / DistributedMinerWrapper with real processes.

2 and 3 CPU processes (gloo, TCP on 127.0.0.1 only), started by the tests, each holding a shard of
one global batch (shards of different sizes): under DDP, the loss value and the gradients of a
small model (and of the loss's own parameters) equal those of one process on the concatenated
batch. Also: the efficient mode against its documented gradient, CrossBatchMemory across
processes, consistent errors on every rank, world size 1 and no process group, and a dead or
stalled process making the others fail within the process-group timeout instead of hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from deepmetric.distributed import DistributedLossWrapper, DistributedMinerWrapper, scale_gradient
from deepmetric.losses.contrastive import ContrastiveLoss
from deepmetric.losses.cross_batch_memory import CrossBatchMemory
from deepmetric.losses.multi_similarity import MultiSimilarityLoss
from deepmetric.losses.ntxent import NTXentLoss
from deepmetric.losses.proxy import ProxyAnchorLoss
from deepmetric.losses.softmax_margin import ArcFaceLoss
from deepmetric.losses.triplet import TripletMarginLoss
from deepmetric.miners import BatchHardMiner, MultiSimilarityMiner
from tests.parity import pk_labels

N_CLASSES, PER_CLASS, IN_DIM, EMB_DIM = 6, 4, 5, 4
# shard sizes of the 24-sample global batch for each world size (deliberately unequal)
SHARDS = {1: [24], 2: [10, 14], 3: [7, 9, 8]}
CBM_STEPS, CBM_MEMORY = 3, 40


# ---------------------------------------------------------------------------------------------
# Data, model and losses shared by the processes and the single-process reference
# ---------------------------------------------------------------------------------------------


def _global_batch(step: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(N_CLASSES * PER_CLASS, IN_DIM, generator=g, dtype=torch.float64)
    labels = pk_labels(N_CLASSES, PER_CLASS)[torch.randperm(len(x), generator=g)]
    return x, labels


def _shard(t: Tensor, sizes: list[int], rank: int) -> Tensor:
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_DIM, 8), nn.Tanh(), nn.Linear(8, EMB_DIM)).double()


def _arcface() -> ArcFaceLoss:
    torch.manual_seed(1)
    return ArcFaceLoss(N_CLASSES, EMB_DIM).double()


def _proxy_anchor() -> ProxyAnchorLoss:
    torch.manual_seed(2)
    return ProxyAnchorLoss(N_CLASSES, EMB_DIM).double()


def _cbm() -> CrossBatchMemory:
    return CrossBatchMemory(ContrastiveLoss(), EMB_DIM, memory_size=CBM_MEMORY).double()


def _grads(module: nn.Module) -> list[Tensor]:
    return [p.grad.detach().clone() for p in module.parameters() if p.grad is not None]


# (name, loss, miner): losses computed on the whole global batch (efficient=False)
PAIR_CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any] | None]] = {
    "triplet+multisimilarity": (lambda: TripletMarginLoss(margin=0.1), MultiSimilarityMiner),
    "contrastive+batchhard": (ContrastiveLoss, BatchHardMiner),
    "ntxent": (lambda: NTXentLoss(temperature=0.5), None),
}
PROXY_CASES: dict[str, Callable[[], nn.Module]] = {
    "arcface": _arcface,
    "proxyanchor": _proxy_anchor,
}


# ---------------------------------------------------------------------------------------------
# What each process runs
# ---------------------------------------------------------------------------------------------


def _equivalence_on_rank(rank: int, world: int) -> dict[str, Any]:
    sizes = SHARDS[world]
    x, labels = _global_batch()
    xs, ys = _shard(x, sizes, rank), _shard(labels, sizes, rank)
    out: dict[str, Any] = {}

    for name, (make_loss, make_miner) in PAIR_CASES.items():
        model = DDP(_model())
        loss_fn = DistributedLossWrapper(make_loss())
        emb = model(xs)
        indices = None
        if make_miner is not None:
            indices = DistributedMinerWrapper(make_miner())(emb, ys)
        loss = loss_fn(emb, ys, indices)
        loss.backward()
        out[name] = {"loss": loss.item(), "grads": _grads(model), "indices": indices}

    # loss parameters: ArcFace's loss wrapped in DDP (the documented usage), ProxyAnchor not
    for name, make_loss in PROXY_CASES.items():
        model = DDP(_model())
        wrapper = DistributedLossWrapper(make_loss())
        loss_fn: nn.Module = DDP(wrapper) if name == "arcface" else wrapper
        loss = loss_fn(model(xs), ys)
        loss.backward()
        out[name] = {"loss": loss.item(), "grads": _grads(model), "loss_grads": _grads(wrapper)}

    # efficient: this rank's queries against the gathered batch
    model = DDP(_model())
    loss = DistributedLossWrapper(MultiSimilarityLoss(), efficient=True)(model(xs), ys)
    loss.backward()
    out["efficient"] = {"loss": loss.item(), "grads": _grads(model)}
    model = DDP(_model())
    emb = model(xs)
    indices = DistributedMinerWrapper(BatchHardMiner(), efficient=True)(emb, ys)
    loss = DistributedLossWrapper(TripletMarginLoss(margin=0.1), efficient=True)(emb, ys, indices)
    loss.backward()
    out["efficient+miner"] = {"loss": loss.item(), "grads": _grads(model), "indices": indices}

    # CrossBatchMemory across processes: every rank keeps the memory of the global batches
    model = DDP(_model())
    loss_fn = DistributedLossWrapper(_cbm())
    steps = []
    for step in range(CBM_STEPS):
        x_step, labels_step = _global_batch(step)
        model.zero_grad()
        loss = loss_fn(model(_shard(x_step, sizes, rank)), _shard(labels_step, sizes, rank))
        loss.backward()
        steps.append({"loss": loss.item(), "grads": _grads(model)})
    out["cbm"] = steps

    # bad input on one rank: every rank raises ValueError (none is left waiting)
    loss_fn = DistributedLossWrapper(ContrastiveLoss())
    bad = torch.randn(sizes[rank], EMB_DIM, dtype=torch.float64)
    if rank == 1:
        bad[0, 0] = float("nan")
    wide = torch.randn(sizes[rank], EMB_DIM + rank, dtype=torch.float64)
    out["errors"] = []
    for emb in (bad, wide):
        try:
            loss_fn(emb, ys)
            out["errors"].append(None)
        except ValueError as error:
            out["errors"].append(str(error))
    return out


def _stall_on_rank(rank: int, world: int, out_dir: Path) -> dict[str, Any]:
    """The last rank never joins the collective; the others wait in it."""
    if rank == world - 1:
        (out_dir / "ready").write_text("ready")
        time.sleep(300)  # killed by the test
    emb = torch.randn(3, EMB_DIM)
    return {"loss": DistributedLossWrapper(ContrastiveLoss())(emb, torch.arange(3)).item()}


def _worker(
    rank: int, world: int, port: int, scenario: str, out_dir: str, pg_timeout_s: float
) -> None:
    """Entry point of each spawned process: join the group, run the scenario, save the result
    (or the error) to ``out_dir/<rank>.pt``; exit with 0 on success, 1 on an error."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's traffic on the loopback device
    torch.set_num_threads(1)
    path = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        if scenario == "equivalence":
            result = _equivalence_on_rank(rank, world)
        else:
            result = _stall_on_rank(rank, world, path)
        torch.save(result, path / f"{rank}.pt")
        dist.destroy_process_group()
        code = 0
    except BaseException as error:  # noqa: BLE001 - reported to the test through the file
        (path / f"{rank}.err").write_text(
            f"{type(error).__name__}: {error}\n" + traceback.format_exc()
        )
        code = 1
    os._exit(code)  # no interpreter teardown that could wait on dead peers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _context() -> Any:
    """A forkserver: one clean process imports torch, deepmetric and this module once, then
    forks the workers (fast to start, and never forked from a process with live threads).
    ``torch._dynamo`` is what DDP's constructor imports on first use: slow, so preloaded."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "torch._dynamo"])
    return ctx


def _start(world: int, scenario: str, out_dir: Path, pg_timeout_s: float) -> list[Any]:
    ctx = _context()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world, port, scenario, str(out_dir), pg_timeout_s))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    return procs


def _join(procs: list[Any], deadline: float) -> None:
    """Wait for the processes until ``deadline`` (time.monotonic); kill the ones still running."""
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def _run_equivalence(world: int, out_dir: Path) -> list[dict[str, Any]]:
    procs = _start(world, "equivalence", out_dir, pg_timeout_s=60)
    _join(procs, time.monotonic() + 120)
    errors = {p: (out_dir / f"{r}.err") for r, p in enumerate(procs)}
    for r, p in enumerate(procs):
        assert p.exitcode == 0, errors[p].read_text() if errors[p].exists() else f"rank {r}"
    return [torch.load(out_dir / f"{r}.pt", weights_only=True) for r in range(world)]


# ---------------------------------------------------------------------------------------------
# Single-process references
# ---------------------------------------------------------------------------------------------


def _reference_pair(make_loss: Callable[[], nn.Module], make_miner: Any) -> dict[str, Any]:
    x, labels = _global_batch()
    model = _model()
    emb = model(x)
    indices = make_miner()(emb, labels) if make_miner is not None else None
    loss = make_loss()(emb, labels, indices)
    loss.backward()
    return {"loss": loss.item(), "grads": _grads(model), "indices": indices}


def _reference_proxy(make_loss: Callable[[], nn.Module]) -> dict[str, Any]:
    x, labels = _global_batch()
    model, loss_fn = _model(), make_loss()
    loss = loss_fn(model(x), labels)
    loss.backward()
    return {"loss": loss.item(), "grads": _grads(model), "loss_grads": _grads(loss_fn)}


def _self_free_pairs(
    labels: Tensor, all_labels: Tensor, offset: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every (query, reference) pair of a shard against the global batch, as an explicit index
    tuple, without the query's own copy (reference ``offset + i``)."""
    same = labels.unsqueeze(1) == all_labels.unsqueeze(0)
    own = torch.zeros_like(same)
    own[torch.arange(len(labels)), offset + torch.arange(len(labels))] = True
    a1, p = torch.where(same & ~own)
    a2, n = torch.where(~same)
    return a1, p, a2, n


def _reference_efficient(world: int, with_miner: bool) -> tuple[list[float], dict[str, Any]]:
    """The documented gradient of efficient=True: the average over ranks of each rank's loss, in
    which only that rank's embeddings carry a graph (queries and, for its own queries,
    references)."""
    sizes = SHARDS[world]
    x, labels = _global_batch()
    model = _model()
    emb = model(x)
    values, total, indices = [], torch.zeros((), dtype=torch.float64), []
    for rank in range(world):
        offset = sum(sizes[:rank])
        refs = torch.cat(
            [_shard(emb, sizes, r) if r == rank else _shard(emb, sizes, r).detach()
             for r in range(world)]
        )  # fmt: skip
        queries, query_labels = _shard(emb, sizes, rank), _shard(labels, sizes, rank)
        if with_miner:
            # BatchHardMiner picks per anchor: the global miner's rows of this shard
            a, p, n = BatchHardMiner()(emb.detach(), labels)
            mine = (a >= offset) & (a < offset + sizes[rank])
            tuple_r = (a[mine] - offset, p[mine], n[mine])
            indices.append(tuple_r)
            loss_r = TripletMarginLoss(margin=0.1)(queries, query_labels, tuple_r, refs, labels)
        else:
            tuple_r = _self_free_pairs(query_labels, labels, offset)
            loss_r = MultiSimilarityLoss()(queries, query_labels, tuple_r, refs, labels)
        values.append(loss_r.item())
        total = total + loss_r / world
    total.backward()
    return values, {"grads": _grads(model), "indices": indices}


def _reference_cbm() -> list[dict[str, Any]]:
    model, loss_fn = _model(), _cbm()
    steps = []
    for step in range(CBM_STEPS):
        x, labels = _global_batch(step)
        model.zero_grad()
        loss = loss_fn(model(x), labels)
        loss.backward()
        steps.append({"loss": loss.item(), "grads": _grads(model)})
    return steps


def _assert_close(ours: dict[str, Any], ref: dict[str, Any], key: str = "grads") -> None:
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-9)
    assert len(ours[key]) == len(ref[key]) > 0
    for g, g_ref in zip(ours[key], ref[key], strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Tests with 2 and 3 processes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_equals_one_process_on_the_global_batch(world: int, tmp_path: Path) -> None:
    results = _run_equivalence(world, tmp_path)
    sizes = SHARDS[world]

    for name, (make_loss, make_miner) in PAIR_CASES.items():
        ref = _reference_pair(make_loss, make_miner)
        assert ref["loss"] > 0
        for result in results:
            _assert_close(result[name], ref)
            if make_miner is not None:  # the miner indexes the global batch, on every rank
                for idx, idx_ref in zip(result[name]["indices"], ref["indices"], strict=True):
                    assert torch.equal(idx, idx_ref)

    for name, make_proxy_loss in PROXY_CASES.items():
        ref = _reference_proxy(make_proxy_loss)
        for result in results:
            _assert_close(result[name], ref)
            _assert_close(result[name], ref, key="loss_grads")  # proxies / class weights

    for name, with_miner in (("efficient", False), ("efficient+miner", True)):
        values, ref = _reference_efficient(world, with_miner)
        for rank, result in enumerate(results):
            _assert_close(result[name], {"loss": values[rank], "grads": ref["grads"]})
            if with_miner:
                for idx, idx_ref in zip(result[name]["indices"], ref["indices"][rank], strict=True):
                    assert torch.equal(idx, idx_ref)
        if not with_miner:  # a mean over queries: the shard-weighted mean is the global loss
            weighted = sum(v * s for v, s in zip(values, sizes, strict=True)) / sum(sizes)
            x, labels = _global_batch()
            with torch.no_grad():
                global_loss = MultiSimilarityLoss()(_model()(x), labels).item()
            assert weighted == pytest.approx(global_loss, rel=1e-9)

    ref_steps = _reference_cbm()
    for result in results:
        for ours, ref in zip(result["cbm"], ref_steps, strict=True):
            _assert_close(ours, ref)

    for rank, result in enumerate(results):
        nan_error, width_error = result["errors"]
        assert nan_error is not None and width_error is not None
        assert ("NaN" in nan_error) if rank == 1 else ("rank(s) [1]" in nan_error)
        assert "embedding size" in width_error


@pytest.mark.parametrize("kill", [True, False], ids=["killed", "stalled"])
def test_a_lost_process_makes_the_others_fail_not_hang(kill: bool, tmp_path: Path) -> None:
    world, pg_timeout_s = 3, 5.0
    procs = _start(world, "stall", tmp_path, pg_timeout_s)
    last = procs[-1]
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():  # the last rank has joined the group
            assert time.monotonic() < deadline and last.is_alive(), "processes did not start"
            time.sleep(0.05)
        started = time.monotonic()
        if kill:
            time.sleep(0.5)
            assert last.pid is not None
            os.kill(last.pid, signal.SIGKILL)
        _join(procs[:-1], started + 60)
        elapsed = time.monotonic() - started
    finally:
        last.kill()
        last.join()
    for rank, p in enumerate(procs[:-1]):
        assert p.exitcode == 1, f"rank {rank} exited with {p.exitcode}"
        first_line = (tmp_path / f"{rank}.err").read_text().splitlines()[0]
        # gloo's own error, raised from inside the wrapper's collective
        assert first_line.startswith("RuntimeError") or "DistBackendError" in first_line
        assert "Timed out" in first_line or (kill and "closed by peer" in first_line)
    assert elapsed < 60
    if not kill:  # nobody died: the group's timeout is what ended the wait
        assert elapsed >= pg_timeout_s - 1


# ---------------------------------------------------------------------------------------------
# One process: no process group, and a group of one
# ---------------------------------------------------------------------------------------------


def _single_process_checks() -> None:
    x, labels = _global_batch()
    emb = _model()(x).detach()
    for efficient in (False, True):
        for make_loss, make_miner in PAIR_CASES.values():
            plain = make_loss()(emb, labels, make_miner()(emb, labels) if make_miner else None)
            miner = DistributedMinerWrapper(make_miner(), efficient) if make_miner else None
            wrapped = DistributedLossWrapper(make_loss(), efficient)(
                emb, labels, miner(emb, labels) if miner else None
            )
            assert wrapped.item() == pytest.approx(plain.item(), rel=1e-12)
    cbm, plain_cbm = DistributedLossWrapper(_cbm()), _cbm()
    for step in range(2):
        x, labels = _global_batch(step)
        assert cbm(x[:, :EMB_DIM], labels).item() == plain_cbm(x[:, :EMB_DIM], labels).item()
    assert _arcface()(emb, labels).item() == DistributedLossWrapper(_arcface())(emb, labels).item()


def test_without_a_process_group() -> None:
    assert not dist.is_initialized()
    _single_process_checks()


def test_with_a_process_group_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=30),
    )
    try:
        _single_process_checks()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Construction and the gradient-scaling helper
# ---------------------------------------------------------------------------------------------


def test_scale_gradient_keeps_the_value_and_scales_the_gradient() -> None:
    x = torch.tensor([0.3, -1e-30, 7.0, 0.0], dtype=torch.float64, requires_grad=True)
    y = scale_gradient(x, 3)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).sum().backward()
    assert torch.equal(x.grad, torch.tensor([3.0, 6.0, 9.0, 12.0], dtype=torch.float64))


def test_bad_construction_raises() -> None:
    with pytest.raises(ValueError, match="deepmetric loss"):
        DistributedLossWrapper(nn.MSELoss())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="efficient=True"):
        DistributedLossWrapper(_cbm(), efficient=True)
    with pytest.raises(ValueError, match="ArcFaceLoss"):
        DistributedLossWrapper(_arcface(), efficient=True)
    with pytest.raises(ValueError, match="miner"):
        DistributedMinerWrapper(ContrastiveLoss())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="enqueue_mask"):
        DistributedLossWrapper(ContrastiveLoss())(
            torch.randn(4, 3), torch.arange(4), enqueue_mask=torch.ones(4, dtype=torch.bool)
        )
