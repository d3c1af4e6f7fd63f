"""``KIND:PATH`` dataset specs (:mod:`deepmetric.data.spec`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepmetric import data
from tests.data.image_files import _noise, _save, _write_csv


def test_open_dataset_specs(tmp_path: Path) -> None:
    _save(tmp_path / "photos" / "cat" / "1.png", _noise(1, (4, 4)))
    _write_csv(tmp_path / "list.csv", "path,label,split\nphotos/cat/1.png,cat,val\n")
    folder = data.open_dataset(f"folder:{tmp_path / 'photos'}", mode="L")
    assert folder.class_names == ["cat"] and folder.mode == "L"
    listed = data.open_dataset(f"csv:{tmp_path / 'list.csv'}", split="val")
    assert listed.paths == folder.paths
    with pytest.raises(ValueError, match="folder has no splits"):
        data.open_dataset(f"folder:{tmp_path / 'photos'}", split="train")
    for bad in ("photos", "imagenet:/data", "csv:"):
        with pytest.raises(ValueError, match="folder:PATH.*csv:FILE.*cub:PATH.*inshop:PATH"):
            data.open_dataset(bad)
