"""CONTRIBUTING.md's worked example (adding a loss as a row rule) runs as written, and its loss
equals a loop over its formula on both engine paths and with a reference set."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric import distances

GUIDE = Path(__file__).resolve().parent.parent / "CONTRIBUTING.md"


def _example() -> dict[str, Any]:
    """The namespace left by the guide's one Python block, run as written."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "the guide has one Python example"
    namespace: dict[str, Any] = {"__name__": "contributing_example"}
    exec(compile(blocks[0], str(GUIDE), "exec"), namespace)
    return namespace


def _loop(
    emb: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, same: bool, p: float
) -> Tensor:
    """Mean over queries of log(1 + Σ_negatives exp(0.5 - d)), d the Lp distance of the
    embeddings scaled to unit Lp norm (as PML's ``LpDistance`` normalises)."""
    q, r = F.normalize(emb, p=p, dim=1), F.normalize(ref, p=p, dim=1)
    losses = []
    for i in range(len(q)):
        terms = [
            0.5 - torch.linalg.vector_norm(q[i] - r[j], ord=p)
            for j in range(len(r))
            if ref_labels[j] != labels[i] and not (same and i == j)
        ]
        losses.append(torch.logsumexp(torch.stack([q.new_zeros(()), *terms]), dim=0))
    return torch.stack(losses).mean()


def test_the_guides_example_runs_and_matches_a_loop() -> None:
    example = _example()
    assert example["embeddings"].grad is not None  # the block ran its own backward
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    ref = torch.randn(9, 5, generator=g, dtype=torch.float64)
    ref_labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    for p, distance in ((2.0, distances.LpDistance()), (1.0, distances.LpDistance(p=1))):
        for with_ref in (False, True):  # the fused path for p = 2, the whole matrix for p = 1
            loss = example["NegativeMarginLoss"](distance=distance)
            args = (ref, ref_labels) if with_ref else (emb, labels)
            ours_emb = emb.clone().requires_grad_(True)
            loop_emb = emb.clone().requires_grad_(True)
            ours_args = (ours_emb, labels, None, *args) if with_ref else (ours_emb, labels)
            loss(*ours_args).backward()
            loop_args = args if with_ref else (loop_emb, labels)  # both sides differentiated
            _loop(loop_emb, labels, *loop_args, same=not with_ref, p=p).backward()
            assert ours_emb.grad is not None and loop_emb.grad is not None
            torch.testing.assert_close(ours_emb.grad, loop_emb.grad, rtol=1e-9, atol=1e-12)
            value = loss(*((emb, labels, None, *args) if with_ref else (emb, labels)))
            expected = _loop(emb, labels, *args, same=not with_ref, p=p)
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
