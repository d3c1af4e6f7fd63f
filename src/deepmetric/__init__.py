"""deepmetric: deep metric learning for PyTorch.

A drop-in for pytorch-metric-learning's common API (change the import, keep the code) that
computes every loss and miner from one pairwise matrix and boolean label masks.
"""

from . import (
    data,
    distances,
    distributed,
    estimators,
    evaluation,
    fewshot,
    hdml,
    index,
    losses,
    miners,
    models,
    reducers,
    regularizers,
    samplers,
    verification,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "data",
    "distances",
    "distributed",
    "estimators",
    "evaluation",
    "fewshot",
    "hdml",
    "index",
    "losses",
    "miners",
    "models",
    "reducers",
    "regularizers",
    "samplers",
    "verification",
]
