"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepmetric import cli


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for one epoch on the built-in digits with a small network (a few
    seconds), shared by the tests of the commands that use a trained run. Tests must not
    change it."""
    root = tmp_path_factory.mktemp("run")
    config = root / "run.yaml"
    config.write_text(
        "dataset: digits\ntest_classes: 0.4\nval_classes: 0.0\nrotations: false\n"
        "model: {channels: 16, blocks: 2, embedding_size: 16}\n"
        "loss: {name: ContrastiveLoss}\nminer: null\n"
        f"train: {{epochs: 1, p: 3, k: 8, seed: 0}}\nout: {root / 'run'}\n"
    )
    assert cli.main(["train", "--config", str(config), "--no-progress"]) == 0
    return root / "run"
