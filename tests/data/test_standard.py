"""The benchmark readers on tiny fake trees written in each dataset's own layout: labels, paths
and splits checked against the listing files the test writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepmetric import data


def _image(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (5, 4), (value, value, value)).save(path)
    return path


def _expect(ds: data.ImageDataset, truth: list[tuple[Path, str]]) -> None:
    """The dataset lists exactly ``truth`` (path, class name) in order, labels numbering the
    class names."""
    assert ds.paths == [p.absolute() for p, _ in truth]
    assert [ds.class_names[int(y)] for y in ds.labels] == [name for _, name in truth]
    assert ds.labels.unique().tolist() == list(range(len(ds.class_names)))


def test_cub200_splits_classes_1_to_100_and_101_to_200(tmp_path: Path) -> None:
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    names = {c: f"{c:03d}.Bird_{c}" for c in range(1, 201)}
    (root / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in names.items()))
    # image ids deliberately not in class order; boundary classes 100 and 101 included
    images = [(3, 100), (1, 1), (2, 101), (4, 200), (5, 1), (6, 150)]
    lines, labels, truth = [], [], {"train": [], "test": []}
    for image_id, cls in sorted(images):
        rel = f"{names[cls]}/img_{image_id}.jpg"
        _image(root / "images" / rel)
        lines.append(f"{image_id} {rel}\n")
        labels.append(f"{image_id} {cls}\n")
        truth["train" if cls <= 100 else "test"].append((root / "images" / rel, names[cls]))
    (root / "images.txt").write_text("".join(lines))
    (root / "image_class_labels.txt").write_text("".join(labels))
    train = data.cub200(tmp_path, "train")  # the parent folder works too
    _expect(train, truth["train"])
    assert train.class_names == ["001.Bird_1", "100.Bird_100"]
    _expect(data.cub200(root, "test"), truth["test"])
    assert len(data.open_dataset(f"cub:{root}")) == 3
    with pytest.raises(ValueError, match="train, test"):
        data.cub200(root, "val")
    with pytest.raises(ValueError, match="does not hold images.txt"):
        data.cub200(tmp_path / "CUB_200_2011" / "images")


def test_cars196_reads_cars_annos_mat(tmp_path: Path) -> None:
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    rows = [("car_ims/000001.jpg", 1), ("car_ims/000002.jpg", 99), ("car_ims/000003.jpg", 98)]
    rows += [("car_ims/000004.jpg", 196), ("car_ims/000005.jpg", 1)]
    # a 1 x N struct array and a 1 x 196 cell array, as MATLAB wrote the real file
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (rel, cls) in enumerate(rows):
        _image(tmp_path / rel)
        box = [np.array([[v]], dtype=np.uint16) for v in (1, 1, 4, 3)]
        annotations[0, i] = (
            np.array([rel]),
            *box,
            np.array([[cls]], np.uint8),
            np.array([[i % 2]]),
        )
    class_names = np.empty((1, 196), dtype=object)
    for c in range(196):
        class_names[0, c] = np.array([f"Make {c + 1} 2012"])
    savemat(tmp_path / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})

    def truth(keep: range) -> list[tuple[Path, str]]:
        return [(tmp_path / rel, f"Make {cls} 2012") for rel, cls in rows if cls in keep]

    _expect(data.cars196(tmp_path, "train"), truth(range(1, 99)))
    _expect(data.cars196(tmp_path, "test"), truth(range(99, 197)))
    assert data.open_dataset(f"cars196:{tmp_path}", split="test").class_names == [
        "Make 99 2012",
        "Make 196 2012",
    ]


def test_stanford_online_products_lists(tmp_path: Path) -> None:
    root = tmp_path / "Stanford_Online_Products"
    truth = {}
    for split, entries in {
        "train": [(1, 1, "bicycle_final/111_0.JPG"), (2, 1, "bicycle_final/111_1.JPG")],
        "test": [(3, 11319, "mug_final/999_0.JPG"), (4, 11320, "mug_final/998_0.JPG")],
    }.items():
        lines = ["image_id class_id super_class_id path\n"]
        lines += [f"{i} {c} {1 if split == 'train' else 8} {p}\n" for i, c, p in entries]
        (root / f"Ebay_{split}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"Ebay_{split}.txt").write_text("".join(lines))
        truth[split] = [(_image(root / p), str(c)) for _, c, p in entries]
    _expect(data.stanford_online_products(tmp_path, "train"), truth["train"])
    _expect(data.open_dataset(f"sop:{root}", split="test"), truth["test"])
    (root / "mug_final" / "998_0.JPG").unlink()
    with pytest.raises(ValueError, match="1 of the 2 images listed.*998_0.JPG"):
        data.stanford_online_products(root, "test")


def test_inshop_partition_query_and_gallery_share_labels(tmp_path: Path) -> None:
    root = tmp_path / "inshop"
    rows = [
        ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
        ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
        ("img/MEN/Denim/id_00000007/01_1_front.jpg", "id_00000007", "train"),
        ("img/MEN/Tees/id_00000030/01_1_front.jpg", "id_00000030", "query"),
        ("img/MEN/Tees/id_00000030/01_2_side.jpg", "id_00000030", "gallery"),
        ("img/WOMEN/Tees/id_00000010/01_1_front.jpg", "id_00000010", "gallery"),
        ("img/WOMEN/Tees/id_00000010/01_3_back.jpg", "id_00000010", "query"),
        ("img/WOMEN/Tees/id_00000010/01_4_full.jpg", "id_00000010", "gallery"),
    ]
    for rel, _, _ in rows:
        _image(root / "Img" / rel)  # the images under Img/, as the archive unpacks
    (root / "Eval").mkdir()
    listing = f"{len(rows)}\nimage_name item_id evaluation_status\n"
    listing += "".join(f"{p}   {i}   {s}\n" for p, i, s in rows)
    (root / "Eval" / "list_eval_partition.txt").write_text(listing)

    def truth(status: set[str]) -> list[tuple[Path, str]]:
        return [(root / "Img" / p, i) for p, i, s in rows if s in status]

    train = data.inshop(root, "train")
    _expect(train, truth({"train"}))
    assert train.class_names == ["id_00000002", "id_00000007"] and train.is_query is None
    query, gallery = data.inshop(root, "query"), data.inshop(root, "gallery")
    assert query.paths == [p for p, _ in truth({"query"})]
    assert gallery.paths == [p for p, _ in truth({"gallery"})]
    assert query.class_names == gallery.class_names == ["id_00000010", "id_00000030"]
    assert [query.class_names[y] for y in query.labels] == ["id_00000030", "id_00000010"]
    assert [gallery.class_names[y] for y in gallery.labels] == [i for _, i in truth({"gallery"})]
    test = data.open_dataset(f"inshop:{root}", split="test")
    _expect(test, truth({"query", "gallery"}))
    assert test.is_query is not None and test.is_gallery is not None
    assert test.is_query.tolist() == [s == "query" for _, _, s in rows if s != "train"]
    assert (test.is_query ^ test.is_gallery).all()
    (root / "Eval" / "list_eval_partition.txt").write_text("9\n" + listing.split("\n", 1)[1])
    with pytest.raises(ValueError, match="announces 9 images but lists 8"):
        data.inshop(root, "train")
