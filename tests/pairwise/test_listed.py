"""Listed pairs (:mod:`deepmetric.pairwise.listed`): pair distances' gradcheck and values, and a
miner's few pairs or triplets (distances one by one) against PML."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from torch import Tensor

from deepmetric import distances, miners, pairwise
from deepmetric.losses.contrastive import ContrastiveLoss
from deepmetric.losses.triplet import TripletMarginLoss
from deepmetric.pairwise import label_masks, prepare_batch
from tests.pairwise.engine_cases import (
    KIND_DISTANCES,
    _batch,
)
from tests.parity import assert_same_loss


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("kind", list(KIND_DISTANCES))
def test_pair_distances_gradcheck_and_values(kind: str) -> None:
    emb, labels = _batch(n=10, per_class=2, dim=4, seed=4)
    ref, _ = _batch(n=7, per_class=7, dim=4, seed=5)
    ref[3] = emb[2]  # a zero distance: its gradient is 0, never NaN
    distance = KIND_DISTANCES[kind]()
    rows = torch.tensor([0, 2, 2, 5, 9, 9, 1])
    cols = torch.tensor([1, 3, 3, 0, 6, 2, 4])  # (2, 3) twice: counted twice

    def fn(e: Tensor, r: Tensor) -> Tensor:
        batch = prepare_batch(e, labels, None, r, torch.zeros(len(r), dtype=torch.long))
        return pairwise.pair_distances(distance, batch, rows, cols)

    e, r = emb.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    expected = distance.pairwise_distance(emb[rows], ref[cols])
    torch.testing.assert_close(fn(e, r), expected, rtol=1e-12, atol=1e-12)
    fn(e, r).sum().backward()
    assert e.grad is not None and bool(torch.isfinite(e.grad).all())
    if kind == "euclidean":  # away from the zero distance, the gradient is smooth
        keep = torch.tensor([0, 3, 4, 6])
        rows, cols = rows[keep], cols[keep]
    assert torch.autograd.gradcheck(fn, (e, r), eps=1e-6, atol=1e-6)


# -- 6. a miner's few pairs: their distances one by one --------------------------------------


def _pml_twin(ours: distances.BaseDistance) -> Any:
    """PML's distance with the same settings as ``ours``."""
    from pytorch_metric_learning import distances as pml_distances

    if isinstance(ours, distances.LpDistance):
        return pml_distances.LpDistance(power=ours.power)
    return pml_distances.CosineSimilarity()


FEW_PAIR_DISTANCES = pytest.mark.parametrize(
    "make_distance",
    [
        distances.LpDistance,
        lambda: distances.LpDistance(power=2),
        distances.CosineSimilarity,
    ],
    ids=["lp", "lp-squared", "cosine"],
)


@FEW_PAIR_DISTANCES
def test_contrastive_with_few_miner_pairs_matches_pml(make_distance: Any) -> None:
    emb, labels = _batch(n=32, per_class=4, dim=16, seed=15)
    pos_mask, neg_mask = label_masks(labels, labels, same_source=True)
    a1, p = torch.where(pos_mask)
    a2, n = torch.where(neg_mask)
    # a repeated positive pair; 10 + 1 + 20 pairs: few enough for the one-by-one path
    tup = (torch.cat([a1[:10], a1[:1]]), torch.cat([p[:10], p[:1]]), a2[::40][:20], n[::40][:20])
    batch = prepare_batch(emb, labels, tup, None, None)
    assert pairwise.few_pairs(batch, len(tup[0]) + len(tup[2]))
    ours_distance = make_distance()
    theirs_distance = _pml_twin(ours_distance)
    margins = {"pos_margin": 0.7, "neg_margin": 0.3} if ours_distance.is_inverted else {}
    assert_same_loss(
        ContrastiveLoss(distance=ours_distance, **margins),
        pml_losses.ContrastiveLoss(distance=theirs_distance, **margins),
        emb,
        labels,
        indices_tuple=tup,
    )


@FEW_PAIR_DISTANCES
@pytest.mark.parametrize("smooth_loss", [False, True])
def test_triplet_with_few_miner_triplets_matches_pml(make_distance: Any, smooth_loss: bool) -> None:
    from pytorch_metric_learning import miners as pml_miners

    emb, labels = _batch(n=128, per_class=4, dim=16, seed=16)
    # BatchHardMiner's one triplet per anchor, plus a repeated one: few enough for the
    # one-by-one path
    a, p, n = miners.BatchHardMiner()(emb, labels)
    tup = (torch.cat([a, a[:1]]), torch.cat([p, p[:1]]), torch.cat([n, n[:1]]))
    batch = prepare_batch(emb, labels, tup, None, None)
    assert pairwise.few_pairs(batch, 2 * len(tup[0]))
    assert {tuple(t) for t in torch.stack(tup[:3], 1)[:-1].tolist()} == {
        tuple(t) for t in torch.stack(pml_miners.BatchHardMiner()(emb, labels), 1).tolist()
    }
    ours_distance = make_distance()
    theirs_distance = _pml_twin(ours_distance)
    assert_same_loss(
        TripletMarginLoss(margin=0.2, smooth_loss=smooth_loss, distance=ours_distance),
        pml_losses.TripletMarginLoss(margin=0.2, smooth_loss=smooth_loss, distance=theirs_distance),
        emb,
        labels,
        indices_tuple=tup,
    )
