"""Distributed training with real processes (gloo on the CPU): the Trainer and the command line.

Two processes started by :func:`deepmetric.distributed.launch.start_processes` (the ``--nproc``
machinery: torchrun's environment variables, ``env://`` process group with a timeout) train on the
built-in digits. Checked against runs of one process in this test process:

* both ranks end with bit-identical weights, equal (1e-5) to the one-process run with the same
  seed: BatchNorm over the global batch, the global-batch loss and miner, augmentations of the
  global batch, sharded validation;
* a run resumes from its checkpoint with another number of processes (2 -> 1 and 1 -> 2,
  stopped in the middle of an epoch) and ends where an uninterrupted run ends (1e-5);
* only rank 0 writes into the run folder (every file opened for writing is recorded with an
  audit hook in each process);
* a process that dies or stalls ends the run with an error naming it, not a hang;
* ``python -m deepmetric train --nproc 2`` through the real entry point.

(BatchNorm over the global batch is tested in tests/distributed/test_sync_batchnorm.py.)

Why the models here have no bias before BatchNorm (nor has SmallConvNet, the command line's
model): such a bias cancels in the normalisation, so its exact gradient is zero and the computed
one is float noise, which Adam (a sign-like step at the start) turns into steps of size ``lr``;
those biases, and the running means that include them, would then differ between any two runs
whose rounding differs (one or two threads in a single process, too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepmetric import data, losses, miners, models
from deepmetric.augment import RandomAffine
from deepmetric.cli import main
from deepmetric.distributed.launch import ProcessFailedError, start_processes
from deepmetric.training import TrainConfig, Trainer, load_checkpoint
from tests.distributed.process_cases import WORLD

EPOCHS = 2


PG_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------------
# The run shared by the processes and the one-process references
# ---------------------------------------------------------------------------------------------


def _digits(classes: range) -> data.ArrayDataset:
    digits = data.load_digits()
    keep = torch.isin(digits.labels, torch.tensor(list(classes)))
    return digits.subset(torch.where(keep)[0])


def _model() -> models.EmbeddingNet:
    """SmallConvNet's layout (conv, BatchNorm, ReLU, pool) without the conv biases (see the
    module docstring)."""
    trunk = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    )
    return models.EmbeddingNet(trunk, 8, embedding_size=16)


def _trainer(run_dir: Path | None, augment: Any = None) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(epochs=EPOCHS, p=4, k=8, lr=3e-3, progress=False)
    return Trainer(
        _model(),
        losses.TripletMarginLoss(margin=0.2),
        _digits(range(6)),
        config,
        val_set=_digits(range(6, 10)),
        miner=miners.MultiSimilarityMiner(),
        augment=RandomAffine(10, 0.2, 0.1, 0.1) if augment is None else augment,
        run_dir=run_dir,
    )


def _mid_epoch_2(trainer: Trainer) -> int:
    """A step count in the middle of the second epoch."""
    return len(trainer.sampler) + 3


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_states_close(ours: dict[str, Tensor], ref: dict[str, Tensor]) -> None:
    assert ours.keys() == ref.keys()
    for key, value in ref.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------
# What each process runs
# ---------------------------------------------------------------------------------------------


def _record_writes(root: Path, writes: list[str]) -> None:
    """Add an audit hook that appends to ``writes`` every path under ``root`` this process
    opens for writing, creates, renames or removes (``open`` covers ``os.open`` too)."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def under_root(path: object) -> bool:
        if isinstance(path, int):  # a file descriptor
            return False
        text = os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else ""
        return text.startswith(str(root))

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and under_root(args[0]):
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if mode else bool(flags & write_flags)
            if writing:
                writes.append(os.fsdecode(args[0]))
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove") and under_root(args[0]):
            writes.append(f"{event} {os.fsdecode(args[0])}")

    sys.addaudithook(hook)


def _train_on_rank(root: str) -> None:
    """Rank ``r`` of the training runs: (a) a whole run, (b) a run resumed from one process's
    checkpoint and a run stopped mid-epoch for one process to resume; saves its weights,
    histories and recorded writes to ``root/rank<r>.pt``."""
    torch.set_num_threads(1)
    rank, runs = dist.get_rank(), Path(root) / "runs"
    writes: list[str] = []
    _record_writes(runs, writes)

    whole = _trainer(runs / "whole")
    whole.fit()
    resumed = _trainer(runs / "one_then_two")  # its last.pt was written by one process
    resumed.fit()
    stopped = _trainer(runs / "two_then_one")
    stopped.fit(max_steps=_mid_epoch_2(stopped))
    result = {
        "whole": _state(whole.model),
        "whole_history": whole.history,
        "resumed": _state(resumed.model),
        "resumed_from_step": _mid_epoch_2(resumed),
        "writes": writes,
    }
    torch.save(result, Path(root) / f"rank{rank}.pt")


class _LoseRank1:
    """An augmentation that, on rank 1 at its fourth step, kills the process (``die``) or
    stops it answering (``stall``); the identity otherwise."""

    def __init__(self, how: str) -> None:
        self.how, self.calls = how, 0

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        self.calls += 1
        if dist.get_rank() == 1 and self.calls == 4:
            if self.how == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)
        return x


def _lose_a_process(how: str) -> None:
    torch.set_num_threads(1)
    _trainer(None, augment=_LoseRank1(how)).fit()


# ---------------------------------------------------------------------------------------------
# (a) (b) (c): one launch of two processes, compared with one process
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two-process runs, the one-process parts around them, and the references."""
    root = tmp_path_factory.mktemp("distributed_training")
    torch.set_num_threads(1)
    reference = _trainer(None)
    reference.fit()
    one = _trainer(root / "runs" / "one_then_two")  # 1 process, then 2
    one.fit(max_steps=_mid_epoch_2(one))

    start_processes(WORLD, _train_on_rank, (str(root),), device="cpu", timeout_s=PG_TIMEOUT_S)

    then_one = _trainer(root / "runs" / "two_then_one")  # 2 processes, then 1
    then_one.fit()
    return {
        "root": root,
        "ranks": [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)],
        "reference": _state(reference.model),
        "reference_history": reference.history,
        "two_then_one": _state(then_one.model),
        "two_then_one_step": then_one.step,
        "reference_step": reference.step,
    }


def test_two_processes_end_with_identical_weights_equal_to_one_process(
    runs: dict[str, Any],
) -> None:
    rank0, rank1 = runs["ranks"]
    for key, value in rank0["whole"].items():
        assert torch.equal(value, rank1["whole"][key]), key
    _assert_states_close(rank0["whole"], runs["reference"])

    history, ref_history = rank0["whole_history"], runs["reference_history"]
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1))
    for ours, ref in zip(history, ref_history, strict=True):
        assert ours["step"] == ref["step"]
        # the two runs' forward passes round differently (the CNN sees two halves of the
        # batch), so a pair at the miner's threshold may be picked in one run and not in the
        # other: a step's loss then moves by a small discrete amount (measured 2.3e-5 relative
        # on an epoch's mean after a change to the normalisation's rounding), while the weights
        # stay within 1e-5 (above)
        assert ours["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
        # sharded validation: each rank embeds a slice, gathered; the metric of the whole set
        assert ours["val_mean_average_precision_at_r"] == pytest.approx(
            ref["val_mean_average_precision_at_r"], rel=1e-5
        )

    # the checkpoint holds the plain model: it loads into a fresh one in this process
    state = load_checkpoint(runs["root"] / "runs" / "whole" / "last.pt")
    fresh = _model()
    fresh.load_state_dict(state["model"])  # strict: no "module." prefix, no missing key
    _assert_states_close(_state(fresh), runs["reference"])


@pytest.mark.parametrize("order", ["two_then_one", "one_then_two"])
def test_a_run_resumes_with_another_number_of_processes(runs: dict[str, Any], order: str) -> None:
    if order == "two_then_one":
        assert runs["two_then_one_step"] == runs["reference_step"]
        _assert_states_close(runs["two_then_one"], runs["reference"])
    else:
        rank0, rank1 = runs["ranks"]
        assert rank0["resumed_from_step"] < runs["reference_step"]
        for key, value in rank0["resumed"].items():
            assert torch.equal(value, rank1["resumed"][key]), key
        _assert_states_close(rank0["resumed"], runs["reference"])
    lines = (runs["root"] / "runs" / order / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, EPOCHS + 1))


def test_only_rank_0_writes_into_the_run_folder(runs: dict[str, Any]) -> None:
    rank0, rank1 = runs["ranks"]
    assert rank1["writes"] == []
    written = {Path(path.split()[-1]).name for path in rank0["writes"]}
    assert "metrics.jsonl" in written
    assert any(name.startswith(".last.pt.") for name in written)  # atomic_save's temp file
    assert any(name.startswith(".best.pt.") for name in written)
    whole = runs["root"] / "runs" / "whole"
    names = {p.name for p in whole.iterdir()} - {"tensorboard"}  # when it is installed
    assert names == {"best.pt", "last.pt", "metrics.jsonl"}  # no temporary file left behind
    assert len((whole / "metrics.jsonl").read_text().splitlines()) == EPOCHS  # one writer


# ---------------------------------------------------------------------------------------------
# A lost process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["die", "stall"])
def test_a_lost_process_ends_the_run_with_an_error(how: str) -> None:
    timeout_s = 5.0
    started = time.monotonic()
    with pytest.raises(ProcessFailedError) as error:
        start_processes(WORLD, _lose_a_process, (how,), device="cpu", timeout_s=timeout_s)
    elapsed = time.monotonic() - started
    message = str(error.value)
    if how == "die":  # the launcher sees it die and stops the other one at once (should rank
        # 0's own error about its lost peer come first, that one is reported)
        assert ("process 1 of 2 failed" in message and "SIGKILL" in message) or (
            "process 0 of 2 failed" in message and "peer" in message
        )
    else:  # rank 0 waits in a collective for the group's timeout, then fails
        assert "process 0 of 2 failed" in message
        assert "timed out" in message.lower() or "timeout" in message.lower()  # gloo's words
        assert elapsed >= timeout_s
    assert elapsed < 120


# ---------------------------------------------------------------------------------------------
# (d) the command line: python -m deepmetric train --nproc 2
# ---------------------------------------------------------------------------------------------


def _cli_args(out: Path) -> list[str]:
    """A small ``train`` run on digits, with a loss that has parameters (DDP around it)."""
    return [
        "train",
        "--dataset", "digits", "--test-classes", "0.4", "--val-classes", "0.2",
        "--rotations", "false", "--set", "model.channels=8", "--set", "model.blocks=2",
        "--embedding-size", "16", "--loss", "ArcFaceLoss", "--miner", "none",
        "--epochs", "1", "--p", "4", "--k", "8", "--no-progress", "--out", str(out),
    ]  # fmt: skip


def test_nproc_through_the_command_line(tmp_path: Path) -> None:
    out_two, out_one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "deepmetric", *_cli_args(out_two), "--nproc", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "trained network" in done.stdout  # the parent prints rank 0's results
    names = {p.name for p in out_two.iterdir()}
    assert {"config.yaml", "best.pt", "last.pt", "metrics.jsonl", "results.json"} <= names
    assert "report.html" in names

    torch.set_num_threads(1)
    assert main(_cli_args(out_one)) == 0
    two, one = (load_checkpoint(out / "last.pt") for out in (out_two, out_one))
    assert two["step"] == one["step"] > 0
    # every weight and buffer; the ArcFace weights are the loss's parameters
    for part in ("model", "loss"):
        assert two[part].keys() == one[part].keys()
        for key, value in one[part].items():
            torch.testing.assert_close(two[part][key], value, rtol=0, atol=1e-5, msg=key)
    records = [
        [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        for out in (out_two, out_one)
    ]
    assert len(records[0]) == len(records[1]) == 1
    assert records[0][0]["train_loss"] == pytest.approx(records[1][0]["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_the_same_command_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m deepmetric train ...``: the processes see torchrun's
    variables, join its group, and only rank 0 prints and writes."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "deepmetric", *_cli_args(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table_rows = [line for line in done.stdout.splitlines() if line.startswith("trained network")]
    assert len(table_rows) == 1  # rank 0's table, once
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert "module." not in " ".join(load_checkpoint(out / "last.pt")["model"])
