"""``deepmetric index build / enroll / index remove`` and the items of an index: overwrites
refused unless asked, files never enrolled twice, removal by id, class or file, each item's
source file, and IVF advice given in command-line terms. End to end on real files: a tiny run
trained on the built-in digits, images and indexes written to ``tmp_path``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepmetric import cli
from deepmetric.cli.index import load_image, load_run
from deepmetric.index import EmbeddingIndex, embed


def run_cli(argv: Sequence[object]) -> int:
    """``deepmetric.cli.main`` (ValueError -> message, exit code 2)."""
    return cli.main([str(a) for a in argv])


def add_people(root: Path, names: Sequence[str], seed: int = 0) -> list[Path]:
    """One 16x16 image per name in ``root/<name>/photo.png`` (distinct blocky patterns)."""
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        blocks = rng.integers(0, 2, size=(4, 4)) * 255
        path = root / name / "photo.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.kron(blocks, np.ones((4, 4))).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


def build(run_dir: Path, out: Path, *extra: object, dataset: str = "digits") -> int:
    return run_cli(["index", "build", "--run", run_dir, "--dataset", dataset, "--out", out, *extra])


def enroll(run_dir: Path, index: Path, folder: Path, *extra: object) -> int:
    return run_cli(
        ["enroll", "--index", index, "--run", run_dir, "--dataset", f"folder:{folder}", *extra]
    )


# -- overwriting --------------------------------------------------------------------------------
def test_build_refuses_to_replace_an_index_unless_asked(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gallery.index"
    assert build(run_dir, out) == 0
    assert enroll(run_dir, out, tmp_path / "people") == 2  # no such folder: nothing changes
    add_people(tmp_path / "people", ["alice"])
    assert enroll(run_dir, out, tmp_path / "people") == 0
    capsys.readouterr()
    assert build(run_dir, out) == 2
    error = capsys.readouterr().err
    assert "already holds an index" in error and "--overwrite" in error
    assert len(EmbeddingIndex.load(out)) == 1797 + 1  # the enrolled item is still there
    assert build(run_dir, out, "--overwrite") == 0
    assert len(EmbeddingIndex.load(out)) == 1797
    (tmp_path / "a_file").write_text("x")
    assert build(run_dir, tmp_path / "a_file") == 2
    assert "is a file" in capsys.readouterr().err


# -- sources and enrolling twice ------------------------------------------------------------------
def test_items_record_their_files_and_a_file_is_never_enrolled_twice(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gallery.index"
    assert build(run_dir, out) == 0
    assert EmbeddingIndex.load(out).sources[:2] == ["digits#0", "digits#1"]
    people = tmp_path / "people"
    files = add_people(people, ["alice", "bob"])
    assert enroll(run_dir, out, people) == 0
    index = EmbeddingIndex.load(out)
    assert index.sources_of([1797, 1798]) == [os.path.abspath(f) for f in files]
    # Each file's own embedding finds the item that names that file.
    run = load_run(run_dir)
    for file in files:
        query = embed(run.model, load_image(file, run), progress=False)
        nearest = int(index.search(query, 1).ids[0, 0])
        assert index.sources_of([nearest]) == [os.path.abspath(file)]

    capsys.readouterr()
    assert enroll(run_dir, out, people) == 2
    error = capsys.readouterr().err
    assert "2 of the 2 items" in error and "--skip-existing" in error
    assert len(EmbeddingIndex.load(out)) == 1797 + 2
    carol = add_people(people, ["carol"], seed=1)[0]
    assert enroll(run_dir, out, people) == 2  # refused as a whole: 2 of the 3 are known
    assert enroll(run_dir, out, people, "--skip-existing") == 0
    printed = capsys.readouterr().out
    assert "skipping 2 items" in printed and "enrolled 1 items" in printed
    assert "1 new classes, 0 known" in printed
    index = EmbeddingIndex.load(out)
    assert len(index) == 1797 + 3 and index.sources[-1] == os.path.abspath(carol)
    assert index.class_names[int(index.labels[-1])] == "carol"
    assert enroll(run_dir, out, people, "--skip-existing") == 0
    assert "nothing to enrol" in capsys.readouterr().out
    assert len(EmbeddingIndex.load(out)) == 1797 + 3


# -- removal --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_remove_by_id_class_and_file(
    kind: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gallery.index"
    assert build(run_dir, out, "--kind", kind) == 0
    people = tmp_path / "people"
    files = add_people(people, ["alice", "bob", "carol"])
    assert enroll(run_dir, out, people) == 0
    before = EmbeddingIndex.load(out)
    expected = set(before.ids.tolist())
    sevens = {i for i, y in zip(before.ids.tolist(), before.labels.tolist(), strict=True) if y == 7}
    assert len(sevens) > 100

    remove = ["index", "remove", "--index", out]
    relative = os.path.relpath(files[1])  # a file may be named by a relative path
    for selection in (["--ids", 0, 5], ["--class", "7", "alice"], ["--source", relative]):
        assert run_cli([*remove, *selection]) == 0
    expected -= {0, 5, 1797, 1798} | sevens
    index = EmbeddingIndex.load(out)
    assert set(index.ids.tolist()) == expected
    assert index.sources[-1] == os.path.abspath(files[2])  # carol stays
    found = index.search(
        embed(load_run(run_dir).model, load_image(files[0], load_run(run_dir)), progress=False), 50
    )
    assert not np.isin(found.ids.numpy(), [0, 5, 1797, 1798, *sevens]).any()
    assert "removed 1 items" in capsys.readouterr().out.splitlines()[-1]

    for selection, message in (
        (["--ids", 0], "ids not in the index"),
        (["--ids", 3, 999999], "ids not in the index"),
        (["--class", "7"], "no item of class '7'"),
        (["--class", "zebra"], "no item of class 'zebra'"),
        (["--source", files[0]], "was enrolled from"),
        ([], "needs --ids, --class or --source"),
    ):
        assert run_cli([*remove, *selection]) == 2
        assert message in capsys.readouterr().err
    assert set(EmbeddingIndex.load(out).ids.tolist()) == expected  # refusals change nothing
    if kind == "hnsw":
        assert EmbeddingIndex.load(out).n_tombstones == 1797 + 3 - len(expected)
        assert run_cli([*remove, "--ids", 3, "--compact"]) == 0
        compacted = EmbeddingIndex.load(out)
        assert compacted.n_tombstones == 0 and set(compacted.ids.tolist()) == expected - {3}


# -- IVF advice -----------------------------------------------------------------------------------
def test_ivf_with_too_few_items_says_what_to_do_on_the_command_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    people = tmp_path / "people"
    add_people(people, ["alice", "bob", "carol"])
    out = tmp_path / "ivf.index"
    assert build(run_dir, out, "--kind", "ivf", dataset=f"folder:{people}") == 2
    error = capsys.readouterr().err
    assert "--nlist 1024 needs at least 1024 items" in error and "has 3" in error
    assert "--kind flat" in error and "train()" not in error
    assert not out.exists()  # refused before anything was written

    assert build(run_dir, out, "--kind", "ivf", "--nlist", 300) == 0
    remove = ["index", "remove", "--index", out, "--class", *map(str, range(9))]
    assert run_cli([*remove, "--compact"]) == 2
    error = capsys.readouterr().err
    assert "cannot re-train 300 IVF cells" in error and "without --compact" in error
    assert len(EmbeddingIndex.load(out)) == 1797  # nothing was saved
    assert run_cli(remove) == 0
    nines = EmbeddingIndex.load(out)
    assert len(nines) == int((nines.labels == 9).sum()) < 300


def test_enrolling_a_folder_with_an_unreadable_image_names_it_and_keeps_the_other_files(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gallery.index"
    assert build(run_dir, out) == 0
    people = tmp_path / "people"
    add_people(people, ["alice", "bob"])
    (people / "bob" / "broken.png").write_bytes(b"not a png")
    capsys.readouterr()
    # decoded by worker processes (num_workers auto), the main process's summary names the file
    with pytest.warns(UserWarning, match=r"unreadable .*broken\.png"):
        assert enroll(run_dir, out, people) == 0
    index = EmbeddingIndex.load(out)
    assert len(index) == 1797 + 2
    enrolled = sorted(str(p) for p in people.rglob("*.png") if p.name != "broken.png")
    assert sorted(index.sources[-2:]) == enrolled
