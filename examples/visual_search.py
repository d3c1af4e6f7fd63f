"""Visual product search, end to end, on a catalogue of photos this script makes.

    python examples/visual_search.py [--out runs/visual-search] [--epochs 4]

1. A catalogue of 40 products × 8 photos (synthetic: shapes, patterns and labels under varying
   viewpoint, lighting and clutter) is written as ``catalogue/<product>/<photo>.jpg``; the first
   30 products train the model, the last 10 are products it never saw.
2. ``deepmetric train`` fine-tunes a pretrained backbone (EfficientNet-Lite0, ImageNet weights
   shipped in the ``efficientnet`` extra; the built-in small CNN from scratch when the extra is
   not installed) on the 30 training products.
3. ``deepmetric index build`` embeds one gallery of the 10 new products (6 photos each) into a
   faiss index, with no retraining.
4. ``deepmetric search`` finds, for each of the 2 remaining photos of every new product, the 5
   nearest gallery photos: their files, product names and distances.

The same commands work on a folder of real product photos: one sub-folder per product.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

from deepmetric.cli import main
from deepmetric.data.synthetic import make_products


def run(out: Path, epochs: int, progress: bool = True) -> dict[str, float]:
    """Make the data, train, index and search; returns the top-1 and top-5 hit rates of the
    queries (the nearest gallery photo, or any of the 5, shows the same product)."""
    if out.exists():
        shutil.rmtree(out)
    catalogue, gallery, queries = out / "catalogue", out / "gallery", out / "queries"
    make_products(catalogue, products=40, photos=8, size=128, seed=0)
    for folder in sorted(catalogue.iterdir())[30:]:  # 10 products never trained on
        photos = sorted(folder.iterdir())
        for target, chosen in ((gallery, photos[:6]), (queries, photos[6:])):
            (target / folder.name).mkdir(parents=True, exist_ok=True)
            for photo in chosen:
                photo.rename(target / folder.name / photo.name)
        folder.rmdir()

    pretrained = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
    trunk = ["--trunk", "efficientnet_lite0", "--backbone-lr", "1e-4"] if pretrained else []
    run_dir = out / "run"
    no_progress = [] if progress else ["--no-progress"]
    status = main(
        ["train", "--dataset", f"folder:{catalogue}", *trunk, "--out", str(run_dir)]
        + ["--epochs", str(epochs), "--p", "8", "--k", "4", "--test-classes", "0.2"]
        + ["--val-classes", "0", "--loss", "MultiSimilarityLoss", "--lr", "1e-3", *no_progress]
    )
    if status != 0:
        raise SystemExit(status)
    index = out / "gallery.index"
    main(
        [
            "index",
            "build",
            "--run",
            str(run_dir),
            "--dataset",
            f"folder:{gallery}",
            "--out",
            str(index),
        ]
    )
    hits = out / "hits.json"
    args = ["--index", str(index), "--run", str(run_dir), "--dataset", f"folder:{queries}"]
    main(["search", *args, "-k", "5", "--json", str(hits)])
    found = json.loads(hits.read_text())["queries"]
    first = found[0]
    print(f"\nquery {first['file']} ({first['class_name']}):")
    for rank, hit in enumerate(first["neighbours"], start=1):
        print(f"  {rank}. {hit['class_name']:<12} distance {hit['distance']:.3f}  {hit['file']}")
    top1 = sum(q["neighbours"][0]["class_name"] == q["class_name"] for q in found) / len(found)
    top5 = sum(
        any(h["class_name"] == q["class_name"] for h in q["neighbours"]) for q in found
    ) / len(found)
    print(f"\n{len(found)} queries of 10 new products: top-1 {top1:.2f}, top-5 {top5:.2f}")
    return {"top1": top1, "top5": top5}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/visual-search"))
    parser.add_argument("--epochs", type=int, default=4)
    options = parser.parse_args()
    run(options.out, options.epochs)
