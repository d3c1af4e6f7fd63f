"""Fine-tuning helpers (:mod:`deepmetric.models.finetune`): frozen BatchNorm, trainable switches."""

from __future__ import annotations

import copy

import torch
from torch import nn

from deepmetric.models import (
    freeze_batchnorm,
    set_trainable,
    unfreeze_batchnorm,
)

# ---------------------------------------------------------------------------------------------
# Fine-tuning helpers


def _bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 3),
        nn.BatchNorm1d(3),
    )


def test_freeze_batchnorm_keeps_running_statistics_through_train() -> None:
    torch.manual_seed(0)
    net = _bn_net()
    net(torch.randn(8, 3, 6, 6))  # move the statistics off their initial 0/1
    assert freeze_batchnorm(net) == 2
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net.train()
    x = torch.randn(8, 3, 6, 6) * 3 + 1
    out_train = net(x)
    for key, value in before.items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
    # Frozen BatchNorm normalises with its running statistics: the training forward is the
    # eval forward.
    torch.testing.assert_close(out_train, net.eval()(x))
    # Survives deepcopy (what checkpoints of the best model do) and a second call.
    twin = copy.deepcopy(net).train()
    twin(x)
    torch.testing.assert_close(twin.state_dict()["1.running_mean"], before["1.running_mean"])
    assert freeze_batchnorm(net) == 2
    assert len(net[1]._forward_pre_hooks) == 1
    unfreeze_batchnorm(net)
    net.train()(x)
    assert not torch.equal(net.state_dict()["1.running_mean"], before["1.running_mean"])


def test_set_trainable_and_frozen_affine() -> None:
    net = _bn_net()
    freeze_batchnorm(net, affine=True)
    assert not net[1].weight.requires_grad and net[0].weight.requires_grad
    set_trainable(net, False)
    assert not any(p.requires_grad for p in net.parameters())
    set_trainable(net, True)
    assert net[0].weight.requires_grad and net[4].weight.requires_grad
    assert not net[1].weight.requires_grad and not net[5].bias.requires_grad
    unfreeze_batchnorm(net)
    assert all(p.requires_grad for p in net.parameters())
