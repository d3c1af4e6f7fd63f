"""A run folder: what ``deepmetric train`` writes, and everything later commands need.

A run folder is self-contained: ``config.yaml`` (the options), ``run.json`` (the model's input
and the class names, recorded at training time) and the checkpoints rebuild the trained model
without the training data, from any working directory. Besides them: ``metrics.jsonl`` (one
record per epoch), ``results.json`` (the scores; its presence marks a finished run) and the
report (``report.html`` and its figures).

Re-running ``train`` into a folder that holds a run never silently changes it
(:func:`prepare`): a finished run, or one made with other options, is refused with a message
that says how to go on (``--resume`` with the same options, ``--overwrite``, or a new
``--out``); an interrupted run with the same options resumes.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import RunConfig, load_config, save_config
from .io import atomic_write, atomic_write_json

__all__ = [
    "RUN_FILES",
    "RunInfo",
    "config_differences",
    "prepare",
    "read_info",
    "write_info",
]

RUN_INFO = "run.json"
RUN_INFO_FORMAT = "deepmetric-run"
RUN_INFO_VERSION = 1
#: The files and folders a run writes; ``--overwrite`` deletes these and nothing else.
RUN_FILES = (
    "config.yaml",
    RUN_INFO,
    "last.pt",
    "best.pt",
    "metrics.jsonl",
    "results.json",
    "report.html",
    "curves.png",
    "embedding_map.png",
    "neighbours.png",
    "verification.png",
    "tensorboard",
    "backbone",
)
#: Options that change how a run is shown, not what it computes: free to differ on resume.
COSMETIC_KEYS = ("train.progress", "out", "projection")


@dataclass
class RunInfo:
    """What ``run.json`` records at training time.

    Attributes:
        input_shape: one model input, ``(C, H, W)`` for images or ``(D,)`` for features.
        class_names: the classes of each split (``"train"``, ``"val"``, ``"test"``), as the
            training data named them; the training classes as trained (with rotations).
        num_samples: samples per split.
        dataset: the dataset spec the run was trained on.
        extra: anything else recorded (version, creation time, skipped files).
    """

    input_shape: tuple[int, ...]
    class_names: dict[str, list[str]]
    num_samples: dict[str, int]
    dataset: str
    extra: dict[str, Any]


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("model", "train"):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(saved: RunConfig, new: RunConfig) -> list[str]:
    """``key: saved -> new`` for every option that differs, cosmetic ones excepted."""
    old, now = _flatten(saved.to_dict()), _flatten(new.to_dict())
    return [
        f"{key}: {old.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(old) | set(now))
        if key not in COSMETIC_KEYS and old.get(key) != now.get(key)
    ]


def _finished(folder: Path) -> bool:
    return (folder / "results.json").is_file()


def prepare(
    config: RunConfig, mode: Literal["auto", "resume", "overwrite"] = "auto"
) -> Literal["new", "resumed"]:
    """Make ``config.out`` ready for the run and write its ``config.yaml``; call it only once
    every input has been checked.

    ``mode``: ``"auto"`` starts a new run in an empty (or missing) folder and resumes an
    interrupted run made with the same options; ``"resume"`` insists on resuming; and
    ``"overwrite"`` deletes the run files already there (:data:`RUN_FILES`, nothing else) and
    starts anew. A ``ValueError`` says what to do for anything else: a finished run, a run made
    with other options, ``--out`` naming a file.
    """
    folder = Path(config.out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder: choose another --out")
    holds_run = (folder / "config.yaml").is_file()
    if mode == "overwrite" and folder.is_dir():
        for name in RUN_FILES:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        holds_run = False
    if not holds_run:
        if mode == "resume":
            raise ValueError(f"--resume: {folder} holds no run to resume (no config.yaml)")
        save_config(config, folder / "config.yaml")
        return "new"
    saved = load_config(folder / "config.yaml")
    changed = config_differences(saved, config)
    how = (
        "start a new run with another --out, or replace this one with --overwrite"
        if _finished(folder)
        else "resume it with --resume and the same options, start a new run with another "
        "--out, or replace it with --overwrite"
    )
    if changed:
        listed = "; ".join(changed[:6]) + ("; ..." if len(changed) > 6 else "")
        raise ValueError(f"{folder} holds a run made with other options ({listed}): {how}")
    if _finished(folder):
        raise ValueError(f"{folder} holds this run, finished (results.json): {how}")
    save_config(config, folder / "config.yaml")  # the same options; cosmetic ones updated
    return "resumed"


#: Where a run keeps the configuration files of a Hugging Face trunk (its weights are in the
#: checkpoints), so that the run reloads when the model's own folder is gone.
BACKBONE_FOLDER = "backbone"


def keep_backbone_config(folder: str | Path, source: str | Path) -> Path:
    """Copy the JSON files of a Hugging Face model folder (``config.json``, the image
    processor's settings) into ``folder/backbone``; returns that folder."""
    target = Path(folder) / BACKBONE_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(source).glob("*.json")):
        atomic_write(target / path.name, path.read_bytes())
    return target


def write_info(folder: str | Path, info: RunInfo) -> Path:
    """Write ``run.json`` (atomically)."""
    from . import __version__

    record = {
        "format": RUN_INFO_FORMAT,
        "format_version": RUN_INFO_VERSION,
        "deepmetric_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": info.dataset,
        "input_shape": list(info.input_shape),
        "class_names": info.class_names,
        "num_samples": info.num_samples,
        **info.extra,
    }
    return atomic_write_json(Path(folder) / RUN_INFO, record)


def read_info(folder: str | Path) -> RunInfo:
    """Read ``run.json``; ``ValueError`` naming the file when it is missing or malformed."""
    path = Path(folder) / RUN_INFO
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: {folder} is not a finished deepmetric run folder (or was "
            "written by a version before run.json; train it again)"
        )
    try:
        record = json.loads(path.read_text())
        if record.get("format") != RUN_INFO_FORMAT:
            raise ValueError(f"format is {record.get('format')!r}")
        if record.get("format_version") != RUN_INFO_VERSION:
            raise ValueError(f"format_version {record.get('format_version')} is not supported")
        known = ("dataset", "input_shape", "class_names", "num_samples")
        return RunInfo(
            input_shape=tuple(int(n) for n in record["input_shape"]),
            class_names={k: [str(n) for n in v] for k, v in record["class_names"].items()},
            num_samples={k: int(v) for k, v in record["num_samples"].items()},
            dataset=str(record["dataset"]),
            extra={k: v for k, v in record.items() if k not in known},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a valid run.json: {error}") from error
