"""Pieces of a training step (:mod:`deepmetric.training.steps`): accumulation and the gradient
cache give the gradient of the whole batch, replaying dropout's random state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepmetric import losses, miners
from deepmetric.training import TrainConfig, Trainer
from deepmetric.training.steps import cached_gradient_step
from tests.training.finetune_cases import _digits, _tensors

# -- gradient cache -----------------------------------------------------------------------------


def _mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 8)
    )


@pytest.mark.parametrize(
    ("loss", "miner"),
    [
        (losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0), None),
        (losses.TripletMarginLoss(margin=0.2), miners.MultiSimilarityMiner()),
    ],
    ids=["contrastive", "triplet+miner"],
)
def test_accumulate_gives_the_gradient_and_the_step_of_the_whole_batch(
    loss: nn.Module, miner: nn.Module | None
) -> None:
    runs = []
    for accumulate in (1, 4):
        model = _mlp()
        config = TrainConfig(epochs=1, p=4, k=6, progress=False, accumulate=accumulate)
        trainer = Trainer(model, loss, _digits(), config, miner=miner)
        x, labels = next(iter(trainer.loader))[:2]
        reported = trainer.train_step(x, labels)
        grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
        runs.append((reported, grads, _tensors(model)))
    (loss_1, grads_1, weights_1), (loss_4, grads_4, weights_4) = runs
    assert loss_4 == pytest.approx(loss_1, rel=1e-6)
    for a, b in zip(grads_1, grads_4, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for key, value in weights_1.items():
        torch.testing.assert_close(weights_4[key], value, rtol=1e-5, atol=1e-6)


def test_gradient_cache_replays_the_random_state_of_dropout() -> None:
    """With dropout, the cached gradient equals that of the same micro-batch forwards kept in
    one graph (the masks of the first pass are drawn again in the second)."""
    x = torch.randn(24, 1, 8, 8)
    labels = torch.arange(6).repeat_interleave(4)
    loss_fn = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)

    model = _mlp(dropout=0.5)
    torch.manual_seed(7)
    embeddings = torch.cat([model(part) for part in x.tensor_split(3)])
    loss_fn(embeddings, labels).backward()
    expected = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    after_expected = torch.rand(1)

    model = _mlp(dropout=0.5)
    torch.manual_seed(7)
    cached_gradient_step(
        model,
        loss_fn,
        None,
        x,
        labels,
        3,
        lambda: torch.autocast("cpu", enabled=False),
        lambda t: t,
    )
    got = [p.grad for p in model.parameters()]
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.rand(1), after_expected)  # the random stream goes on as without it
