"""The engine's gradients (:mod:`deepmetric.pairwise.gradients`): second derivatives are refused."""

from __future__ import annotations

import pytest
import torch

from tests.pairwise.engine_cases import (
    LOSSES,
    _batch,
    _loss_pair,
)


@pytest.mark.parametrize("name", list(LOSSES))
def test_second_derivatives_raise_rather_than_being_wrong(name: str) -> None:
    emb, labels = _batch(seed=18)
    fast, _ = _loss_pair(name, "lp")
    e = emb.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(fast(e, labels), e, create_graph=True)
    (grad,) = torch.autograd.grad(fast(e, labels), e)  # first derivatives are fine
    assert bool(torch.isfinite(grad).all())
