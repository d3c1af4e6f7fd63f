"""SelfSupervisedLoss and MultipleLosses: PML parity (values and gradients), the batch each builds
checked by hand, and bad arguments."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import Tensor

from deepmetric import losses, miners
from tests.parity import assert_same_loss, pk_labels, value_and_grad


def _views(n: int = 12, dim: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return first, first + 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64)


SELF_SUPERVISED = ["ContrastiveLoss", "NCALoss", "NTXentLoss", "SupConLoss", "TripletMarginLoss"]


@pytest.mark.parametrize("name", SELF_SUPERVISED)
@pytest.mark.parametrize("symmetric", [True, False])
def test_self_supervised_matches_pml(name: str, symmetric: bool) -> None:
    first, second = _views()
    kwargs = {"margin": 1.0} if name == "TripletMarginLoss" else {}  # (0 at the default margin)
    ours = losses.SelfSupervisedLoss(getattr(losses, name)(**kwargs), symmetric=symmetric)
    theirs = pml_losses.SelfSupervisedLoss(getattr(pml_losses, name)(**kwargs), symmetric=symmetric)
    for which in (0, 1):  # the gradient reaching each view

        def call(loss: Any, x: Tensor, which: int = which) -> Tensor:
            return loss(x, second) if which == 0 else loss(first, x)

        assert_same_loss(
            lambda x: call(ours, x), lambda x: call(theirs, x), first if which == 0 else second
        )


def test_self_supervised_pairs_row_i_with_row_i() -> None:
    """The same as the wrapped loss on the batch built by hand: labels 0..N-1 for each view."""
    first, second = _views(n=6)
    inner = losses.NTXentLoss(temperature=0.2)
    labels = torch.arange(6)
    symmetric = losses.SelfSupervisedLoss(inner)(first, second)
    stacked = inner(torch.cat([first, second]), torch.cat([labels, labels]))
    assert torch.equal(symmetric, stacked)
    one_way = losses.SelfSupervisedLoss(inner, symmetric=False)(first, second)
    assert torch.equal(one_way, inner(first, labels, ref_emb=second, ref_labels=labels))


def test_self_supervised_refuses_unsupported_losses_and_mismatched_views() -> None:
    with pytest.raises(ValueError, match="does not support ArcFaceLoss; it supports Circle"):
        losses.SelfSupervisedLoss(losses.ArcFaceLoss(num_classes=3, embedding_size=8))
    first, second = _views()
    loss = losses.SelfSupervisedLoss(losses.ContrastiveLoss())
    with pytest.raises(ValueError, match=r"row for row: got shapes \(11, 8\) and \(12, 8\)"):
        loss(first, second[:11])
    with pytest.raises(ValueError, match="ref_emb"):
        loss(first, second.clone().fill_(float("nan")))


def _batch(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, 8, generator=g, dtype=torch.float64), pk_labels(6, 4)


def _both(structure: str) -> tuple[Any, Any]:
    """The same MultipleLosses in both libraries: a list or a dict, with miners and weights."""
    ours_losses = [losses.ContrastiveLoss(), losses.TripletMarginLoss(margin=0.2)]
    theirs_losses = [pml_losses.ContrastiveLoss(), pml_losses.TripletMarginLoss(margin=0.2)]
    ours_miners = [None, miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")]
    theirs_miners = [None, pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")]
    weights = [0.7, 2.5]
    if structure == "list":
        return (
            losses.MultipleLosses(ours_losses, ours_miners, weights),
            pml_losses.MultipleLosses(theirs_losses, theirs_miners, weights),
        )
    keys = ["pairs", "triplets"]
    return (
        losses.MultipleLosses(
            dict(zip(keys, ours_losses, strict=True)),
            {"triplets": ours_miners[1]},
            dict(zip(keys, weights, strict=True)),
        ),
        pml_losses.MultipleLosses(
            dict(zip(keys, theirs_losses, strict=True)),
            {"triplets": theirs_miners[1]},
            dict(zip(keys, weights, strict=True)),
        ),
    )


@pytest.mark.parametrize("structure", ["list", "dict"])
def test_multiple_losses_match_pml(structure: str) -> None:
    emb, labels = _batch()
    ours, theirs = _both(structure)
    assert_same_loss(ours, theirs, emb, labels)


def test_multiple_losses_is_the_weighted_sum_of_its_parts() -> None:
    emb, labels = _batch(seed=2)
    contrastive, triplet = losses.ContrastiveLoss(), losses.TripletMarginLoss()
    miner = miners.BatchHardMiner()
    combined = losses.MultipleLosses([contrastive, triplet], [miner, None], [0.5, 3.0])
    value, grad = value_and_grad(combined, emb, labels)

    def by_hand(x: Tensor, y: Tensor) -> Tensor:
        return 0.5 * contrastive(x, y, miner(x, y)) + 3.0 * triplet(x, y)

    expected, expected_grad = value_and_grad(by_hand, emb, labels)
    assert value == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(grad, expected_grad)
    # without miners, an indices_tuple reaches every loss
    tuple_ = miner(emb, labels)
    plain = losses.MultipleLosses([contrastive, triplet])
    expected_sum = contrastive(emb, labels, tuple_) + triplet(emb, labels, tuple_)
    torch.testing.assert_close(plain(emb, labels, tuple_), expected_sum)


def test_multiple_losses_refuse_bad_structures() -> None:
    pair = [losses.ContrastiveLoss(), losses.TripletMarginLoss()]
    with pytest.raises(ValueError, match="at least one loss"):
        losses.MultipleLosses([])
    with pytest.raises(ValueError, match="miners has 1 entries but there are 2 losses"):
        losses.MultipleLosses(pair, miners=[None])
    with pytest.raises(ValueError, match="weights has 3 entries"):
        losses.MultipleLosses(pair, weights=[1, 2, 3])
    with pytest.raises(ValueError, match=r"weights keys .* missing \['b'\]"):
        losses.MultipleLosses(dict(zip("ab", pair, strict=True)), weights={"a": 1.0})
    with pytest.raises(ValueError, match=r"miners keys .* unknown \['c'\]"):
        losses.MultipleLosses(
            dict(zip("ab", pair, strict=True)), miners={"c": miners.BatchHardMiner()}
        )
    with pytest.raises(ValueError, match="miners must be a dict like the losses"):
        losses.MultipleLosses(dict(zip("ab", pair, strict=True)), miners=[None, None])
    with pytest.raises(ValueError, match="a miner must be a module, got str"):
        losses.MultipleLosses(pair, miners=["BatchHardMiner", None])
    combined = losses.MultipleLosses(pair, miners=[miners.BatchHardMiner(), None])
    emb, labels = _batch()
    with pytest.raises(ValueError, match="indices_tuple cannot be given"):
        combined(emb, labels, miners.BatchHardMiner()(emb, labels))
