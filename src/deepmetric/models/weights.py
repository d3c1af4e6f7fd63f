"""Loading trunk weights from local files saved by any code.

A checkpoint is a ``.safetensors`` file or a ``torch.save`` file (``.pth``, ``.pt``, ``.bin``,
``.ckpt``) holding a state_dict, or a dict with the state_dict under ``"state_dict"``, ``"model"``
or ``"model_state_dict"`` (Lightning and most training scripts). Loading never unpickles code
(``weights_only=True``). A key map rewrites key prefixes for checkpoints written by other code
(``{"module.": ""}`` for DataParallel, ``{"backbone.": ""}`` for a detector's trunk); the rules
apply in order, each to the result of the previous one.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

#: Top-level names of classification layers: checkpoint keys under them are classifier weights
#: a trunk no longer has, so they are dropped with a warning rather than refused.
CLASSIFIER_NAMES = ("fc", "_fc", "classifier", "head", "heads", "last_linear")

_NESTED_KEYS = ("state_dict", "model", "model_state_dict")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a local checkpoint file, by key (see the module docstring for formats)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    state: object
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ValueError(
                f"reading {path} needs safetensors: pip install 'deepmetric[transformers]'"
            ) from error
        state = load_file(str(path), device="cpu")
    elif path.suffix in _TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"cannot read {path} as a weights-only torch checkpoint ({error}); save the "
                "state_dict alone (torch.save(model.state_dict(), path)) or as .safetensors"
            ) from error
    else:
        raise ValueError(
            f"unknown weights format {path.suffix!r} for {path}: use .safetensors or one of "
            f"{', '.join(_TORCH_SUFFIXES)}"
        )
    if isinstance(state, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{path} does not hold a state_dict (a mapping of names to tensors), nor one under "
            f"{', '.join(repr(k) for k in _NESTED_KEYS)}"
        )
    return dict(state)


def apply_key_map(state: Mapping[str, Tensor], key_map: Mapping[str, str]) -> dict[str, Tensor]:
    """Rewrite key prefixes: for each ``old -> new`` rule in order, a key starting with ``old``
    has that prefix replaced by ``new``. Two keys mapped to one name raise ``ValueError``."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new_key = key
        for old, new in key_map.items():
            if new_key.startswith(old):
                new_key = new + new_key[len(old) :]
        if new_key in out:
            raise ValueError(f"key_map maps two checkpoint keys to {new_key!r}")
        out[new_key] = value
    return out


def _first(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _prefix_hint(state_keys: Collection[str], own_keys: Collection[str]) -> str:
    """A key_map that would make more keys match, when stripping or adding one prefix does."""
    own = set(own_keys)
    matched = len(own & set(state_keys))
    heads = Counter(k.split(".", 1)[0] + "." for k in state_keys if "." in k)
    best = ""
    for head, _ in heads.most_common(3):
        stripped = {k[len(head) :] for k in state_keys if k.startswith(head)}
        if len(own & stripped) > matched:
            best = f'; try key_map={{"{head}": ""}}'
            matched = len(own & stripped)
    own_heads = Counter(k.split(".", 1)[0] + "." for k in own if "." in k)
    for head, _ in own_heads.most_common(1):
        added = {head + k for k in state_keys}
        if len(own & added) > matched:
            best = f'; try key_map={{"": "{head}"}}'
    return best


def load_weights(
    module: nn.Module,
    path: str | Path,
    *,
    key_map: Mapping[str, str] | None = None,
    drop: Collection[str] = (),
    warn_dropped: bool = True,
) -> list[str]:
    """Load a local checkpoint into ``module``, every weight accounted for.

    Checkpoint keys the module lacks are refused, except classifier weights: keys listed in
    ``drop`` and keys under one of :data:`CLASSIFIER_NAMES` that the module does not have; those
    are skipped (with a warning naming them unless ``warn_dropped`` is false). A module key the
    checkpoint lacks, or a shape that differs, raises ``ValueError`` naming the first few, with a
    ``key_map`` hint when a prefix explains the mismatch. BatchNorm's ``num_batches_tracked``
    may be absent (older checkpoints lack it). Returns the skipped keys.
    """
    state = read_state_dict(path)
    if key_map:
        state = apply_key_map(state, key_map)
    own = module.state_dict()
    own_heads = {k.split(".", 1)[0] for k in own}
    dropped, unexpected = [], []
    for key in state:
        if key in own:
            continue
        head = key.split(".", 1)[0]
        if key in drop or (head in CLASSIFIER_NAMES and head not in own_heads):
            dropped.append(key)
        else:
            unexpected.append(key)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_first(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_first(unexpected)}")
        if shapes:
            parts.append(f"shapes differ (file vs model): {_first(shapes, 3)}")
        raise ValueError(
            f"weights {path} do not match {type(module).__name__} "
            f"({len(own)} tensors): " + "; ".join(parts) + _prefix_hint(list(state), list(own))
        )
    if dropped and warn_dropped:
        warnings.warn(
            f"weights {path}: skipped {len(dropped)} classifier tensors the trunk does not have: "
            f"{_first(dropped)}",
            stacklevel=3,
        )
    kept = {k: v for k, v in state.items() if k in own}
    module.load_state_dict(kept, strict=False)
    return dropped
