"""Files that are never half-written: every writer of deepmetric goes through here.

A crash, a full disk or a kill in the middle of a save must leave the previous file intact, so
each writer writes a temporary file *beside* the target (same file system, so the rename is
atomic), flushes it to disk, and renames it over the target. The temporary file has a unique
name that this process created itself (``tempfile.mkstemp``), so a save never touches a file of
the user's that merely looks like a temporary file.

* :func:`atomic_write` — bytes, or a callback that writes to a binary file object;
* :func:`atomic_write_text`, :func:`atomic_write_json` — text and JSON;
* :func:`atomic_torch_save` — ``torch.save`` of tensors and plain data (read back with
  ``torch.load(..., weights_only=True)``, which never runs code).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_directory",
]


def fsync_directory(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is); a no-op where the
    platform cannot open folders (Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, or ``data(file)`` writing to a binary file) to ``path`` atomically.

    Creates the parent folder. Raises ``ValueError`` naming the path when it is a folder or its
    parent cannot be written (read-only, not a folder), instead of an ``OSError`` traceback.
    """
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"cannot write {target}: it is a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
        )
    except (FileExistsError, NotADirectoryError) as error:
        raise ValueError(f"cannot write {target}: {target.parent} is not a folder") from error
    except PermissionError as error:
        raise ValueError(f"cannot write {target}: {target.parent} is not writable") from error
    try:
        with os.fdopen(handle, "wb") as file:
            if isinstance(data, bytes | bytearray | memoryview):
                file.write(data)
            else:
                data(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 ``text`` to ``path``, atomically."""
    return atomic_write(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], values: Any, indent: int | None = 2) -> Path:
    """``values`` as JSON to ``path``, atomically (``ValueError`` for values JSON cannot hold,
    before anything is written)."""
    try:
        text = json.dumps(values, indent=indent, allow_nan=True)
    except TypeError as error:
        raise ValueError(f"cannot write {path} as JSON: {error}") from error
    return atomic_write_text(path, text + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path``, atomically."""
    import torch  # here, not at the top: the command line's parsing must not import torch

    return atomic_write(path, lambda file: torch.save(obj, file))
