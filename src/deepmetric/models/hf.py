"""Hugging Face ``transformers`` vision models from a local folder, as trunks.

Any folder written by ``save_pretrained`` (or a hub snapshot copied to disk) whose config is a
vision model works: DINOv2 (Oquab et al., 2023), ViT (Dosovitskiy et al., 2021), the vision
tower of CLIP (Radford et al., 2021) or SigLIP, ConvNeXt (Liu et al., 2022), ResNet, Swin, ...
Loading is ``local_files_only``: nothing is downloaded.

The trunk's output is the model's pooled embedding:

* ``pooler_output`` when the model has one and its weights are in the folder (DINOv2 and CLIP:
  the final-normed CLS token; ConvNeXt: the normed spatial mean; ResNet: the spatial mean);
* otherwise the CLS token ``last_hidden_state[:, 0]`` of a ViT-like model (a DINO checkpoint
  loaded as ``ViTModel`` has no trained pooler: its random tanh layer is skipped), or the
  spatial mean of a convolutional feature map.

The input spec comes from the folder's ``preprocessor_config.json`` (``image_mean``,
``image_std``, ``crop_size`` or ``size``) when present, else ImageNet's statistics at the
config's ``image_size``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec

POOLINGS = ("auto", "pooler", "cls", "mean")


class HFTrunk(nn.Module):
    """A ``transformers`` vision model returning pooled features ``(N, C, H, W) -> (N, F)``.

    Args:
        model: the ``transformers`` model (called as ``model(pixel_values=x)``).
        pooling: ``"auto"`` (module docstring), ``"pooler"``, ``"cls"`` (first token) or
            ``"mean"`` (mean of all tokens, or of the feature map).
        output: the output field to return instead of pooling (``"image_embeds"`` for a CLIP
            tower with its projection), or ``None``.
    """

    def __init__(self, model: nn.Module, pooling: str = "auto", output: str | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.pooling = pooling
        self.output = output
        # ViT and CLIP refuse any side but the config's unless told to interpolate their
        # position embeddings (the identity at the native side); DINOv2 always interpolates.
        params = inspect.signature(model.forward).parameters
        self._interpolate = "interpolate_pos_encoding" in params

    def forward(self, x: Tensor) -> Tensor:
        kwargs: dict[str, Any] = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.model(pixel_values=x, **kwargs)
        if self.output is not None:
            return out[self.output]
        pooled = getattr(out, "pooler_output", None)
        if self.pooling in ("auto", "pooler") and pooled is not None:
            return pooled.flatten(1)
        if self.pooling == "pooler":
            raise ValueError(f"{type(self.model).__name__} has no pooler_output")
        hidden = out.last_hidden_state
        if hidden.ndim == 4:
            return hidden.mean(dim=(-2, -1))
        if self.pooling == "mean":
            return hidden.mean(dim=1)
        return hidden[:, 0]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (deepmetric reports what matters)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _side(value: Any) -> int | None:
    """A side in px from a processor ``size``/``crop_size`` or a config ``image_size``."""
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and value:
        return int(value[-1])
    if isinstance(value, dict):
        for key in ("height", "shortest_edge", "width"):
            if isinstance(value.get(key), int):
                return int(value[key])
    return None


def processor_spec(folder: Path, vision_config: Any, channels: int) -> InputSpec:
    """The input spec of a ``transformers`` folder: its image processor's crop side and
    normalisation when ``preprocessor_config.json`` is there, else ImageNet's at the config's
    ``image_size`` (224 when it has none)."""
    processor: dict[str, Any] = {}
    path = folder / "preprocessor_config.json"
    if path.is_file():
        try:
            processor = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
    size = None
    if processor.get("do_center_crop", True):
        size = _side(processor.get("crop_size"))
    size = size or _side(processor.get("size")) or _side(getattr(vision_config, "image_size", None))
    if processor.get("do_normalize", True) is False:
        mean: tuple[float, ...] = (0.0,) * channels
        std: tuple[float, ...] = (1.0,) * channels
    else:
        mean = tuple(processor.get("image_mean", IMAGENET_MEAN))
        std = tuple(processor.get("image_std", IMAGENET_STD))
        if len(mean) != channels:
            mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return InputSpec(channels, size or 224, mean, std)


def _vision_class(transformers: Any, config: Any, folder: Path, projection: bool) -> Any:
    """The class that loads the folder's vision model (the vision tower of a two-tower model)."""
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", "?")
    if not projection and model_type in modeling_auto.MODEL_FOR_IMAGE_MAPPING_NAMES:
        return transformers.AutoModel
    vision = getattr(config, "vision_config", None)
    tower_type = getattr(vision, "model_type", model_type)
    name = modeling_auto.MODEL_MAPPING_NAMES.get(tower_type)
    if isinstance(name, str) and name.endswith("VisionModel"):
        if projection:
            name += "WithProjection"
            if not hasattr(transformers, name):
                raise ValueError(f"{folder} ({model_type}) has no vision projection ({name})")
        return getattr(transformers, name)
    raise ValueError(
        f"{folder} holds a {model_type!r} model, which is not a vision model: use a folder of "
        "an image model (DINOv2, ViT, CLIP, ConvNeXt, ResNet, ...)"
    )


def hf_trunk(
    folder: str | Path,
    *,
    in_channels: int | None = None,
    pretrained: bool = True,
    pooling: str = "auto",
    projection: bool = False,
) -> tuple[nn.Module, nn.Module, int, InputSpec]:
    """Load the vision model of a local ``transformers`` folder as a trunk.

    Args:
        folder: a folder with ``config.json`` and the weights (``model.safetensors``).
        in_channels: must match the config's ``num_channels`` when given.
        pretrained: ``False`` builds the architecture with random weights (rebuilding a
            fine-tuned model whose weights come from a deepmetric checkpoint).
        pooling: see :class:`HFTrunk`.
        projection: a CLIP-like tower's projected embedding (``image_embeds``,
            ``projection_dim`` wide) instead of its pooled output.

    Returns:
        ``(trunk, model, features, input_spec)``: the :class:`HFTrunk`, the ``transformers``
        model inside it (whose state_dict keys a checkpoint is matched against), the width of
        the trunk's output and what to feed it.
    """
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is not a transformers model folder (no config.json); save one with "
            "model.save_pretrained(folder)"
        )
    try:
        import transformers
    except Exception as error:
        raise ValueError(
            f"transformers is not installed or does not import here ({error}): "
            "pip install 'deepmetric[transformers]'"
        ) from error
    with _quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot read the transformers config in {path}: {error}") from error
        cls = _vision_class(transformers, config, path, projection)
        vision_config = getattr(config, "vision_config", None) or config
        overrides: dict[str, Any] = {}
        if projection and hasattr(config, "vision_config"):
            # The tower's own config keeps a default projection_dim; the pair's is the truth.
            overrides["projection_dim"] = config.projection_dim
            vision_config.projection_dim = config.projection_dim
        if pretrained:
            try:
                model, info = cls.from_pretrained(
                    path, local_files_only=True, output_loading_info=True, **overrides
                )
            except (OSError, ValueError, RuntimeError) as error:
                raise ValueError(f"cannot load the model weights in {path}: {error}") from error
        else:
            model = cls.from_config(config) if cls is transformers.AutoModel else cls(vision_config)
            info = {}
    missing = sorted(info.get("missing_keys", ()))
    no_pooler = any(k.startswith("pooler.") for k in missing)
    missing = [k for k in missing if not k.startswith("pooler.")]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ValueError(
            f"the weights in {path} do not cover {type(model).__name__}: missing "
            f"{missing[:5]}, shapes differ {[str(m) for m in mismatched[:3]]}"
        )
    if no_pooler and pooling == "pooler":
        raise ValueError(f"{path} has no trained pooler weights; use pooling='cls' or 'auto'")
    if no_pooler and pooling == "auto":
        pooling = "cls"
    channels = int(getattr(vision_config, "num_channels", 3))
    if in_channels is not None and in_channels != channels:
        raise ValueError(
            f"{path} takes {channels}-channel images, got in_channels={in_channels}; feed "
            f"{'RGB' if channels == 3 else 'grey'} images"
        )
    trunk = HFTrunk(model, pooling, "image_embeds" if projection else None)
    spec = processor_spec(path, vision_config, channels)
    if projection:
        features = int(config.projection_dim)
    elif getattr(vision_config, "hidden_sizes", None):
        features = int(vision_config.hidden_sizes[-1])
    elif isinstance(getattr(vision_config, "hidden_size", None), int):
        features = int(vision_config.hidden_size)
    else:  # no width in the config: measure it on one zero image
        trunk.eval()
        with torch.no_grad():
            features = int(trunk(torch.zeros(1, channels, spec.size, spec.size)).shape[1])
    return trunk, model, features, spec
