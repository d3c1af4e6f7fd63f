"""SoftTripleLoss beyond the shared classification parity grid: a loop over the paper's formula,
its sparse-centres regularizer and logits against PML, and bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import regularizers as pml_regularizers
from torch import Tensor

from deepmetric import distances, regularizers
from deepmetric.losses import SoftTripleLoss
from tests.parity import assert_same_loss


def _loop_soft_triple(
    emb: Tensor, labels: Tensor, centres: Tensor, k: int, la: float, gamma: float, margin: float
) -> Tensor:
    """Qian et al.'s loss, sample by sample: S_c = Σ_k softmax(s_ck / γ) s_ck over the class's
    centres, then -log softmax(λ (S - δ onehot))_y, averaged."""
    unit, unit_centres = F.normalize(emb, dim=1), F.normalize(centres, dim=0)
    n_classes = centres.shape[1] // k
    losses = []
    for i in range(len(emb)):
        class_sims = []
        for c in range(n_classes):
            s = torch.stack([unit[i] @ unit_centres[:, c * k + j] for j in range(k)])
            class_sims.append((torch.softmax(s / gamma, dim=0) * s).sum())
        onehot = F.one_hot(labels[i], n_classes).to(emb.dtype)
        logits = la * (torch.stack(class_sims) - margin * onehot)
        losses.append(-torch.log_softmax(logits, dim=0)[labels[i]])
    return torch.stack(losses).mean()


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(10, 6, generator=g, dtype=torch.float64), torch.tensor(
        [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    )


@pytest.mark.parametrize(("k", "la", "gamma", "margin"), [(10, 20, 0.1, 0.01), (3, 5, 0.5, 0.3)])
def test_matches_a_loop_over_the_formula(k: int, la: float, gamma: float, margin: float) -> None:
    loss = SoftTripleLoss(4, 6, centers_per_class=k, la=la, gamma=gamma, margin=margin).double()
    centres = loss.fc.detach()

    def loop(x: Tensor, y: Tensor) -> Tensor:
        return _loop_soft_triple(x, y, centres, k, la, gamma, margin)

    assert_same_loss(loss, loop, *_batch(), rtol=1e-10, atol=1e-12)


def test_with_the_sparse_centres_regularizer_and_logits_as_pml() -> None:
    torch.manual_seed(0)
    theirs = pml_losses.SoftTripleLoss(
        4,
        6,
        centers_per_class=3,
        weight_regularizer=pml_regularizers.SparseCentersRegularizer(4, 3),
        weight_reg_weight=0.4,
    ).double()
    ours = SoftTripleLoss(
        4,
        6,
        centers_per_class=3,
        weight_regularizer=regularizers.SparseCentersRegularizer(4, 3),
        weight_reg_weight=0.4,
    )
    ours.load_state_dict(theirs.state_dict())
    ours.double()
    emb, labels = _batch()
    assert_same_loss(ours, theirs, emb, labels)
    torch.testing.assert_close(ours.get_logits(emb), theirs.get_logits(emb))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="needs a similarity, got LpDistance"):
        SoftTripleLoss(4, 6, distance=distances.LpDistance())
    with pytest.raises(ValueError, match="centers_per_class must be a positive int, got 0"):
        SoftTripleLoss(4, 6, centers_per_class=0)
    with pytest.raises(ValueError, match="gamma must be positive"):
        SoftTripleLoss(4, 6, gamma=0)
    emb, labels = _batch()
    with pytest.raises(ValueError, match="label"):
        SoftTripleLoss(4, 6)(emb, labels + 4)
