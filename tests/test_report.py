"""The run report's pieces: the verification record, table and note, the 2-D projection and
the HTML/JSON files, against values computed here by brute force."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from deepmetric import report

NO_UMAP = importlib.util.find_spec("umap") is None


def _identities(n_ids: int, per_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    centres = torch.randn(n_ids, 8, generator=generator)
    return centres[labels] + 0.4 * torch.randn(len(labels), 8, generator=generator), labels


def test_verification_record_uses_every_pair_of_a_small_split(tmp_path: Path) -> None:
    x, labels = _identities(4, 5, seed=0)  # 40 genuine and 150 impostor pairs: all taken
    record = report.verification_record(x, labels, "test", tmp_path / "v.png")
    genuine, impostor = [], []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            d = float(torch.linalg.vector_norm(x[i].double() - x[j].double()))
            (genuine if labels[i] == labels[j] else impostor).append(d)
    assert (record["split"], record["classes"], record["distance"]) == ("test", 4, "euclidean")
    assert (record["n_genuine"], record["n_impostor"]) == (40, 150)
    wins = sum((g < i) + 0.5 * (g == i) for g in genuine for i in impostor)
    assert record["auc"] == pytest.approx(wins / (40 * 150))
    correct = [
        sum(g <= t for g in genuine) + sum(i > t for i in impostor)
        for t in [-np.inf, *genuine, *impostor]
    ]
    assert record["best_accuracy"] == pytest.approx(max(correct) / 190)
    assert min(abs(record["best_threshold"] - d) for d in genuine + impostor) < 1e-5
    for fpr in report.VERIFICATION_FPRS:
        assert 0 <= record[f"tpr_at_fpr_{fpr:g}"] <= 1
    json.dumps(record, allow_nan=False)  # strict JSON
    image = matplotlib.image.imread(tmp_path / "v.png")
    assert image.shape[2] == 4 and image[..., :3].std() > 0.05


def test_verification_record_caps_the_pairs(tmp_path: Path) -> None:
    x, labels = _identities(30, 40, seed=1)  # 23,400 genuine pairs, ~700k impostor pairs
    record = report.verification_record(x, labels, "validation", tmp_path / "v.png")
    assert record["n_genuine"] == record["n_impostor"] == report.VERIFICATION_PAIRS
    again = report.verification_record(x, labels, "validation", tmp_path / "w.png")
    assert again == record  # the same pairs every time
    assert record["auc"] > 0.95  # well separated identities
    note = report.verification_note(record)
    assert "validation split" in note and "chose the checkpoint" in note


def test_a_threshold_that_accepts_nothing_is_none(tmp_path: Path) -> None:
    # on a line; the closest pair (distance 0.1) is an impostor pair, so at FPR 0 nothing is
    # accepted: with 12 impostor pairs the TPR at FPR 1e-3 is 0 at threshold -inf; accepting
    # nothing is also (tied with 0.2) the best accuracy, 12 / 15
    x = torch.tensor([[0.0], [0.1], [1.0], [1.15], [5.0], [5.2]])
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    record = report.verification_record(x, labels, "test", tmp_path / "v.png")
    assert record["tpr_at_fpr_0.001"] == 0.0
    assert record["threshold_at_fpr_0.001"] is None
    json.dumps(record, allow_nan=False)
    rows = report.verification_rows(record)
    assert [r["metric"] for r in rows] == [
        "AUC",
        "EER",
        "TPR at FPR 0.01",
        "TPR at FPR 0.001",
        "accuracy (calibrated threshold)",
    ]
    assert record["best_accuracy"] == pytest.approx(12 / 15) and record["best_threshold"] is None
    assert rows[3]["threshold (same if distance <=)"] == "-"
    assert rows[4] == {
        "metric": "accuracy (calibrated threshold)",
        "value": record["best_accuracy"],
        "threshold (same if distance <=)": "-",
    }
    assert rows[1]["threshold (same if distance <=)"] == record["eer_threshold"] is not None
    assert "FPRs below 0.083 cannot be told from 0" in report.verification_note(record)


@pytest.mark.parametrize(
    "labels", [torch.zeros(5, dtype=torch.long), torch.arange(5)], ids=["one class", "singletons"]
)
def test_verification_is_skipped_without_pairs(tmp_path: Path, labels: torch.Tensor) -> None:
    record = report.verification_record(torch.randn(5, 3), labels, "test", tmp_path / "v.png")
    assert record["split"] == "test" and "5 samples" in record["skipped"]
    assert not (tmp_path / "v.png").exists()
    assert report.verification_note(record).startswith("Verification skipped: the test split")


def test_pca_projection_against_an_svd() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    xy = report.project_2d(x.astype(np.float32), "pca")
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    signs = np.sign((xy * expected).sum(axis=0))  # each component is defined up to its sign
    np.testing.assert_allclose(xy * signs, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not NO_UMAP, reason="umap-learn is installed")
def test_umap_projection_without_umap_learn_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="pip install umap-learn"):
        report.project_2d(np.zeros((10, 3), dtype=np.float32), "umap")
    with pytest.raises(ValueError, match="projection must be 'pca' or 'umap', got 'tsne'"):
        report.project_2d(np.zeros((10, 3), dtype=np.float32), "tsne")


def test_html_page_with_a_section(tmp_path: Path) -> None:
    x, labels = _identities(4, 5, seed=2)
    png = tmp_path / "verification.png"
    record = report.verification_record(x, labels, "test", png)
    section = report.ReportSection(
        "Verification on unseen classes",
        table=report.verification_rows(record),
        notes=[report.verification_note(record)],
        figures=[png, tmp_path / "missing.png"],  # a missing figure is left out
    )
    page = report.write_html(
        tmp_path,
        "a run",
        [{"embedding": "trained network", "Recall@1": 0.5}],
        [],
        {"dataset": "digits"},
        notes=["a note"],
        sections=[section],
    )
    text = page.read_text()
    main_table, verification, config = (
        text.index("<td>0.5000</td>"),
        text.index("<h2>Verification on unseen classes</h2>"),
        text.index("<h2>Config</h2>"),
    )
    assert main_table < verification < config
    assert f"<td>AUC</td><td>{record['auc']:.4f}</td><td>-</td>" in text
    assert text.count("data:image/png;base64,") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "verification.png"]


def test_write_json_round_trips_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("old")
    report.write_json(path, {"a": [1, 2.5], "b": None})
    assert json.loads(path.read_text()) == {"a": [1, 2.5], "b": None}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left


def _loop_neighbours(query: np.ndarray, gallery: np.ndarray, n: int, exclude_self: bool) -> list:
    """Each query's gallery rows by (distance, index), itself left out: one query at a time."""
    result = []
    for i, q in enumerate(query):
        dists = [float(((g - q) ** 2).sum()) for g in gallery]
        order = sorted(range(len(gallery)), key=lambda j: (dists[j], j))
        if exclude_self:
            order.remove(i)
        result.append(order[:n])
    return result


@pytest.mark.parametrize("exclude_self", [False, True])
def test_nearest_neighbours_match_a_loop_with_ties(exclude_self: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    gallery = torch.randint(0, 3, (40, 2), generator=generator).float()  # many ties
    query = gallery[:15] if exclude_self else torch.randint(0, 3, (15, 2), generator=generator)
    for n in (1, 5, 60):  # 60: more than the gallery holds, all of it
        got = report.nearest_neighbours(query.float(), gallery, n, exclude_self)
        want = _loop_neighbours(query.numpy(), gallery.numpy(), n, exclude_self)
        assert got.tolist() == want


def test_nearest_neighbours_of_a_lone_gallery_row_are_none() -> None:
    one = torch.ones(1, 4)
    assert report.nearest_neighbours(one, one, 6, exclude_self=True).shape == (1, 0)
