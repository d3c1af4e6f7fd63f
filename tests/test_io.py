"""deepmetric.io: atomic writers leave the old file on failure and touch no file of the user's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from deepmetric.io import atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text


def test_round_trips(tmp_path: Path) -> None:
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "sub" / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2.5]})
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "d.pt")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2.5]}
    loaded = torch.load(tmp_path / "d.pt", weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(3))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    # files of the user's that look like temporaries must survive
    (tmp_path / ".x.bin.user.tmp").write_bytes(b"mine")
    (tmp_path / "notes.tmp").write_bytes(b"mine too")

    def half_then_fail(file: object) -> None:
        file.write(b"new, partial")  # type: ignore[attr-defined]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.bin.user.tmp", "notes.tmp", "x.bin"]


def test_json_that_cannot_be_written_fails_before_touching_the_file(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("{}")
    with pytest.raises(ValueError, match="as JSON"):
        atomic_write_json(target, {"bad": object()})
    assert target.read_text() == "{}"


def test_bad_targets_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="it is a folder"):
        atomic_write(tmp_path, b"")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        atomic_write(blocker / "x.json", b"")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(ValueError, match="not writable"):
            atomic_write(locked / "x", b"")
