"""The command line, end to end on the built-in digits (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepmetric.cli import main


def test_demo_digits_writes_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert (
        main(["demo", "--dataset", "digits", "--epochs", "1", "--no-progress", "--out", str(out)])
        == 0
    )
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
    assert "data:image/png;base64," in (out / "report.html").read_text()

    assert main(["evaluate", "--run", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["precision_at_1"] <= 1
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
    assert main([*args, "--set", "loss.neg_margin=0.8"]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "neg_margin: 0.8" in saved and "lr: 0.01" in saved


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("datset: digits\n", "unknown config key(s): datset"),
        ("train: {epocs: 1}\n", "unknown training option(s): epocs"),
        ("loss: {name: NoSuchLoss}\n", "unknown loss 'NoSuchLoss'"),
        ("model: {width: 3}\n", "unknown key(s) in 'model': width"),
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
