"""``deepmetric index build / search / enroll / verify``, end to end on real files: a tiny run
trained on the built-in digits (seconds), indexes and images written to ``tmp_path``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric import cli
from deepmetric.cli.index import load_image, load_run
from deepmetric.data import load_digits, load_image_folder
from deepmetric.index import EmbeddingIndex, embed, model_fingerprint
from deepmetric.training import load_checkpoint


def run_cli(argv: Sequence[str]) -> int:
    """``deepmetric.cli.main`` (its error handling: ValueError -> message, exit code 2)."""
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def index_dir(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "digits.index"
    assert run_cli(["index", "build", "--run", run_dir, "--dataset", "digits", "--out", out]) == 0
    return out


@pytest.fixture(scope="module")
def other_run(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run with one weight changed: a different model fingerprint."""
    other = tmp_path_factory.mktemp("other") / "run"
    other.mkdir()
    for name in ("config.yaml", "run.json"):
        (other / name).write_text((run_dir / name).read_text())
    state = load_checkpoint(run_dir / "best.pt")
    first = next(iter(state["model"]))
    state["model"][first] = state["model"][first] + 0.01
    torch.save(state, other / "best.pt")
    return other


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)


def _new_people(root: Path) -> Path:
    """One sub-folder per new class, one 16x16 image each (blocky patterns, unlike digits)."""
    rng = np.random.default_rng(0)
    for name in ("alice", "bob", "carol"):
        blocks = rng.integers(0, 2, size=(4, 4)) * 255
        _write_png(root / name / "photo.png", np.kron(blocks, np.ones((4, 4))))
    return root


# -- index build and search ---------------------------------------------------------------------
def test_build_records_the_model_and_class_names(run_dir: Path, index_dir: Path) -> None:
    run = load_run(run_dir)
    index = EmbeddingIndex.load(index_dir, expected_fingerprint=model_fingerprint(run.model))
    digits = load_digits()
    assert len(index) == len(digits) == 1797
    assert index.kind == "flat" and index.embedding_size == 16
    assert torch.equal(index.labels, digits.labels)
    assert index.class_names == {i: str(i) for i in range(10)}


def test_search_finds_each_indexed_item_itself(
    run_dir: Path, index_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hits.json"
    args = ["search", "--index", index_dir, "--run", run_dir, "--dataset", "digits", "-k", 3]
    assert run_cli([*args, "--json", out]) == 0
    report = json.loads(out.read_text())
    assert report["k"] == 3 and report["distance"] == "euclidean"
    queries = report["queries"]
    assert len(queries) == 1797
    labels = load_digits().labels.tolist()
    self_first = 0
    for i, entry in enumerate(queries):
        # class names, not labels: a query folder numbers its classes by itself
        assert "label" not in entry and entry["class_name"] == str(labels[i])
        hits = entry["neighbours"]
        assert len(hits) == 3
        distances = [h["distance"] for h in hits]
        assert distances == sorted(distances)
        own = [h for h in hits if h["id"] == i]
        assert len(own) == 1 and own[0]["distance"] < 1e-3  # itself, at distance ~0
        assert own[0]["class_name"] == str(labels[i]) and own[0]["file"] == f"digits#{i}"
        self_first += hits[0]["id"] == i
    assert self_first >= 0.99 * len(queries)


def test_search_prints_a_table_without_json(
    run_dir: Path, index_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subset = load_digits().subset([5, 6])
    arrays = tmp_path / "two.npz"
    np.savez(arrays, x=subset.x.numpy(), y=subset.labels.numpy())
    args = ["search", "--index", index_dir, "--run", run_dir, "--dataset", f"arrays:{arrays}"]
    assert run_cli([*args, "-k", 2]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "query 0 (class '5'):"
    assert printed[1].split()[:3] == ["1.", "id", "5"]
    assert printed[3] == "query 1 (class '6'):"
    assert printed[4].split()[:3] == ["1.", "id", "6"]


def test_search_with_vectors_needs_no_run(run_dir: Path, index_dir: Path, tmp_path: Path) -> None:
    run = load_run(run_dir)
    picks = [0, 100, 1796]
    vectors = embed(run.model, load_digits().x[picks], progress=False).numpy()
    np.save(tmp_path / "q.npy", vectors.astype(np.float64))
    out = tmp_path / "hits.json"
    args = ["search", "--index", index_dir, "--vectors", tmp_path / "q.npy", "-k", 1]
    assert run_cli([*args, "--json", out]) == 0
    queries = json.loads(out.read_text())["queries"]
    assert [q["neighbours"][0]["id"] for q in queries] == picks
    assert all("label" not in q for q in queries)  # vectors come without labels


@pytest.mark.parametrize(
    "knobs", [["--kind", "hnsw", "--m", 8, "--ef-search", 32], ["--kind", "ivf", "--nlist", 8]]
)
def test_approximate_indexes(run_dir: Path, tmp_path: Path, knobs: list[object]) -> None:
    out = tmp_path / "approx.index"
    args = ["index", "build", "--run", run_dir, "--dataset", "digits", "--out", out]
    assert run_cli([*args, *knobs]) == 0
    index = EmbeddingIndex.load(out)
    assert index.kind == knobs[1] and len(index) == 1797
    assert (index.m == 8 and index.ef_search == 32) if index.kind == "hnsw" else index.nlist == 8
    run = load_run(run_dir)
    queries = embed(run.model, load_digits().x[:50], progress=False)
    found = index.search(queries, 1).ids[:, 0]
    assert (found == torch.arange(50)).float().mean() >= 0.9


# -- enrolment ------------------------------------------------------------------------------------
def test_enroll_new_classes_then_find_them(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index_dir = tmp_path / "gallery.index"
    base = ["--run", run_dir]
    assert run_cli(["index", "build", *base, "--dataset", "digits", "--out", index_dir]) == 0
    people = _new_people(tmp_path / "people")
    assert run_cli(["enroll", "--index", index_dir, *base, "--dataset", f"folder:{people}"]) == 0
    assert "3 new classes" in capsys.readouterr().out

    index = EmbeddingIndex.load(index_dir)
    assert len(index) == 1797 + 3
    assert index.ids[-3:].tolist() == [1797, 1798, 1799]  # new ids after the old ones
    new_labels = index.labels[-3:].tolist()
    assert [index.class_names[label] for label in new_labels] == ["alice", "bob", "carol"]
    assert min(new_labels) >= 10  # no digit class is reused

    out = tmp_path / "hits.json"
    query = ["search", "--index", index_dir, *base, "--dataset", f"folder:{people}", "-k", 2]
    assert run_cli([*query, "--json", out]) == 0
    for entry in json.loads(out.read_text())["queries"]:
        nearest = entry["neighbours"][0]
        assert nearest["class_name"] == entry["class_name"]
        assert nearest["id"] >= 1797 and nearest["distance"] < 1e-3

    # a second photo of a known person joins that person's class
    _write_png(tmp_path / "more" / "bob" / "again.png", np.full((16, 16), 200))
    assert (
        run_cli(["enroll", "--index", index_dir, *base, "--dataset", f"folder:{tmp_path}/more"])
        == 0
    )
    assert "0 new classes, 1 known" in capsys.readouterr().out
    index = EmbeddingIndex.load(index_dir)
    assert len(index) == 1800 + 1
    assert index.class_names[int(index.labels[-1])] == "bob"
    assert index.labels[-1] == new_labels[1]


# -- verification ---------------------------------------------------------------------------------
def test_verify_calibrates_and_plots(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot, out = tmp_path / "plots" / "roc.png", tmp_path / "verify.json"
    args = ["verify", "--run", run_dir, "--dataset", "digits", "--pairs", 300]
    assert run_cli([*args, "--target-fpr", 0.01, "--plot", plot, "--json", out]) == 0
    printed = capsys.readouterr().out
    for text in ("300 genuine and 300 impostor", "AUC", "EER", "TPR @ FPR 0.01", "best accuracy"):
        assert text in printed
    summary = json.loads(out.read_text())["calibration"]
    assert summary["n_genuine"] == summary["n_impostor"] == 300
    assert 0.5 < summary["auc"] <= 1 and 0 <= summary["eer"] < 0.5
    assert 0 <= summary["tpr_at_fpr_0.01"] <= 1
    assert f"{summary['best_threshold']:.4f}" in printed
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 100


def test_verify_two_images(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    people = _new_people(tmp_path / "people")
    a, b = people / "alice" / "photo.png", people / "bob" / "photo.png"
    out = tmp_path / "pair.json"
    assert run_cli(["verify", "--run", run_dir, "--a", a, "--b", a, "--threshold", 0.001]) == 0
    assert capsys.readouterr().out.startswith("same: distance ")
    args = ["verify", "--run", run_dir, "--a", a, "--b", b, "--json", out]
    assert run_cli([*args, "--threshold", 0.0]) == 0
    assert capsys.readouterr().out.startswith("different: distance ")
    pair = json.loads(out.read_text())["pair"]
    assert pair["same"] is False and pair["distance"] > 0
    # the decision is exactly "distance <= threshold"
    assert run_cli([*args, "--threshold", pair["distance"]]) == 0
    assert json.loads(out.read_text())["pair"]["same"] is True
    # no threshold: calibrate one on a dataset first
    assert run_cli([*args, "--dataset", "digits", "--pairs", 50]) == 0
    report = json.loads(out.read_text())
    assert report["pair"]["threshold"] == report["calibration"]["best_threshold"]


def test_single_images_decode_like_the_folder_loader(run_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _write_png(tmp_path / "imgs" / "x" / "one.png", rng.integers(0, 256, size=(23, 17)))
    run = load_run(run_dir)
    assert run.input_shape == (1, 8, 8)  # digits are 8x8 whatever the config's image_size
    single = load_image(tmp_path / "imgs" / "x" / "one.png", run)
    assert torch.equal(single[0], load_image_folder(tmp_path / "imgs", size=8).x[0])


# -- errors ---------------------------------------------------------------------------------------
def test_fingerprint_mismatch_is_refused(
    index_dir: Path, other_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    search = ["search", "--index", index_dir, "--run", other_run, "--dataset", "digits"]
    enroll = ["enroll", "--index", index_dir, "--run", other_run, "--dataset", "digits"]
    for argv in (search, enroll):
        assert run_cli(argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("deepmetric: error: model fingerprint mismatch")
        assert str(index_dir) in error and "deepmetric index build" in error
    assert len(EmbeddingIndex.load(index_dir)) == 1797  # the refused enrolment changed nothing


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--index", "{tmp}/none", "--vectors", "{tmp}/q.npy"], "no saved Embedding"),
        (["search", "--index", "{index}", "--vectors", "{tmp}/missing.npy"], "vectors file not"),
        (["search", "--index", "{index}", "--dataset", "digits"], "--dataset needs --run"),
        (["search", "--index", "{index}"], "exactly one of --dataset"),
        (["index", "build", "--run", "{tmp}/none", "--dataset", "digits", "--out", "{tmp}/i"],
         "run folder not found"),
        (["index", "build", "--run", "{run}", "--checkpoint", "gone.pt", "--dataset", "digits",
          "--out", "{tmp}/i"], "checkpoint not found"),
        (["index", "build", "--run", "{run}", "--dataset", "digits", "--out", "{tmp}/i",
          "--nlist", "4"], "nlist applies to kind='ivf'"),
        (["enroll", "--index", "{index}", "--run", "{run}", "--dataset", "folder:{tmp}/none"],
         "image folder not found"),
        (["verify", "--run", "{run}", "--a", "{tmp}/none.png", "--b", "{tmp}/none.png",
          "--threshold", "1"], "image not found"),
        (["verify", "--run", "{run}", "--a", "{tmp}/none.png"], "--a and --b go together"),
        (["verify", "--run", "{run}", "--a", "{tmp}/x.png", "--b", "{tmp}/x.png"],
         "need --threshold"),
        (["verify", "--run", "{run}"], "needs --dataset"),
        (["verify", "--run", "{run}", "--dataset", "digits", "--target-fpr", "2"],
         "--target-fpr must be in (0, 1]"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_a_message(
    argv: list[str],
    message: str,
    run_dir: Path,
    index_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    np.save(tmp_path / "q.npy", np.zeros((1, 16), np.float32))
    filled = [a.format(tmp=tmp_path, run=run_dir, index=index_dir) for a in argv]
    assert run_cli(filled) == 2
    error = capsys.readouterr().err
    assert error.startswith("deepmetric: error: ") and message in error


def test_vectors_of_the_wrong_size_are_refused(
    index_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "q.npy", np.zeros((2, 5), np.float32))
    assert run_cli(["search", "--index", index_dir, "--vectors", tmp_path / "q.npy"]) == 2
    assert "5 dimensions" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["search", "--vectors", "q.npy"])  # --index is required
    assert exit_info.value.code == 2
    assert "--index" in capsys.readouterr().err
