"""A run's report: PNG figures and one self-contained HTML page.

* ``curves.png`` — training loss and validation metrics per epoch (from ``metrics.jsonl``);
* ``embedding_map.png`` — a 2-D map of the embeddings coloured by class, for classes seen in
  training and for unseen ones (PCA; UMAP when ``umap-learn`` is installed and asked for);
* ``neighbours.png`` — a grid of query images with their nearest neighbours among the unseen
  classes, each neighbour framed green (same class) or red (different);
* ``verification.png`` — genuine and impostor distance distributions and the ROC curve on
  held-out classes (:func:`verification_record`), with AUC, EER, TPR at FPR 1e-2 / 1e-3 and
  the calibrated threshold in a table of the page;
* extra figures passed by the caller;
* ``report.html`` — all of the above, the before/after table and the config, with the images
  embedded (base64), so the single file can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .config import METRIC_NAMES  # noqa: E402
from .evaluation.neighbors import nearest_neighbors  # noqa: E402
from .io import atomic_write, atomic_write_json  # noqa: E402
from .verification import evaluate_labelled_set, plot_verification  # noqa: E402

#: The report's verification samples at most this many genuine and this many impostor pairs
#: of the held-out split (enough to read a true accept rate at a false accept rate of 1e-3),
#: always with the same seed, so two runs are scored on the same pairs.
VERIFICATION_PAIRS = 10_000
VERIFICATION_SEED = 0
#: False accept rates at which the report reads the true accept rate.
VERIFICATION_FPRS = (1e-2, 1e-3)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: Sequence[dict[str, float]], path: Path) -> Path:
    """Training loss and every ``val_*`` metric against the epoch."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [r["epoch"] for r in records]
    ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss (mean of the epoch)", title="Loss")
    val_keys = sorted({k for r in records for k in r if k.startswith("val_")})
    for key in val_keys:
        points = [(r["epoch"], r[key]) for r in records if key in r]
        name = key[4:]
        ax_val.plot(*zip(*points, strict=True), marker="o", label=METRIC_NAMES.get(name, name))
    ax_val.set(xlabel="epoch", ylabel="score", title="Validation (classes not trained on)")
    if val_keys:
        ax_val.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def project_2d(embeddings: Tensor | np.ndarray, method: str = "pca") -> np.ndarray:
    """``(N, E)`` -> ``(N, 2)`` by PCA (default) or UMAP (needs ``umap-learn``)."""
    x = np.asarray(embeddings, dtype=np.float32)
    if method == "umap":
        try:
            import umap
        except ImportError as error:
            raise ValueError("UMAP needs the umap-learn package: pip install umap-learn") from error
        return np.asarray(umap.UMAP(n_components=2, random_state=0).fit_transform(x))
    if method != "pca":
        raise ValueError(f"projection must be 'pca' or 'umap', got {method!r}")
    from sklearn.decomposition import PCA

    return np.asarray(PCA(n_components=2, random_state=0).fit_transform(x))


def plot_embedding_map(
    groups: Sequence[tuple[str, Tensor, Tensor]],
    path: Path,
    method: str = "pca",
    max_classes: int = 20,
) -> Path:
    """One panel per ``(title, embeddings, labels)`` group, coloured by class (at most
    ``max_classes`` classes drawn, so the colours stay readable)."""
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.4), squeeze=False)
    for ax, (title, emb, labels) in zip(axes[0], groups, strict=True):
        labels_np = np.asarray(labels)
        shown = np.unique(labels_np)[:max_classes]
        keep = np.isin(labels_np, shown)
        xy = project_2d(np.asarray(emb)[keep], method)
        ax.scatter(xy[:, 0], xy[:, 1], c=labels_np[keep], cmap="tab20", s=9)
        ax.set(title=f"{title} ({len(shown)} classes, {method.upper()})", xticks=[], yticks=[])
    fig.suptitle(
        "The embeddings in two dimensions: one colour per class; a good embedding gathers "
        "each colour apart from the others",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_neighbours(
    query_images: Tensor,
    query_labels: Tensor,
    gallery_images: Tensor,
    gallery_labels: Tensor,
    neighbour_indices: Tensor,
    path: Path,
) -> Path:
    """Each row: a query image, then its nearest gallery images framed green (same class) or red.

    Args:
        query_images: ``(Q, C, H, W)``; gallery_images: ``(G, C, H, W)``.
        neighbour_indices: ``(Q, n)`` gallery indices, nearest first.
    """
    n_rows, n_cols = neighbour_indices.shape[0], neighbour_indices.shape[1] + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols, 1.3 * n_rows), squeeze=False)

    def show(ax: Any, image: Tensor, colour: str | None) -> None:
        img = image.detach().float().cpu().numpy()
        ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(colour is not None)
            if colour is not None:
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)

    for row in range(n_rows):
        show(axes[row, 0], query_images[row], None)
        axes[row, 0].set_title("query" if row == 0 else "", fontsize=8)
        for col, index in enumerate(neighbour_indices[row].tolist(), start=1):
            right = bool(gallery_labels[index] == query_labels[row])
            show(axes[row, col], gallery_images[index], "green" if right else "red")
            if row == 0:
                axes[row, col].set_title(f"nearest {col}", fontsize=8)
    fig.suptitle(
        "Each row: a query, then its nearest images; green frame: same class, red: another",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def nearest_neighbours(query: Tensor, gallery: Tensor, n: int, exclude_self: bool) -> Tensor:
    """``(Q, n)`` indices of the nearest gallery rows (Euclidean, ties to the smaller index;
    fewer when the gallery is smaller); with ``exclude_self`` the query ``i`` is gallery row ``i``
    and is skipped. :func:`deepmetric.evaluation.nearest_neighbors` does the search."""
    k = min(n, gallery.shape[0] - int(exclude_self))
    if k < 1:
        return torch.empty(len(query), 0, dtype=torch.int64)
    return nearest_neighbors(query.float(), gallery.float(), k, exclude_self=exclude_self)[1]


def verification_record(
    embeddings: Tensor, labels: Tensor, split: str, path: Path
) -> dict[str, Any]:
    """Verification on a held-out split for the report: metrics and ``path`` (a PNG).

    Samples up to :data:`VERIFICATION_PAIRS` genuine and as many impostor pairs of the
    ``(N, E)`` embeddings with their ``(N,)`` labels (seed :data:`VERIFICATION_SEED`), scores
    them by Euclidean distance and draws the distance distributions and the ROC curve.

    Returns the record for ``results.json``: ``split``, ``classes``, ``distance``, ``seed``,
    then AUC, EER, the best-accuracy (calibrated) threshold and the true accept rates at
    :data:`VERIFICATION_FPRS` with their thresholds (a pair is "same" when its distance is at
    most the threshold; a threshold that accepts nothing is ``None``). A split without two
    samples of one class, or with a single class, gives ``{"split", "skipped": reason}``
    and no figure.
    """
    classes = int(torch.unique(labels).numel())
    if classes < 2 or classes == len(labels):
        reason = f"the {split} split has {len(labels)} samples of {classes} classes"
        return {"split": split, "skipped": reason}
    result = evaluate_labelled_set(
        embeddings,
        labels,
        max_pairs=VERIFICATION_PAIRS,
        seed=VERIFICATION_SEED,
        target_fprs=VERIFICATION_FPRS,
    )
    plot_verification(result, path)
    record: dict[str, Any] = {
        "split": split,
        "classes": classes,
        "distance": "euclidean",
        "seed": VERIFICATION_SEED,
        "n_genuine": len(result.genuine),
        "n_impostor": len(result.impostor),
    }
    for key, value in result.summary().items():
        if key not in record:  # (the pair counts are kept as ints)
            record[key] = value if math.isfinite(value) else None
    return record


def verification_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's table of a :func:`verification_record`: one row per number."""

    def row(metric: str, value: float, threshold: float | None) -> dict[str, Any]:
        return {
            "metric": metric,
            "value": value,
            "threshold (same if distance <=)": "-" if threshold is None else threshold,
        }

    rows = [row("AUC", record["auc"], None)]
    rows.append(row("EER", record["eer"], record["eer_threshold"]))
    for fpr in VERIFICATION_FPRS:
        rows.append(
            row(
                f"TPR at FPR {fpr:g}",
                record[f"tpr_at_fpr_{fpr:g}"],
                record[f"threshold_at_fpr_{fpr:g}"],
            )
        )
    rows.append(
        row("accuracy (calibrated threshold)", record["best_accuracy"], record["best_threshold"])
    )
    return rows


def verification_note(record: dict[str, Any]) -> str:
    """One sentence saying what the report's verification was measured on (or why not)."""
    if "skipped" in record:
        return f"Verification skipped: {record['skipped']}."
    split = record["split"]
    chosen_on = " (the classes that chose the checkpoint)" if split == "validation" else ""
    note = (
        f"Verification on the {split} split{chosen_on}: {record['classes']} classes never "
        f"trained on, {record['n_genuine']} genuine and {record['n_impostor']} impostor pairs "
        f"(seed {record['seed']}), Euclidean distance of the embeddings; the calibrated "
        "threshold is the one of best accuracy on these pairs."
    )
    if min(VERIFICATION_FPRS) < 1 / record["n_impostor"]:
        note += f" With {record['n_impostor']} impostor pairs, FPRs below "
        note += f"{1 / record['n_impostor']:.2g} cannot be told from 0."
    return note


def _image_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def write_json(path: Path, values: dict[str, Any]) -> None:
    """``values`` as indented JSON at ``path``, written atomically (temp file + rename)."""
    atomic_write_json(path, values)


@dataclass(frozen=True)
class ReportSection:
    """A titled part of the HTML page: a table, notes and figures (each may be empty)."""

    title: str
    table: Sequence[dict[str, Any]] = ()
    notes: Sequence[str] = ()
    figures: Sequence[Path] = ()


def _html_table(table: Sequence[dict[str, Any]]) -> str:
    """Rows of ``{column: value}`` as an HTML table (floats with 4 decimals)."""
    if not table:
        return ""
    columns = list(table[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    rows = []
    for record in table:
        cells = []
        for c in columns:
            v = record.get(c, "")
            cells.append(
                f"<td>{v:.4f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _html_body(
    table: Sequence[dict[str, Any]], notes: Sequence[str], figures: Sequence[Path]
) -> str:
    return (
        _html_table(table)
        + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
        + "".join(f"<figure>{_image_tag(f)}</figure>" for f in figures if f.is_file())
    )


def write_html(
    run_dir: Path,
    title: str,
    table: Sequence[dict[str, Any]],
    figures: Sequence[Path],
    config: dict[str, Any],
    notes: Sequence[str] = (),
    sections: Sequence[ReportSection] = (),
) -> Path:
    """Write ``run_dir/report.html`` (atomically): the table, the notes, the figures
    (embedded), each of the ``sections`` under its own heading, and the config. Returns its
    path."""
    body = [
        f"<h1>{html.escape(title)}</h1>",
        _html_body(table, notes, figures),
        *(
            f"<h2>{html.escape(s.title)}</h2>" + _html_body(s.table, s.notes, s.figures)
            for s in sections
        ),
        "<h2>Config</h2><pre>" + html.escape(json.dumps(config, indent=2, default=str)) + "</pre>",
    ]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}"
        "img{max-width:100%}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
    path = run_dir / "report.html"
    atomic_write(path, page.encode())
    return path
