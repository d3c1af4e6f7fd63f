"""Row losses (:mod:`deepmetric.pairwise.rows`): each row rule's closed-form gradient against
autograd through the loss's general functional core, and ``gradcheck`` in float64 of the custom
autograd Functions for every matrix kind, with and without a separate reference set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from deepmetric import distances, pairwise
from deepmetric.functional import circle_rows as circle_row_losses_and_grad
from deepmetric.functional import (
    generalized_lifted_structure_rows as generalized_lifted_structure_row_losses_and_grad,
)
from deepmetric.functional import multi_similarity_rows as multi_similarity_row_losses_and_grad
from deepmetric.functional import ranked_list_rows as ranked_list_row_losses_and_grad
from deepmetric.losses.contrastive import ContrastiveLoss
from deepmetric.losses.lifted import GeneralizedLiftedStructureLoss
from deepmetric.losses.multi_similarity import MultiSimilarityLoss
from deepmetric.losses.ranked_list import RankedListLoss
from deepmetric.pairwise import label_masks
from tests.pairwise.engine_cases import (
    KIND_DISTANCES,
    _batch,
)
from tests.test_functional import circle_reference as circle_row_losses
from tests.test_functional import (
    generalized_lifted_reference as generalized_lifted_structure_losses,
)
from tests.test_functional import multi_similarity_reference as multi_similarity_row_losses
from tests.test_functional import ranked_list_reference as ranked_list_row_losses

# -- 1. closed-form row gradients against autograd ---------------------------------------------

LossCore = Callable[[Tensor, Tensor, Tensor], Tensor]


RowRule = Callable[[pairwise.RowBlock], tuple[Tensor, Tensor]]


def _row_rule_cases() -> list[tuple[str, LossCore, RowRule]]:
    cos, lp = distances.CosineSimilarity(), distances.LpDistance()
    cases: list[tuple[str, LossCore, RowRule]] = []
    for name, dist in (("sim", cos), ("dist", lp)):
        cases.append(
            (
                f"multi-similarity-{name}",
                lambda m, p, n, d=dist: multi_similarity_row_losses(m, p, n, 2, 10, 0.5, d),
                lambda b, d=dist: multi_similarity_row_losses_and_grad(b, 2, 10, 0.5, d),
            )
        )
        cases.append(
            (
                f"generalized-lifted-{name}",
                lambda m, p, n, d=dist: generalized_lifted_structure_losses(m, p, n, 0.2, 0.9, d),
                lambda b, d=dist: generalized_lifted_structure_row_losses_and_grad(b, 0.2, 0.9, d),
            )
        )
    cases.append(
        (
            "circle",
            lambda m, p, n: circle_row_losses(m, p, n, 0.25, 16),
            lambda b: circle_row_losses_and_grad(b, 0.25, 16),
        )
    )
    for tp in (0.0, 1.5):
        cases.append(
            (
                f"ranked-list-Tp{tp}",
                lambda m, p, n, tp=tp: ranked_list_row_losses(m, p, n, 0.4, 1.2, 0.3, tp, 2.0),
                lambda b, tp=tp: ranked_list_row_losses_and_grad(b, 0.4, 1.2, 0.3, tp, 2.0),
            )
        )
    return cases


@pytest.mark.parametrize(("name", "core", "rule"), _row_rule_cases(), ids=lambda c: str(c)[:30])
@pytest.mark.parametrize("same_source", [True, False])
def test_row_rule_gradient_matches_autograd(
    name: str, core: LossCore, rule: RowRule, same_source: bool
) -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (9,), generator=g)
    ref_labels = labels if same_source else torch.randint(0, 4, (11,), generator=g)
    # values in (0, 1.6): inside the range where every rule has active and inactive entries
    mat = torch.rand(len(labels), len(ref_labels), generator=g, dtype=torch.float64) * 1.6
    if same_source:
        mat = (mat + mat.t()) / 2
        mat.fill_diagonal_(0)
    pos_mask, neg_mask = label_masks(labels, ref_labels, same_source)
    mat.requires_grad_(True)
    expected = core(mat, pos_mask, neg_mask)
    (expected_grad,) = torch.autograd.grad(expected.sum(), mat)
    if name == "circle":  # circle's weights are held constant: autograd of a detached copy
        expected_grad = _circle_grad(mat.detach(), pos_mask, neg_mask)
    rows, cols = torch.where(pos_mask)
    neg = None if same_source else neg_mask  # the miner-mask path, when not from labels
    block = pairwise.RowBlock(mat.detach().clone(), rows, cols, 0 if same_source else None, neg)
    losses, grad = rule(block)
    torch.testing.assert_close(losses, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def _circle_grad(mat: Tensor, pos_mask: Tensor, neg_mask: Tensor) -> Tensor:
    """Gradient of circle_row_losses with its weights held constant, by autograd."""
    mat = mat.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(circle_row_losses(mat, pos_mask, neg_mask, 0.25, 16).sum(), mat)
    return grad


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("kind", list(KIND_DISTANCES))
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize(
    "make_loss",
    [
        lambda d: MultiSimilarityLoss(alpha=2, beta=5, base=0.3, distance=d),
        lambda d: GeneralizedLiftedStructureLoss(distance=d),
        lambda d: RankedListLoss(margin=0.5, Tn=1.5, Tp=0.5, alpha=1.5, distance=d),
        lambda d: ContrastiveLoss(pos_margin=0.1, neg_margin=1.2, distance=d),
    ],
    ids=["multi-similarity", "generalized-lifted", "ranked-list", "contrastive"],
)
def test_gradcheck_in_float64(make_loss: Any, kind: str, with_ref: bool) -> None:
    emb, labels = _batch(n=10, per_class=2, dim=4, seed=2)
    ref, ref_labels = _batch(n=8, per_class=2, dim=4, seed=3)
    loss = make_loss(KIND_DISTANCES[kind]())
    assert pairwise.fused_matrix_kind(loss.distance) is not None

    def fn(e: Tensor, r: Tensor) -> Tensor:
        if with_ref:
            return loss(e, labels, ref_emb=r, ref_labels=ref_labels)
        return loss(e, labels)

    inputs = (emb.clone().requires_grad_(True), (ref * 0.7).requires_grad_(with_ref))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
