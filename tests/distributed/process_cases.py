"""How many processes the distributed training tests start."""

from __future__ import annotations

WORLD = 2
