"""Lazy image datasets (:mod:`deepmetric.data.images`): listing, decoding every format, unreadable
files, CSV listings, seeded samples through a DataLoader with worker processes."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from deepmetric import data
from deepmetric.transforms import EvalTransform, SmallImageTransform, TrainTransform
from tests.data.image_files import _noise, _save, _write_csv


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


def _pixels(ds: data.ImageDataset, index: int) -> np.ndarray:
    x, _, _ = ds[index]
    assert x is not None
    return np.rint(x.numpy() * 255).astype(int)


def test_suffixes_cover_what_pillow_reads() -> None:
    wanted = {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pnm", ".tif", ".tiff", ".webp", ".gif"}
    assert wanted | {".bmp"} <= set(data.IMAGE_SUFFIXES)
    assert ".h5" not in data.IMAGE_SUFFIXES  # identify-only stub formats are left out


def test_image_folder_lists_nested_files_of_every_format(tmp_path: Path) -> None:
    formats = ["png", "jpg", "pgm", "ppm", "pnm", "tif", "webp", "gif", "bmp"]
    expected = {}
    for i, suffix in enumerate(formats):
        cls = "birds" if i % 2 else "apes"
        path = tmp_path / cls / ("deep" if i % 3 == 0 else "") / f"img{i}.{suffix.upper()}"
        grey = Image.new("L", (6, 4), 10 * i)
        image = grey if suffix == "pgm" else grey.convert("RGB")
        expected[path] = (cls, _save(path, image))
    (tmp_path / "apes" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "apes" / "._img0.png").write_bytes(b"macOS resource fork")
    (tmp_path / "apes" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden_class").mkdir()
    _save(tmp_path / ".hidden_class" / "x.png", Image.new("RGB", (2, 2)))
    _save(tmp_path / "loose.png", Image.new("RGB", (2, 2)))  # not inside a class: ignored

    ds = data.image_folder(tmp_path)
    assert ds.class_names == ["apes", "birds"]
    assert len(ds) == len(formats)
    assert all(p.is_absolute() for p in ds.paths)
    assert {p: ds.class_names[int(y)] for p, y in zip(ds.paths, ds.labels, strict=True)} == {
        p: cls for p, (cls, _) in expected.items()
    }
    assert ds.input_channels == 3 and ds.is_query is None
    for i, path in enumerate(ds.paths):
        value = 10 * int(path.stem[3:])
        if path.suffix.lower() not in (".jpg", ".webp"):  # lossless formats: exact values
            assert (_pixels(ds, i) == value).all(), path
    grey = data.image_folder(tmp_path, mode="L")
    assert grey.input_channels == 1 and grey[0][0] is not None and grey[0][0].shape[0] == 1


def test_image_folder_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        data.image_folder(tmp_path / "missing")
    _save(tmp_path / "flat" / "a.png", Image.new("RGB", (2, 2)))
    with pytest.raises(ValueError, match="no class sub-folders.*1 images lie in it"):
        data.image_folder(tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"no images found in the class folders of {tmp_path}"):
        data.image_folder(tmp_path / "empty")
    _save(tmp_path / "some" / "a" / "1.png", Image.new("RGB", (2, 2)))
    (tmp_path / "some" / "b").mkdir()
    with pytest.warns(UserWarning, match="1 class folder.*left out: b"):
        ds = data.image_folder(tmp_path / "some")
    assert ds.class_names == ["a"]


def _exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def test_decode_applies_exif_orientation_and_takes_the_first_frame(tmp_path: Path) -> None:
    array = np.zeros((10, 20), dtype=np.uint8)
    array[:, :5] = 200  # a bright band on the left
    # orientation 6: the stored image is shown turned 90 degrees clockwise
    path = _save(tmp_path / "turned.png", Image.fromarray(array), exif=_exif_orientation(6))
    decoded = np.asarray(data.decode_image(path, "L"))
    assert decoded.shape == (20, 10)
    assert np.array_equal(decoded, np.rot90(array, k=-1))

    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=10)
    assert Image.open(gif).n_frames == 2
    assert np.asarray(data.decode_image(gif, "RGB"))[0, 0].tolist() == [255, 0, 0]
    tiff = tmp_path / "pages.tif"
    frames[1].save(tiff, save_all=True, append_images=frames[:1])
    assert np.asarray(data.decode_image(tiff, "RGB"))[0, 0].tolist() == [0, 0, 255]


def test_decode_sixteen_bit_grey_by_its_full_range(tmp_path: Path) -> None:
    for maxval in (65535, 4095):
        values = np.array([[0, 1000, maxval // 2, maxval]], dtype=">u2")
        path = tmp_path / f"deep{maxval}.pgm"
        path.write_bytes(b"P5\n4 1\n%d\n" % maxval + values.tobytes())
        decoded = np.asarray(data.decode_image(path, "L")).astype(int)
        expected = np.rint(values.astype(float) / maxval * 255).astype(int)
        assert np.abs(decoded - expected).max() <= 1, (maxval, decoded, expected)
    png16 = _save(tmp_path / "deep.png", Image.fromarray(np.array([[0, 30000, 65535]], np.uint16)))
    decoded = np.asarray(data.decode_image(png16, "RGB"))
    assert decoded[0, :, 0].tolist() == [0, round(30000 / 65535 * 255), 255]


def test_decode_composites_transparency_on_white(tmp_path: Path) -> None:
    rgba = np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], dtype=np.uint8)
    path = _save(tmp_path / "alpha.png", Image.fromarray(rgba, "RGBA"))
    decoded = np.asarray(data.decode_image(path, "RGB")).astype(float)
    alpha = rgba[0, :, 3:] / 255
    expected = alpha * rgba[0, :, :3] + (1 - alpha) * 255
    assert np.abs(decoded[0] - expected).max() <= 1
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette_path = _save(tmp_path / "palette.png", palette, transparency=0)
    assert np.asarray(data.decode_image(palette_path, "RGB")).tolist() == [
        [[255, 255, 255], [0, 255, 0]]
    ]


def _truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    _noise(99, (64, 64)).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def test_unreadable_file_gives_none_and_warns_once(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "good.png", _noise(0))
    _truncated_jpeg(tmp_path / "a" / "half.jpg")
    ds = data.image_folder(tmp_path)
    bad = [p.name for p in ds.paths].index("half.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ds[bad]
        second = ds[bad]
    assert first == (None, 0, bad) and second == (None, 0, bad)
    assert [str(w.message) for w in caught if "half.jpg" in str(w.message)] != []
    assert len(caught) == 1


def test_samples_keys_subset_and_with_transform(tmp_path: Path) -> None:
    for i in range(4):
        _save(tmp_path / f"c{i % 2}" / f"{i}.png", _noise(i, (40, 30)))
    ds = data.image_folder(tmp_path)
    x, label, index = ds[-1]
    assert (label, index) == (1, 3) and x is not None and x.shape == (3, 30, 40)
    train = ds.with_transform(TrainTransform(16))
    assert ds.transform is None and train.paths is ds.paths
    a, b, other = train[(2, 11)][0], train[(2, 11)][0], train[(2, 12)][0]
    assert a is not None and b is not None and other is not None
    assert torch.equal(a, b) and not torch.equal(a, other)
    evaluated = ds.with_transform(EvalTransform(16))
    assert torch.equal(evaluated[np.int64(2)][0], evaluated[2][0])  # type: ignore[index, arg-type]
    part = train.subset([3, 0])
    assert part.paths == [ds.paths[3], ds.paths[0]] and part.labels.tolist() == [1, 0]
    assert part.class_names == ds.class_names and part.transform is train.transform
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="mode"):
        data.image_folder(tmp_path, mode="CMYK")


def test_collate_samples_drops_unreadable_and_takes_array_samples() -> None:
    x = torch.ones(3, 2, 2)
    batch, labels, skipped = data.collate_samples([(x, 1, 0), (None, 2, 5), (2 * x, 0, 7)])
    assert batch.shape == (2, 3, 2, 2) and torch.equal(batch[1], 2 * x)
    assert labels.tolist() == [1, 0] and labels.dtype == torch.long and skipped == [5]
    empty = data.collate_samples([(None, 0, 1), (None, 1, 2)])
    assert empty[0].shape == (0,) and empty[1].shape == (0,) and empty[2] == [1, 2]
    arrays = data.ArrayDataset(torch.arange(12.0).view(6, 2), torch.tensor([0, 1, 0, 1, 2, 2]))
    loader = DataLoader(arrays, batch_size=4, collate_fn=data.collate_samples)
    first = next(iter(loader))
    assert torch.equal(first[0], arrays.x[:4]) and first[1].tolist() == [0, 1, 0, 1]
    assert first[2] == []


class _SeededSampler(Sampler[tuple[int, int]]):
    """Every index with a seed of its own, as the trainer's sampler hands them out."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter([(i, 1000 + i) for i in reversed(range(self.n))])


def test_dataloader_workers_skip_the_corrupt_file_and_match_direct_decoding(
    tmp_path: Path,
) -> None:
    for i in range(7):
        _save(tmp_path / f"class{i % 3}" / f"{i}.jpg", _noise(i, (48, 40)), quality=90)
    _truncated_jpeg(tmp_path / "class1" / "broken.jpg")
    ds = data.image_folder(tmp_path, transform=TrainTransform(24, color_jitter=0.2))
    broken = [p.name for p in ds.paths].index("broken.jpg")
    loader = DataLoader(
        ds,
        batch_size=3,
        sampler=_SeededSampler(len(ds)),
        num_workers=2,
        collate_fn=data.collate_samples,
    )
    seen, skipped = [], []
    for x, labels, dropped in loader:
        seen.append((x, labels))
        skipped.extend(dropped)
    assert skipped == [broken]
    decoded = torch.cat([x for x, _ in seen])
    order = [i for i in reversed(range(len(ds))) if i != broken]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = [ds[(i, 1000 + i)][0] for i in order]
    assert torch.equal(decoded, torch.stack([d for d in direct if d is not None]))
    assert torch.cat([y for _, y in seen]).tolist() == [int(ds.labels[i]) for i in order]


def test_image_csv_columns_splits_and_marks(tmp_path: Path) -> None:
    for name in "abcde":
        _save(tmp_path / "img" / f"{name}.png", _noise(ord(name), (8, 8)))
    absolute = tmp_path / "img" / "e.png"
    listing = _write_csv(
        tmp_path / "list.csv",
        "Split,label,path,is_query,is_gallery,comment\n"
        "train,zebra,img/a.png,0,1,x\n"
        "train,ant,img/b.png,false,true,\n"
        "\n"
        "test,ant,img/c.png,1,0,\n"
        "test,bee,img/d.png,TRUE,1,\n"
        f"val,bee,{absolute},0,0,\n",
    )
    everything = data.image_csv(listing)
    assert everything.class_names == ["ant", "bee", "zebra"]
    assert everything.labels.tolist() == [2, 0, 0, 1, 1]
    assert everything.paths[0] == (tmp_path / "img" / "a.png").absolute()
    assert everything.paths[4] == absolute
    assert everything.is_query is not None and everything.is_gallery is not None
    assert everything.is_query.tolist() == [False, False, True, True, False]
    assert everything.is_gallery.tolist() == [True, True, False, True, False]
    test = data.image_csv(listing, split="test")
    assert [p.name for p in test.paths] == ["c.png", "d.png"]
    assert test.class_names == ["ant", "bee"] and test.labels.tolist() == [0, 1]
    assert test.is_query is not None and test.is_query.tolist() == [True, True]
    plain = data.image_csv(_write_csv(tmp_path / "plain.csv", "path,label\nimg/a.png,1\n"))
    assert plain.is_query is None and plain.class_names == ["1"]


def test_image_csv_bad_input(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _noise(0, (4, 4)))
    with pytest.raises(ValueError, match="lacks the column.*label"):
        data.image_csv(_write_csv(tmp_path / "1.csv", "path,class\na.png,x\n"))
    with pytest.raises(ValueError, match="lacks the column.*path, label"):
        data.image_csv(_write_csv(tmp_path / "2.csv", "a.png,x\n"))
    with pytest.raises(
        ValueError, match=r"line 3: split 'training' is not one of train, val, test"
    ):
        data.image_csv(
            _write_csv(tmp_path / "3.csv", "path,label,split\na.png,x,train\na.png,y,training\n")
        )
    with pytest.raises(ValueError, match="no 'split' column"):
        data.image_csv(_write_csv(tmp_path / "4.csv", "path,label\na.png,x\n"), split="train")
    with pytest.raises(ValueError, match="split must be one of"):
        data.image_csv(tmp_path / "4.csv", split="dev")
    with pytest.raises(ValueError, match="line 2: is_query is 'yes'"):
        data.image_csv(_write_csv(tmp_path / "5.csv", "path,label,is_query\na.png,x,yes\n"))
    with pytest.raises(ValueError, match="1 of the 2 images.*missing.png"):
        data.image_csv(_write_csv(tmp_path / "6.csv", "path,label\na.png,x\nmissing.png,y\n"))
    with pytest.raises(ValueError, match="lists no images with split 'val'"):
        data.image_csv(
            _write_csv(tmp_path / "7.csv", "path,label,split\na.png,x,train\n"), split="val"
        )
    with pytest.raises(ValueError, match="not found"):
        data.image_csv(tmp_path / "none.csv")


def test_load_image_folder_reads_pgm_and_matches_the_small_transform(tmp_path: Path) -> None:
    faces = np.random.default_rng(0).integers(0, 256, (3, 46, 56), dtype=np.uint8)
    for i, face in enumerate(faces):
        _save(tmp_path / f"s{i % 2}" / f"{i}.pgm", Image.fromarray(face))
    in_memory = data.load_image_folder(tmp_path, size=28)
    lazy = data.image_folder(tmp_path, transform=SmallImageTransform(28), mode="L")
    assert in_memory.x.shape == (3, 1, 28, 28)
    for i in range(3):
        assert torch.equal(in_memory.x[i], lazy[i][0])  # type: ignore[arg-type]
        by_hand = Image.fromarray(faces[[0, 2, 1][i]]).resize((28, 28), Image.BILINEAR)
        assert np.allclose(in_memory.x[i, 0].numpy(), np.asarray(by_hand) / 255)
