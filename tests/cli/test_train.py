"""The commands that train and score (:mod:`deepmetric.cli.train`), end to end on the built-in
digits (seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from deepmetric.cli import main


def test_demo_digits_writes_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--dataset", "digits", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main([*args, "--projection", "pca"]) == 0
    printed = capsys.readouterr().out
    assert "raw pixels" in printed and "trained network" in printed
    for name in ("config.yaml", "best.pt", "last.pt", "metrics.jsonl", "report.html", "curves.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert [r["embedding"] for r in results["table"]] == [
        "raw pixels",
        "untrained network",
        "trained network",
    ]
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert "projection: pca" in (out / "config.yaml").read_text()
    # verification on the unseen test classes (digits 6-9), in results.json and the report
    verification = results["verification"]
    assert verification["split"] == "test" and verification["classes"] == 4
    assert verification["n_genuine"] == verification["n_impostor"] == 10_000
    assert 0.5 < verification["auc"] <= 1 and 0 <= verification["eer"] < 0.5
    assert {"tpr_at_fpr_0.01", "tpr_at_fpr_0.001", "best_threshold"} <= set(verification)
    assert (out / "verification.png").is_file()
    assert "<h2>Verification on unseen classes</h2>" in page
    assert f"<td>AUC</td><td>{verification['auc']:.4f}</td>" in page

    assert main(["evaluate", "--run", str(out), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # the same names and values as the table's trained row (best.pt on the same test classes)
    trained = results["table"][2]
    for name in ("Recall@1", "MAP@R", "1-shot id"):
        assert metrics[name] == pytest.approx(trained[name], abs=1e-6), name
    assert metrics["data"].startswith("the run's test classes") and metrics["classes"] == 4
    assert main(["embed", "--run", str(out), "--out", str(tmp_path / "emb.npy")]) == 0
    emb = np.load(tmp_path / "emb.npy")
    assert emb.shape == (1797, 128)
    assert np.load(tmp_path / "emb_labels.npy").shape == (1797,)


def test_train_from_config_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "dataset: digits\ntest_classes: 0.4\nval_classes: 0.0\nrotations: false\n"
        "model: {channels: 8, blocks: 2, embedding_size: 8}\n"
        "loss: {name: ContrastiveLoss}\nminer: null\n"
        f"train: {{epochs: 1, p: 3, k: 8}}\nout: {tmp_path / 'run'}\n"
    )
    args = ["train", "--config", str(config), "--no-progress", "--lr", "0.01"]
    assert main([*args, "--set", "loss.neg_margin=0.8", "--projection", "pca"]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "neg_margin: 0.8" in saved and "lr: 0.01" in saved and "projection: pca" in saved
    assert (tmp_path / "run" / "embedding_map.png").is_file()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("datset: digits\n", "unknown config key(s): datset"),
        ("train: {epocs: 1}\n", "unknown key(s) in 'train': epocs"),
        ("train: {epochs: 1.5}\n", "config key 'train.epochs' must be an integer, got 1.5"),
        ("train: {epochs: true}\n", "config key 'train.epochs' must be an integer, got True"),
        ("train: {patience: x}\n", "config key 'train.patience' must be an integer or null"),
        ("train: {lr: '0.1'}\n", "'train.lr' must be a number, got '0.1' (a string)"),
        ("loss: {name: TripletMarginLoss, margin: abc}\n", "'loss.margin' must be a number"),
        ("miner: {name: BaseMiner}\n", "unknown miner 'BaseMiner'"),
        ("loss: {name: NoSuchLoss}\n", "unknown loss 'NoSuchLoss'"),
        ("model: {width: 3}\n", "unknown key(s) in 'model': width"),
        ("projection: tsne\n", "config key 'projection' must be one of pca, umap, got 'tsne'"),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: str, message: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(content + f"out: {tmp_path / 'x'}\n")
    assert main(["train", "--config", str(config), "--no-progress", "--epochs", "1"]) == 2
    assert message in capsys.readouterr().err


def test_no_test_classes_and_no_one_shot_runs_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["train", "--dataset", "digits", "--test-classes", "0", "--no-progress"]
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_report_without_unseen_classes(tmp_path: Path) -> None:
    """The one-shot benchmark holds out no classes: the report shows the seen ones only."""
    import torch

    from deepmetric.cli import write_report
    from deepmetric.data import ArrayDataset, load_digits
    from deepmetric.runs import RunConfig, build_model

    digits = load_digits()
    model = build_model(RunConfig().model, digits.x[0])
    empty = ArrayDataset(digits.x[:0], digits.labels[:0], digits.class_names)
    results = {"table": [{"embedding": "trained network"}], "verdict": "ok", "train_seconds": 1.0}
    page = write_report(
        tmp_path, RunConfig(), results, model, digits.subset(torch.arange(300)), empty
    )
    assert page.is_file() and (tmp_path / "embedding_map.png").is_file()
    assert not (tmp_path / "neighbours.png").exists()
    # nor a validation split: verification is skipped, and the report says so
    assert not (tmp_path / "verification.png").exists()
    skipped = json.loads((tmp_path / "results.json").read_text())["verification"]
    assert skipped == {"split": None, "skipped": "the run holds out no test or validation classes"}
    assert "Verification skipped: the run holds out no test or validation classes" in (
        page.read_text()
    )


@pytest.mark.skipif(importlib.util.find_spec("umap") is not None, reason="umap-learn installed")
@pytest.mark.parametrize("command", ["train", "demo"])
def test_umap_without_umap_learn_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    out = tmp_path / "run"
    args = [command, "--dataset", "digits", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main([*args, "--projection", "umap"]) == 2
    assert "'projection' is 'umap' but the umap-learn package is not installed" in (
        capsys.readouterr().err
    )
    assert not out.exists()  # refused before the run folder, let alone a checkpoint


def test_report_verifies_on_the_validation_split_without_test_classes(tmp_path: Path) -> None:
    """The one-shot benchmark holds out validation classes only: verification uses them."""
    import torch

    from deepmetric.cli import write_report
    from deepmetric.data import ArrayDataset, load_digits
    from deepmetric.runs import RunConfig, build_model

    digits = load_digits()
    model = build_model(RunConfig().model, digits.x[0])
    empty = ArrayDataset(digits.x[:0], digits.labels[:0], digits.class_names)
    train = digits.subset(torch.where(digits.labels < 8)[0])
    val = digits.subset(torch.where(digits.labels >= 8)[0])
    results = {"table": [{"embedding": "trained network"}], "verdict": "ok", "train_seconds": 1.0}
    write_report(tmp_path, RunConfig(), results, model, train, empty, val)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["verification"] == results["verification"]
    assert saved["verification"]["split"] == "validation"
    assert saved["verification"]["classes"] == 2
    n_8, n_9 = (int((val.labels == c).sum()) for c in (8, 9))
    assert saved["verification"]["n_impostor"] == min(10_000, n_8 * n_9)
    assert "Verification on the validation split" in (tmp_path / "report.html").read_text()


def test_oneshot_scores_the_twenty_official_runs_with_the_final_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "oneshot"
    args = ["oneshot", "--epochs", "1", "--tta", "2", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    names = [r["embedding"] for r in results["table"]]
    assert names == [
        "raw pixels",
        "untrained network",
        "trained network",
        "trained + test-time augmentation (2 copies)",
    ]
    per_run = results["one_shot_per_run"]
    for name, row in zip(names, results["table"], strict=True):
        # 20 runs of 20 queries each: every accuracy is a multiple of 1/20 (up to float32 rounding)
        assert len(per_run[name]) == 20
        assert all(abs(a * 20 - round(a * 20)) < 1e-5 for a in per_run[name])
        assert row["one-shot 20-way"] == pytest.approx(sum(per_run[name]) / 20)
    # no characters held out: nothing to choose a checkpoint with, so best.pt is the final one
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert not any(key.startswith("val_") for key in records[0])
    # one epoch already lifts the network far above raw pixels (about 0.23) on unseen alphabets
    assert results["table"][2]["one-shot 20-way"] > 0.5
    # the per-run table: runs 1..20, one column per embedding
    lines = printed.splitlines()
    assert all(any(line.startswith(f"{i:>3}   ") for line in lines) for i in range(1, 21))


def test_ctrl_c_saves_the_run_and_resume_finishes_it(tmp_path: Path) -> None:
    """SIGINT in the middle of ``deepmetric train``: a message, exit code 130, a resumable
    last.pt; the same command with --resume ends the run with every epoch logged once."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "deepmetric", "train", "--dataset", "digits", "--out", str(out),
        "--no-progress", "--epochs", "3", "--p", "3", "--k", "8", "--test-classes", "0.4",
        "--val-classes", "0", "--set", "model.channels=8", "--set", "model.blocks=2",
        "--embedding-size", "8", "--checkpoint-every", "5", "--miner", "none",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "last.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=240)
    if process.returncode == 0:  # finished before the signal arrived: nothing to test
        pytest.skip("the run ended before the interruption")
    assert process.returncode == 130, error
    assert "interrupted by SIGINT" in error and "--resume" in error
    assert "Traceback" not in error
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines]
    assert epochs == [1, 2, 3]
    assert (out / "results.json").is_file()
