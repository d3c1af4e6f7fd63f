"""Photos end to end through the command line: a folder of JPEGs streamed from disk, a trunk
named in the config (the built-in CNN and a Hugging Face model from a local folder), a
self-contained run folder that later commands use from anywhere, and the run folder's
refusals (issue 14 and 16)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from deepmetric.cli import main
from deepmetric.data.synthetic import make_faces, make_products
from deepmetric.experiment import one_shot_identification
from tests.tiny_hf import save_tiny_vit


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faces") / "faces"
    make_faces(root, identities=10, photos=5, size=40, seed=0)
    return root


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--dataset", f"folder:{data}", "--out", str(out), "--no-progress",
        "--epochs", "1", "--p", "4", "--k", "3", "--test-classes", "0.3", "--val-classes", "0",
        "--image-size", "32", "--set", "model.channels=8", "--set", "model.blocks=2",
        "--embedding-size", "8", "--miner", "none", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def photo_run(faces: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "faces-run"
    assert main(_train_args(faces, out)) == 0
    return out


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Path]:
    """Run a command from another working directory."""
    before = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(before)


def test_a_folder_of_photos_trains_rgb_without_rotations(photo_run: Path) -> None:
    results = json.loads((photo_run / "results.json").read_text())
    info = json.loads((photo_run / "run.json").read_text())
    assert info["input_shape"] == [3, 32, 32]  # RGB photos stay RGB, at the asked side
    assert info["lazy"] is True
    # 10 identities, 30% held out: 7 train, 3 test; no rotated copies
    assert results["train_classes"] == results["train_classes_with_rotations"] == 7
    assert results["test_classes"] == 3
    assert len(info["class_names"]["train"]) == 7 and len(info["class_names"]["test"]) == 3
    assert [r["embedding"] for r in results["table"]] == [
        "raw pixels",
        "untrained network",
        "trained network",
    ]
    for row in results["table"]:
        assert {"Recall@1", "MAP@R", "1-shot id"} <= set(row)
    assert "MAP@R" in results["verdict"]
    page = (photo_run / "report.html").read_text()
    assert "neighbours.png" in json.dumps(sorted(p.name for p in photo_run.iterdir()))
    assert "training classes" in page and "deepmetric 0.1.0" in page


def test_later_commands_need_only_the_run_folder(
    photo_run: Path, faces: Path, elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the training data moved away, and we are in another folder
    moved = elsewhere / "moved"
    shutil.copytree(faces, moved)
    hidden = faces.with_name("faces-hidden")
    faces.rename(hidden)
    try:
        out = elsewhere / "emb.npy"
        assert main(["embed", "--run", str(photo_run), "--dataset", "folder:moved", "--out",
                     str(out), "--no-progress"]) == 0  # fmt: skip
        emb = np.load(out)
        files = (elsewhere / "emb_files.txt").read_text().splitlines()
        assert emb.shape == (50, 8) and len(files) == 50
        assert files[0].endswith(os.path.join("person000", "photo00.jpg"))
        index = elsewhere / "gallery.index"
        args = ["--run", str(photo_run), "--dataset", "folder:moved"]
        assert main(["index", "build", *args, "--out", str(index)]) == 0
        hits = elsewhere / "hits.json"
        assert main(["search", "--index", str(index), *args, "-k", "1", "--json", str(hits)]) == 0
        found = json.loads(hits.read_text())
        assert found["distance"] == "euclidean"
        # every photo finds itself first, and both sides name their files
        for query in found["queries"]:
            assert query["neighbours"][0]["file"] == query["file"]
            assert query["neighbours"][0]["distance"] == pytest.approx(0, abs=1e-3)
            assert "label" not in query
    finally:
        hidden.rename(faces)


def test_evaluate_scores_the_run_test_classes_with_the_table_names(
    photo_run: Path, elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["evaluate", "--run", str(photo_run), "--no-progress"]) == 0
    scores = json.loads(capsys.readouterr().out)
    trained = json.loads((photo_run / "results.json").read_text())["table"][2]
    assert scores["classes"] == 3 and scores["images"] == 15
    for name in ("Recall@1", "MAP@R", "1-shot id"):
        assert scores[name] == pytest.approx(trained[name], abs=1e-6)


def test_a_finished_run_is_never_changed_silently(
    photo_run: Path, faces: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (photo_run / "config.yaml").read_text(), (photo_run / "best.pt").read_bytes()
    capsys.readouterr()
    assert main(_train_args(faces, photo_run, "--embedding-size", "16")) == 2
    error = capsys.readouterr().err
    assert "model.embedding_size: 8 -> 16" in error
    assert "--overwrite" in error and "another --out" in error
    assert main(_train_args(faces, photo_run)) == 2  # the same options: finished
    assert "finished" in capsys.readouterr().err
    assert main([*_train_args(faces, photo_run), "--resume"]) == 2
    assert ((photo_run / "config.yaml").read_text(), (photo_run / "best.pt").read_bytes()) == (
        before
    )


def test_bad_inputs_are_refused_before_anything_is_written(
    faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["--p", "20"], "p=20 classes per batch, but the training split has 7 classes"),
        (["--k", "99"], "k=99 samples per class, but the largest training class has 5"),
        (["--device", "cuda"], "no CUDA device"),
        (["--dataset", "folder:/no/such/folder"], "not found"),
        (["--rotations", "true"], "rotations"),
        (["--trunk", "no_such_trunk"], "no_such_trunk"),
    ]
    if torch.cuda.is_available():
        cases = cases[:2] + cases[3:]
    for extra, message in cases:
        out = tmp_path / "never"
        capsys.readouterr()
        assert main([*_train_args(faces, out), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out.exists(), extra
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(_train_args(faces, blocker)) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_hugging_face_trunk_from_a_local_folder_trains_and_reloads(
    tmp_path: Path, faces: Path
) -> None:
    folder = tmp_path / "tiny-vit"
    save_tiny_vit(folder, pooler=False)
    out = tmp_path / "vit-run"
    args = _train_args(faces, out, "--trunk", f"hf:{folder}", "--backbone-lr", "1e-4")
    assert main(args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["model"]["trunk"] == f"hf:{folder}"
    assert info["input_spec"]["size"] == 32
    results = json.loads((out / "results.json").read_text())
    assert results["table"][1]["embedding"] == "pretrained backbone (not fine-tuned)"
    shutil.rmtree(folder)  # the run folder keeps the architecture; the weights are its own
    emb = tmp_path / "e.npy"
    assert main(["embed", "--run", str(out), "--dataset", f"folder:{faces}", "--out",
                 str(emb), "--no-progress"]) == 0  # fmt: skip
    assert np.load(emb).shape == (50, 8)


def _expected_one_shot(emb: torch.Tensor, labels: torch.Tensor) -> float:
    """The exact average over every choice of one enrolled image per class (a loop)."""
    classes = sorted(set(labels.tolist()))
    members = [[i for i in range(len(labels)) if labels[i] == c] for c in classes]
    total, count = 0.0, 0
    for choice in np.ndindex(*[len(m) for m in members]):
        enrolled = [m[j] for m, j in zip(members, choice, strict=True)]
        correct = queries = 0
        for i in range(len(labels)):
            if i in enrolled:
                continue
            distances = [float((emb[i] - emb[e]).norm()) for e in enrolled]
            correct += int(labels[enrolled[int(np.argmin(distances))]] == labels[i])
            queries += 1
        total += correct / queries
        count += 1
    return total / count


def test_one_shot_identification_is_the_average_over_enrolment_choices() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    emb = torch.randn(8, 2, generator=generator) + labels[:, None] * 0.8
    expected = _expected_one_shot(emb, labels)
    sampled = one_shot_identification(emb, labels, draws=3000, seed=1)
    assert sampled == pytest.approx(expected, abs=0.02)
    assert 0.2 < expected < 0.95  # neither trivial nor hopeless
    separated = torch.cat([torch.zeros(3, 2), torch.full((3, 2), 9.0)])
    assert one_shot_identification(separated, torch.tensor([0, 0, 0, 1, 1, 1])) == 1.0
    assert one_shot_identification(torch.zeros(3, 2), torch.tensor([0, 1, 2])) is None


def test_synthetic_folders_are_deterministic_and_keep_each_class(tmp_path: Path) -> None:
    few = make_products(tmp_path / "a", products=3, photos=2, size=48, seed=3)
    more = make_products(tmp_path / "b", products=3, photos=4, size=48, seed=3)
    assert [p.read_bytes() for p in few] == [
        p.read_bytes() for p in more if p.name in ("view00.jpg", "view01.jpg")
    ]
    faces = make_faces(tmp_path / "c", identities=2, photos=3, size=48, seed=1)
    assert sorted({p.parent.name for p in faces}) == ["person000", "person001"]
    with pytest.raises(ValueError, match="size >= 32"):
        make_faces(tmp_path / "d", size=16)


def test_photo_augment_overrides_the_defaults_key_by_key() -> None:
    from deepmetric.config import PHOTO_AUGMENT, RunConfig
    from deepmetric.runs import build_model, photo_transforms

    config = RunConfig.from_dict({"dataset": "folder:x", "photo_augment": {"hflip": 0.0}})
    model = build_model(config.model, (3, 1, 1))
    evaluation, training, size = photo_transforms(config, model)
    assert size == 64 and evaluation.size == 64
    assert training is not None and training.hflip == 0.0
    assert tuple(training.scale) == tuple(PHOTO_AUGMENT["scale"])  # kept from the defaults
    config = RunConfig.from_dict({"dataset": "folder:x", "photo_augment": None})
    assert photo_transforms(config, model)[1] is None


def test_eval_crop_sets_the_evaluation_centre_crop() -> None:
    from deepmetric.config import RunConfig
    from deepmetric.runs import build_model, photo_transforms

    model = build_model(RunConfig().model, (3, 1, 1))
    default = photo_transforms(RunConfig.from_dict({"dataset": "folder:x"}), model)[0]
    assert (default.size, default.resize) == (64, 73)  # 224 of 256, ImageNet's recipe
    whole = RunConfig.from_dict({"dataset": "folder:x", "eval_crop": 1.0, "image_size": 96})
    evaluation = photo_transforms(whole, model)[0]
    assert (evaluation.size, evaluation.resize) == (96, 96)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="eval_crop"):
            RunConfig.from_dict({"dataset": "folder:x", "eval_crop": bad})
