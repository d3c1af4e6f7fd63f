"""Fixtures shared by the pair engine's tests."""

from __future__ import annotations

import pytest

from deepmetric import pairwise


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of one or two rows, so that every loop runs many times."""
    monkeypatch.setattr(pairwise.matrix, "BLOCK_ELEMENTS", 20)
