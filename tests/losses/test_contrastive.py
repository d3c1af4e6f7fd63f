"""ContrastiveLoss (:mod:`deepmetric.losses.contrastive`) against a loop written here."""

from __future__ import annotations

import pytest
import torch

from deepmetric import distances, losses
from tests.losses.contrastive_triplet_cases import _batch


def test_contrastive_against_loop() -> None:
    emb, labels = _batch(n_classes=3, per_class=3, dim=4, seed=17)
    d = torch.cdist(emb, emb)
    pos = [float(d[i, j]) for i in range(9) for j in range(9) if i != j and labels[i] == labels[j]]
    neg = [
        max(0.0, 1.5 - float(d[i, j])) for i in range(9) for j in range(9) if labels[i] != labels[j]
    ]
    neg_nonzero = [x for x in neg if x > 0]
    expected = sum(pos) / len(pos) + sum(neg_nonzero) / len(neg_nonzero)
    loss = losses.ContrastiveLoss(
        neg_margin=1.5, distance=distances.LpDistance(normalize_embeddings=False)
    )
    assert float(loss(emb, labels)) == pytest.approx(expected)


# -- the contrastive loss over the signal-to-noise ratio distance ---------------------------------


@pytest.mark.parametrize("margins", [{}, {"pos_margin": 0.1, "neg_margin": 0.8}])
def test_signal_to_noise_ratio_contrastive_loss_matches_pml(margins: dict[str, float]) -> None:
    from pytorch_metric_learning import losses as pml_losses

    from deepmetric.losses import SignalToNoiseRatioContrastiveLoss
    from tests.losses.ms_circle_margin_ranked_cases import _batch, _miner_tuples
    from tests.parity import assert_same_loss

    emb, labels = _batch(seed=11)
    ours = SignalToNoiseRatioContrastiveLoss(**margins)
    theirs = pml_losses.SignalToNoiseRatioContrastiveLoss(**margins)
    assert_same_loss(ours, theirs, emb, labels)
    assert_same_loss(ours, theirs, emb.float(), labels, rtol=1e-5, atol=1e-6)
    for tup in _miner_tuples(labels, seed=11):
        assert_same_loss(ours, theirs, emb, labels, indices_tuple=tup)
    ref, ref_labels = _batch(n_classes=8, per_class=2, seed=12)
    assert_same_loss(ours, theirs, emb, labels, ref_emb=ref, ref_labels=ref_labels)


def test_signal_to_noise_ratio_contrastive_loss_takes_only_the_snr_distance() -> None:
    from deepmetric import distances
    from deepmetric.losses import SignalToNoiseRatioContrastiveLoss

    assert isinstance(SignalToNoiseRatioContrastiveLoss().distance, distances.SNRDistance)
    with pytest.raises(ValueError, match="needs an SNRDistance, got LpDistance"):
        SignalToNoiseRatioContrastiveLoss(distance=distances.LpDistance())
