"""Trainer: exact resume (with and without HDML), early stopping, loss parameters, config errors,
HDML's parts and groups, the metrics log and TensorBoard."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deepmetric import losses
from deepmetric.cli import build_parser, config_from_args, main
from deepmetric.runs import RunConfig, build_hdml
from deepmetric.training import TrainConfig, Trainer, load_checkpoint
from tests.training.trainer_cases import _digits, _hdml, _model, _trainer


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.state_dict().values()]


@pytest.mark.parametrize("hdml", [False, True], ids=["plain", "hdml"])
def test_interrupted_and_resumed_run_ends_with_identical_weights(
    tmp_path: Path, hdml: bool
) -> None:
    straight = _trainer(tmp_path / "straight", hdml=hdml)
    straight.fit()

    first = _trainer(tmp_path / "resumed", hdml=hdml)
    steps_per_epoch = len(first.sampler)
    first.fit(max_steps=steps_per_epoch + 3)  # stops in the middle of epoch 2
    assert first.step == steps_per_epoch + 3
    del first
    second = _trainer(tmp_path / "resumed", hdml=hdml)  # a fresh process would do exactly this
    history = second.fit()

    assert second.step == straight.step
    for a, b in zip(_weights(straight), _weights(second), strict=True):
        assert torch.equal(a, b)
    if hdml:  # generator, classifier and running means too (the loss has no parameters)
        assert straight.hdml is not None and second.hdml is not None
        hdml_straight, hdml_second = straight.hdml.state_dict(), second.hdml.state_dict()
        assert hdml_straight.keys() == hdml_second.keys()
        for key, value in hdml_straight.items():
            assert torch.equal(value, hdml_second[key]), key
        assert float(hdml_straight["j_avg"]) < 1e6  # the running mean has left its start
        assert all("hdml_generator_loss" in record for record in history)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[-1])["val_precision_at_1"] == pytest.approx(
        straight.history[-1]["val_precision_at_1"]
    )


def test_early_stopping_stops_after_patience(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, epochs=30, patience=1, lr=1e-6)
    history = trainer.fit()
    assert len(history) < 30
    assert trainer.evals_without_improvement >= 1


def test_loss_parameters_are_optimised() -> None:
    torch.manual_seed(0)
    train = _digits(range(6))
    loss = losses.ArcFaceLoss(num_classes=6, embedding_size=16)
    before = loss.W.detach().clone()
    trainer = Trainer(_model(), loss, train, TrainConfig(epochs=1, p=3, k=8, progress=False))
    trainer.fit()
    assert not torch.equal(before, loss.W.detach())
    assert trainer.optimizer.param_groups[1]["lr"] >= 0  # the loss's own group


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) in .train.: epochz"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="scheduler"):
        TrainConfig(scheduler="linear")


def _learning_rates(trainer: Trainer, steps: int) -> list[float]:
    """The model group's learning rate at each of the first ``steps`` steps."""
    factor = trainer.scheduler.lr_lambdas[0]
    return [trainer.config.lr * factor(step) for step in range(steps)]


@pytest.mark.parametrize("scheduler", ["auto", "cosine", "none"])
def test_auto_schedule_is_cosine_in_memory_and_constant_for_photo_files(
    tmp_path: Path, scheduler: str
) -> None:
    import math

    from tests.lazy_pngs import write_pngs

    config = TrainConfig(epochs=2, p=2, k=2, progress=False, scheduler=scheduler, lr=0.01)
    photos = write_pngs(tmp_path, range(2), 4)  # 2 batches an epoch: 4 steps in all
    in_memory = _digits(range(2))
    for data, decays in ((in_memory, scheduler != "none"), (photos, scheduler == "cosine")):
        trainer = Trainer(_model(), losses.TripletMarginLoss(), data, config)
        steps = config.epochs * len(trainer.sampler)
        cosine = [0.005 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)]
        expected = cosine if decays else [0.01] * steps
        assert _learning_rates(trainer, steps) == pytest.approx(expected)


# -- HDML -------------------------------------------------------------------------------------


def test_hdml_trains_all_three_parts_in_their_own_groups(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, epochs=1, hdml=True, grad_clip=1.0)
    assert trainer.hdml is not None
    generator = [p.detach().clone() for p in trainer.hdml.generator.parameters()]
    classifier = trainer.hdml.classifier.weight.detach().clone()
    model = _weights(trainer)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert sorted(groups) == ["classifier", "generator", "model"]  # the triplet loss has none
    assert groups["generator"]["lr"] == pytest.approx(1e-2)  # HDML's official rates
    assert groups["classifier"]["lr"] == pytest.approx(1e-3)
    history = trainer.fit(max_steps=3)
    assert history == []  # stopped mid-epoch
    assert any(not torch.equal(a, b) for a, b in zip(model, _weights(trainer), strict=True))
    changed = [p.detach() for p in trainer.hdml.generator.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(generator, changed, strict=True))
    assert not torch.equal(classifier, trainer.hdml.classifier.weight.detach())
    assert int(trainer.hdml.window_count) == 3  # running means updated (training mode)
    assert set(trainer.last_hdml_losses) >= {"hdml_generator_loss", "hdml_synthetic_weight"}
    state = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(state["hdml"]["j_avg"], trainer.hdml.j_avg)
    assert state["hdml"]["generator.fc1.weight"].shape == (16, 16)


def test_hdml_with_loss_parameters_puts_them_in_the_loss_group() -> None:
    torch.manual_seed(0)
    model = _model()
    loss = losses.ArcFaceLoss(num_classes=6, embedding_size=16)
    hdml = _hdml(model, loss)
    config = TrainConfig(epochs=1, p=3, k=8, progress=False)
    trainer = Trainer(model, loss, _digits(range(6)), config, hdml=hdml)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert [id(p) for p in groups["loss"]["params"]] == [id(loss.W)]
    assert groups["loss"]["lr"] == pytest.approx(config.loss_lr)


def test_hdml_needs_an_embedding_net_and_its_own_loss(tmp_path: Path) -> None:
    model = _model()
    loss = losses.TripletMarginLoss()
    hdml = _hdml(model, loss)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    with pytest.raises(ValueError, match="features"):
        Trainer(plain, loss, _digits(range(6)), TrainConfig(p=4, k=8), hdml=hdml)
    with pytest.raises(ValueError, match="metric_loss"):
        Trainer(model, losses.TripletMarginLoss(), _digits(range(6)), TrainConfig(), hdml=hdml)
    _trainer(tmp_path, epochs=1, hdml=True).fit(max_steps=1)
    with pytest.raises(ValueError, match="with HDML"):
        _trainer(tmp_path, epochs=1).fit()  # an HDML checkpoint, resumed without HDML


def test_run_config_and_cli_flags_for_hdml(tmp_path: Path) -> None:
    parser = build_parser()
    base = ["train", "--no-progress", "--dataset", "digits"]
    assert not config_from_args(parser.parse_args(base)).hdml
    assert config_from_args(parser.parse_args([*base, "--hdml"])).hdml
    assert not config_from_args(parser.parse_args([*base, "--hdml", "false"])).hdml
    args = parser.parse_args([*base, "--hdml", "--set", "hdml_options.alpha=2.5"])
    config = config_from_args(args)
    assert config.hdml_options == {"alpha": 2.5}
    assert RunConfig.from_dict(config.to_dict()) == config  # survives config.yaml
    with pytest.raises(ValueError, match="'hdml'"):
        RunConfig.from_dict({"hdml": "yes"})
    with pytest.raises(ValueError, match="'hdml_options'"):
        RunConfig.from_dict({"hdml_options": [1]})
    model, loss = _model(), losses.TripletMarginLoss()
    hdml = build_hdml(model, loss, 10, {"alpha": 2.5, "hidden_size": 8})
    assert (hdml.alpha, hdml.feature_size, hdml.embedding_size) == (2.5, 8, 16)
    with pytest.raises(ValueError, match="hdml_options': alfa"):
        build_hdml(model, loss, 10, {"alfa": 1.0})
    with pytest.raises(ValueError, match="hdml_options': num_classes"):
        build_hdml(model, loss, 10, {"num_classes": 3})


def test_cli_train_with_hdml_writes_hdml_state(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "dataset: digits\ntest_classes: 0.4\nval_classes: 0.0\nrotations: false\n"
        "model: {channels: 8, blocks: 2, embedding_size: 8}\n"
        "loss: {name: TripletMarginLoss, margin: 0.1}\n"
        f"train: {{epochs: 1, p: 3, k: 8, tensorboard: false}}\nout: {tmp_path / 'run'}\n"
    )
    args = ["train", "--config", str(config), "--no-progress", "--hdml"]
    assert main([*args, "--set", "hdml_options.hidden_size=8"]) == 0
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["hdml"]["generator.fc2.weight"].shape == (8, 8)  # trunk width 8, hidden 8
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["hdml_classifier_loss"] > 0


# -- TensorBoard ------------------------------------------------------------------------------


def test_without_tensorboard_only_metrics_jsonl_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import now fails
    trainer = _trainer(tmp_path, epochs=1, p=6, k=16)
    history = trainer.fit()
    assert len(history) == 1
    assert (tmp_path / "metrics.jsonl").is_file()
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_scalars_match_the_metrics_log(tmp_path: Path) -> None:
    pytest.importorskip("torch.utils.tensorboard")  # needs the optional tensorboard package
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(tmp_path, epochs=2, p=6, k=16)
    trainer.fit(max_steps=len(trainer.sampler) + 1)  # stops in epoch 2, writer closed
    resumed = _trainer(tmp_path, epochs=2, p=6, k=16)
    history = resumed.fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train_loss", "lr", "val_precision_at_1"} <= set(events.Tags()["scalars"])
    for name in ("train_loss", "val_mean_average_precision_at_r"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        expected = [(int(r["epoch"]), r[name]) for r in history]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
