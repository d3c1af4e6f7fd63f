"""deepmetric: deep metric learning for PyTorch.

A drop-in for pytorch-metric-learning's common API (change the import, keep the code) that
computes every loss and miner from one pairwise matrix and boolean label masks.

Submodules are imported on first use (``deepmetric.losses`` imports torch; the command line's
``--help`` does not need it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "data",
    "distances",
    "distributed",
    "estimators",
    "evaluation",
    "fewshot",
    "functional",
    "hdml",
    "index",
    "io",
    "losses",
    "miners",
    "models",
    "reducers",
    "regularizers",
    "samplers",
    "verification",
]

if TYPE_CHECKING:
    from . import (
        data,
        distances,
        distributed,
        estimators,
        evaluation,
        fewshot,
        functional,
        hdml,
        index,
        io,
        losses,
        miners,
        models,
        reducers,
        regularizers,
        samplers,
        verification,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
