""":class:`TrainConfig`, every option of a training run: defined in :mod:`deepmetric.config`
(which imports no torch, so that the command line's help is instant) and re-exported here."""

from ..config import AMP_MODES, TrainConfig

__all__ = ["AMP_MODES", "TrainConfig"]
