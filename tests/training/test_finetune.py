"""Fine-tuning options of the trainer: checked by name, backbone learning rate, a frozen backbone,
frozen BatchNorm, bf16 autocast and channels-last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deepmetric import losses, models
from deepmetric.training import TrainConfig, Trainer
from tests.training.finetune_cases import _digits, _tensors


def _conv_model() -> models.EmbeddingNet:
    return models.EmbeddingNet(models.SmallConvNet(1, channels=8, blocks=2), 8, embedding_size=8)


def _trainer(model: nn.Module, run_dir: Path | None = None, **options: Any) -> Trainer:
    config = TrainConfig(**{"epochs": 2, "p": 4, "k": 4, "progress": False, **options})
    return Trainer(model, losses.TripletMarginLoss(margin=0.2), _digits(), config, run_dir=run_dir)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"num_workers": -1}, "num_workers"),
        ({"num_workers": 1.5}, "num_workers"),
        ({"persistent_workers": "yes"}, "persistent_workers"),
        ({"pin_memory": "sometimes"}, "pin_memory"),
        ({"prefetch_factor": 2, "num_workers": 0}, "prefetch_factor"),  # without workers
        ({"num_workers": "all"}, "num_workers"),
        ({"backbone_lr": 0.0}, "backbone_lr"),
        ({"backbone_lr": "0.1"}, "backbone_lr"),
        ({"freeze_backbone_epochs": -1}, "freeze_backbone_epochs"),
        ({"freeze_backbone_epochs": 11}, "freeze_backbone_epochs"),
        ({"freeze_bn": 1}, "freeze_bn"),
        ({"amp": "fp8"}, "amp"),
        ({"amp": "fp16", "device": "cpu"}, "fp16"),
        ({"channels_last": "true"}, "channels_last"),
        ({"accumulate": 0}, "accumulate"),
        ({"accumulate": 200, "p": 4, "k": 4}, "accumulate"),
    ],
)
def test_new_options_are_checked_by_name(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        TrainConfig(**options)


def test_amp_booleans_of_older_configs_still_load() -> None:
    assert TrainConfig.from_dict({"amp": True}).amp == "auto"
    assert TrainConfig.from_dict({"amp": False}).amp == "none"


def test_backbone_options_need_a_trunk() -> None:
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
    for options in ({"backbone_lr": 1e-4}, {"freeze_backbone_epochs": 1}, {"freeze_bn": True}):
        with pytest.raises(ValueError, match=next(iter(options))):
            _trainer(plain, **options)


def test_backbone_lr_is_the_trunks_own_group() -> None:
    torch.manual_seed(0)
    model = _conv_model()
    trainer = _trainer(model, lr=1e-3, backbone_lr=1e-5, scheduler="none")
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {id(p) for p in groups["backbone"]["params"]} == {
        id(p) for p in model.trunk.parameters()
    }
    assert {id(p) for p in groups["model"]["params"]} == {id(p) for p in model.head.parameters()}
    trainer.fit(max_steps=2)
    assert groups["backbone"]["lr"] == pytest.approx(1e-5)
    assert groups["model"]["lr"] == pytest.approx(1e-3)


def test_frozen_backbone_trains_only_the_head_then_everything_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    straight = _trainer(_conv_model(), tmp_path / "a", freeze_backbone_epochs=1, epochs=2)
    start = _tensors(straight.model)
    per_epoch = len(straight.sampler)
    straight.fit(max_steps=per_epoch)  # the whole first epoch
    after_one = _tensors(straight.model)
    trunk_keys = [k for k in start if k.startswith("trunk.") and "running" not in k]
    trunk_weights = [k for k in trunk_keys if "num_batches" not in k]
    assert all(torch.equal(start[k], after_one[k]) for k in trunk_weights)
    assert not torch.equal(start["head.0.weight"], after_one["head.0.weight"])
    straight.fit()
    final = _tensors(straight.model)
    assert all(not torch.equal(after_one[k], final[k]) for k in trunk_weights)
    assert all(p.requires_grad for p in straight.model.parameters())  # restored after fit

    torch.manual_seed(0)
    first = _trainer(_conv_model(), tmp_path / "b", freeze_backbone_epochs=1, epochs=2)
    first.fit(max_steps=per_epoch // 2)  # stopped while frozen
    torch.manual_seed(0)
    second = _trainer(_conv_model(), tmp_path / "b", freeze_backbone_epochs=1, epochs=2)
    second.fit()
    for key, value in _tensors(second.model).items():
        assert torch.equal(value, final[key]), key


def test_freeze_bn_keeps_the_trunks_running_statistics() -> None:
    torch.manual_seed(0)
    frozen = _trainer(_conv_model(), freeze_bn=True, epochs=1)
    before = _tensors(frozen.model)
    modes: list[bool] = []
    bn = next(m for m in frozen.model.trunk.modules() if isinstance(m, nn.BatchNorm2d))
    bn.register_forward_hook(lambda module, args, out: modes.append(module.training))
    frozen.fit()
    after = _tensors(frozen.model)
    stats = [k for k in before if "running" in k or "num_batches" in k]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert modes and not any(modes)  # normalised with the running statistics
    conv = next(k for k in before if k.startswith("trunk.") and k.endswith("weight"))
    assert not torch.equal(before[conv], after[conv])  # the trunk still trains
    torch.manual_seed(0)
    free = _trainer(_conv_model(), epochs=1)
    free.fit(max_steps=1)
    assert any(not torch.equal(before[k], _tensors(free.model)[k]) for k in stats)


def test_bf16_autocast_on_the_cpu_runs_a_step_in_bfloat16() -> None:
    torch.manual_seed(0)
    model = _conv_model()
    trainer = _trainer(model, amp="bf16", device="cpu")
    dtypes: list[torch.dtype] = []
    model.head[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    before = _tensors(model)
    x, labels = next(iter(trainer.loader))[:2]
    loss = trainer.train_step(x, labels)
    assert dtypes == [torch.bfloat16] and loss == loss  # finite, not NaN
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    assert not torch.equal(before["head.0.weight"], model.head[0].weight)
    with pytest.raises(ValueError, match="fp16"):
        _trainer(_conv_model(), amp="fp16")  # "auto" device is the CPU here
    none = _trainer(_conv_model(), amp="auto", device="cpu")
    assert none._amp_dtype is None  # bf16 on the CPU is opt-in


def test_channels_last_converts_the_model_and_its_inputs_with_the_same_step() -> None:
    torch.manual_seed(0)
    model = _conv_model()
    reference = _conv_model()
    reference.load_state_dict(model.state_dict())
    trainer = _trainer(model, channels_last=True)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    layouts: list[bool] = []
    first_conv.register_forward_hook(
        lambda m, args, out: layouts.append(
            args[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    plain = _trainer(reference)
    x, labels = next(iter(trainer.loader))[:2]
    trainer.train_step(x, labels)
    plain.train_step(x, labels)
    assert layouts == [True]
    for key, value in _tensors(reference).items():
        torch.testing.assert_close(_tensors(model)[key], value, rtol=1e-4, atol=1e-5)
