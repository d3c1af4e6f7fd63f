"""Models and data: shapes, shared weights, built-in data, user data, class-disjoint splits."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deepmetric import data, models


@pytest.mark.parametrize("size", [8, 28, 33])
def test_small_convnet_handles_small_and_odd_sizes(size: int) -> None:
    net = models.SmallConvNet(in_channels=1, channels=16)
    out = net(torch.randn(3, 1, size, size))
    assert out.shape == (3, 16)


def test_embedding_net_head_and_normalisation() -> None:
    trunk = models.SmallConvNet(channels=16)
    net = models.EmbeddingNet(trunk, 16, embedding_size=8, hidden=(32,), batch_norm=True)
    x = torch.randn(5, 1, 28, 28)
    emb = net(x)
    assert emb.shape == (5, 8)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(net.embed_features(net.features(x)), emb)
    raw = models.EmbeddingNet(trunk, 16, embedding_size=8, normalize=False)
    assert not torch.allclose(raw(x).norm(dim=1), torch.ones(5))


def test_siamese_and_triplet_networks_share_weights() -> None:
    net = models.EmbeddingNet(torch.nn.Flatten(), 12, embedding_size=4).eval()
    a, b, c = torch.randn(2, 3, 4), torch.randn(3, 3, 4), torch.randn(1, 3, 4)
    e1, e2 = models.SiameseNetwork(net)(a, b)
    torch.testing.assert_close(e1, net(a))
    torch.testing.assert_close(e2, net(b))
    ea, ep, en = models.TripletNetwork(net)(a, b, c)
    torch.testing.assert_close(en, net(c))
    assert ep.shape == (3, 4)


def test_optional_trunks_fail_clearly_without_the_package() -> None:
    for factory, module in [(models.torchvision_trunk, "torchvision"), (models.timm_trunk, "timm")]:
        try:
            __import__(module)
        except Exception:
            with pytest.raises(ValueError, match="not installed"):
                factory("resnet18")


def test_digits() -> None:
    digits = data.load_digits()
    assert digits.x.shape == (1797, 1, 8, 8)
    assert float(digits.x.min()) >= 0 and float(digits.x.max()) <= 1
    assert sorted(set(digits.labels.tolist())) == list(range(10))


def test_omniglot_background_and_runs() -> None:
    omniglot = data.load_omniglot(size=28)
    assert omniglot.x.shape == (4840, 1, 28, 28)
    counts = np.bincount(omniglot.labels.numpy())
    assert len(counts) == 242 and set(counts.tolist()) == {20}
    assert omniglot.class_names[0] == "Balinese/character01"
    runs = data.load_omniglot_runs(size=28)
    assert len(runs) == 20
    for run in runs:
        assert run.support.shape == run.query.shape == (20, 1, 28, 28)
        assert sorted(run.query_labels.tolist()) == list(range(20))
    # strokes are bright on a dark background
    assert float(omniglot.x.mean()) < 0.3


def _write_png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12), value, dtype=np.uint8)).save(path)


def test_image_folder_skips_corrupt_files_with_warnings(tmp_path: Path) -> None:
    _write_png(tmp_path / "cats" / "a.png", 10)
    _write_png(tmp_path / "cats" / "b.png", 20)
    _write_png(tmp_path / "dogs" / "c.png", 250)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.load_image_folder(tmp_path, size=8)
    messages = [str(w.message) for w in caught]
    assert any("broken.png" in m for m in messages)
    assert any("skipped 1 unreadable image(s) of 4" in m for m in messages)
    assert ds.x.shape == (3, 1, 8, 8) and ds.class_names == ["cats", "dogs"]
    assert ds.labels.tolist() == [0, 0, 1]
    assert float(ds.x[2].mean()) == pytest.approx(250 / 255, abs=1e-3)


def test_image_csv(tmp_path: Path) -> None:
    _write_png(tmp_path / "img" / "a.png", 0)
    _write_png(tmp_path / "img" / "b.png", 255)
    (tmp_path / "list.csv").write_text("path,label\nimg/a.png,zebra\nimg/b.png,ant\n")
    ds = data.load_image_csv(tmp_path / "list.csv", size=4, grayscale=False)
    assert ds.x.shape == (2, 3, 4, 4)
    assert ds.class_names == ["ant", "zebra"] and ds.labels.tolist() == [1, 0]
    (tmp_path / "bad.csv").write_text("img/a.png\n")
    with pytest.raises(ValueError, match="row 1"):
        data.load_image_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="not found"):
        data.load_image_csv(tmp_path / "missing.csv")


def test_arrays(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (6, 5, 5), dtype=np.uint8)
    y = np.array([0, 0, 1, 1, 2, 2])
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    ds = data.load_arrays(tmp_path / "d.npz")
    assert ds.x.shape == (6, 1, 5, 5) and float(ds.x.max()) <= 1.0
    np.save(tmp_path / "f.npy", np.ones((6, 3), dtype=np.float32))
    np.save(tmp_path / "y.npy", y)
    assert data.load_arrays(tmp_path / "f.npy", tmp_path / "y.npy").x.shape == (6, 3)
    np.save(tmp_path / "yf.npy", y.astype(float))
    with pytest.raises(ValueError, match="integers"):
        data.load_arrays(tmp_path / "f.npy", tmp_path / "yf.npy")
    with pytest.raises(ValueError, match="labels_path"):
        data.load_arrays(tmp_path / "f.npy")


def test_split_by_class_is_class_disjoint_and_reproducible() -> None:
    labels = np.repeat(np.arange(20), 5)
    split = data.split_by_class(labels, test_classes=0.25, val_classes=3, seed=1)
    assert len(split.test_classes) == 5 and len(split.val_classes) == 3
    parts = [set(labels[split.train]), set(labels[split.val]), set(labels[split.test])]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert len(split.train) + len(split.val) + len(split.test) == 100
    again = data.split_by_class(labels, test_classes=0.25, val_classes=3, seed=1)
    assert np.array_equal(again.test, split.test)
    explicit = data.split_by_class(labels, test_classes=[6, 7, 8, 9], seed=0)
    assert set(explicit.test_classes.tolist()) == {6, 7, 8, 9}
    with pytest.raises(ValueError, match="no classes to train"):
        data.split_by_class(labels, test_classes=20)
    with pytest.raises(ValueError, match="not available"):
        data.split_by_class(labels, test_classes=[99])
