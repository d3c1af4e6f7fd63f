"""SIGINT and SIGTERM during ``Trainer.fit``: the step in progress finishes, a resumable
``last.pt`` is written in the middle of the epoch, ``TrainingInterrupted`` is raised, the
previous signal handlers are back, and the resumed run ends with the weights of one that was
never stopped. Checked in this process (the signal sent from inside a step) and with a real
training process stopped from outside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor

from deepmetric import data, losses, models
from deepmetric.training import TrainConfig, Trainer, TrainingInterrupted, load_checkpoint

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from deepmetric import data, losses, models
    from deepmetric.training import TrainConfig, Trainer, TrainingInterrupted

    run_dir, marker = Path(sys.argv[1]), sys.argv[2]
    digits = data.load_digits()
    train = digits.subset(torch.where(digits.labels < 5)[0][:150])
    calls = 0

    def augment(x, generator):  # leaves x as it is; announces step 3, then slows the steps
        global calls
        calls += 1
        if marker != "-" and calls >= 3:
            Path(marker).touch()
            time.sleep(0.3)
        return x

    torch.manual_seed(0)
    model = models.EmbeddingNet(models.SmallConvNet(1, channels=8, blocks=2), 8, embedding_size=8)
    config = TrainConfig(epochs=2, p=4, k=4, progress=False, tensorboard=False)
    trainer = Trainer(model, losses.TripletMarginLoss(margin=0.2), train, config,
                      augment=augment, run_dir=run_dir)
    try:
        trainer.fit()
    except TrainingInterrupted as stop:
        print(f"interrupted: {stop}")
        sys.exit(3)
    """
)


def _run(script: Path, run_dir: Path, marker: str = "-") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen(
        [sys.executable, str(script), str(run_dir), marker],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _final_model(run_dir: Path) -> dict[str, Tensor]:
    return load_checkpoint(run_dir / "last.pt")["model"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    folder = tmp_path_factory.mktemp("signals")
    script = folder / "train.py"
    script.write_text(SCRIPT)
    process = _run(script, folder / "straight")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return script, _final_model(folder / "straight")


@pytest.mark.parametrize(
    "signum",
    # SIGINT's handling is the same code, checked in this process below; its process run is slow
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signalled_training_process_writes_last_pt_and_resumes_exactly(
    tmp_path: Path, straight_run: tuple[Path, dict[str, Tensor]], signum: signal.Signals
) -> None:
    script, expected = straight_run
    marker = tmp_path / "step3"
    process = _run(script, tmp_path / "run", str(marker))
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 3, output
    assert "interrupted" in output and "Traceback" not in output
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 0 and 3 <= state["step"] < state["sampler"]["num_batches"]
    assert state["epoch_sums"]["steps"] == state["step"]  # mid-epoch, its losses kept

    resumed = _run(script, tmp_path / "run")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    final = _final_model(tmp_path / "run")
    for key, value in expected.items():
        assert torch.equal(final[key], value), key


def _trainer(run_dir: Path, stop_at: int | None, signum: int) -> Trainer:
    digits = data.load_digits()
    train = digits.subset(torch.where(digits.labels < 4)[0][:80])
    calls = 0

    def augment(x: Tensor, generator: torch.Generator) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == stop_at:
            os.kill(os.getpid(), signum)  # delivered while this step runs
        return x

    torch.manual_seed(0)
    model = models.EmbeddingNet(models.SmallConvNet(1, channels=8, blocks=2), 8, embedding_size=8)
    config = TrainConfig(epochs=2, p=4, k=4, progress=False, tensorboard=False)
    return Trainer(
        model, losses.TripletMarginLoss(), train, config, augment=augment, run_dir=run_dir
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_in_a_step_stops_after_it_and_restores_the_handlers(
    tmp_path: Path, signum: int
) -> None:
    straight = _trainer(tmp_path / "straight", None, signum)
    straight.fit()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stopped = _trainer(tmp_path / "run", 3, signum)
    with pytest.raises(TrainingInterrupted) as info:
        stopped.fit()
    assert {s: signal.getsignal(s) for s in before} == before
    assert info.value.signal_number == signum
    assert info.value.checkpoint == tmp_path / "run" / "last.pt"
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 3  # the step finished
    resumed = _trainer(tmp_path / "run", None, signum)
    history = resumed.fit()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert history[0]["train_loss"] == straight.history[0]["train_loss"]
