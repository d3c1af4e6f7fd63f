"""Image transforms: a decoded PIL image -> a normalised ``(C, H, W)`` float32 tensor.

A transform is any callable ``transform(image, generator) -> Tensor``:

* ``image`` is a :class:`PIL.Image.Image` already decoded by :class:`deepmetric.data.ImageDataset`
  (EXIF orientation applied, first frame, converted to ``"RGB"`` or ``"L"``);
* ``generator`` is a :class:`torch.Generator` that the transform draws *every* random number from,
  so that a sample's augmentation depends only on the seed the trainer gave it, not on which worker
  process decodes it (exact resume). ``None`` means evaluation: the deterministic transforms ignore
  it, and :class:`TrainTransform` then falls back to torch's global random state (not reproducible
  across worker processes; the trainer always passes a generator);
* the result is ``(C, H, W)`` float32, ``C`` = 3 for RGB and 1 for grey, normalised with the
  transform's ``mean`` and ``std`` (one value per channel, or one value for every channel).

Three transforms cover the usual cases, written with Pillow and torch only (torchvision does not
import beside every torch build this project supports):

* :class:`EvalTransform` — photographs at evaluation: resize the shorter side to ``resize``
  (aspect kept), centre crop ``size`` × ``size``; the ImageNet protocol of Krizhevsky et al.
  (2012) as the deep metric learning literature uses it (resize 256, crop 224);
* :class:`TrainTransform` — photographs in training: random resized crop (Szegedy et al., 2015,
  "Going deeper with convolutions"), horizontal flip and optional colour jitter; the recipe of the
  DML literature for CUB, Cars196, SOP and In-Shop (e.g. Roth et al., 2020, "Revisiting Training
  Strategies and Generalization Performance in Deep Metric Learning");
* :class:`SmallImageTransform` — small grey images such as Omniglot's characters: a plain resize
  to ``size`` × ``size`` (no crop: a character's strokes reach the border), deterministic. The
  small-image affine distortions stay in :mod:`deepmetric.augment`, applied to batches.

``mean`` and ``std`` default to ImageNet's (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), what
most pretrained backbones expect; pass a backbone's own normalisation where it differs.

Transforms that crop may also tell the decoder how small a JPEG may be decoded
(``decode_size(width, height)``): libjpeg then scales by 1/2, 1/4 or 1/8 while decoding, several
times faster for camera-sized photos, without going below the resolution the transform uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BILINEAR = Image.Resampling.BILINEAR


class Transform(Protocol):
    """``(image, generator) -> (C, H, W) float32``: what :class:`deepmetric.data.ImageDataset`
    calls on each decoded image."""

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor: ...


def to_tensor(image: Image.Image) -> Tensor:
    """An ``"RGB"`` or ``"L"`` image -> ``(C, H, W)`` float32 in ``[0, 1]`` (value / 255)."""
    if image.mode not in ("RGB", "L"):
        raise ValueError(f"to_tensor takes RGB or L images, got mode {image.mode!r}")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float().div_(255.0)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel of a ``(C, H, W)`` tensor; ``mean``/``std`` hold one value
    per channel or a single value for all of them."""
    channels = x.shape[0]
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise ValueError(
                f"the image has {channels} channel(s) but {name} has {len(values)} values: pass "
                f"one value per channel (or one for all), e.g. mean=(0.5,), std=(0.5,) for grey "
                f"images, or decode in the mode the model expects (mode='RGB')"
            )
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    mean_t, std_t = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if not mean_t or len(mean_t) != len(std_t):
        raise ValueError(f"mean and std need as many values, got {mean_t} and {std_t}")
    if any(s <= 0 for s in std_t):
        raise ValueError(f"std must be positive, got {std_t}")
    return mean_t, std_t


def _check_size(size: int, name: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive integer, got {size!r}")
    return size


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    """One number uniform in ``[low, high)`` from ``generator`` (torch's global state if None)."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """One integer uniform in ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[int, int, int, int]:
    """The box ``(left, top, crop_width, crop_height)`` of a random resized crop (Szegedy et al.,
    2015): an area fraction uniform in ``scale`` and an aspect ratio (width / height)
    log-uniform in ``ratio``; up to 10 tries to fit the image, then the largest centred box whose
    ratio is clamped to ``ratio``."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(generator, 0, height - h)
            left = _randint(generator, 0, width - w)
            return left, top, w, h
    # An extreme image shape: fall back to a centred crop of the whole image, ratio clamped.
    image_ratio = width / height
    if image_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif image_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    return (width - w) // 2, (height - h) // 2, w, h


class EvalTransform:
    """Evaluation transform for photographs: resize the shorter side to ``resize`` keeping the
    aspect ratio (bilinear, antialiased), centre crop ``size`` × ``size``, scale to ``[0, 1]``,
    normalise. Deterministic (the generator is ignored).

    Args:
        size: side of the square crop (224 for most backbones).
        resize: shorter side before the crop, at least ``size``; default ``round(size * 256 /
            224)`` (the ImageNet ratio: 256 for 224).
        mean, std: the backbone's normalisation, one value per channel (or one for all).

    Shapes: an image of any size -> ``(C, size, size)`` float32.
    """

    def __init__(
        self,
        size: int = 224,
        resize: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.size = _check_size(size)
        self.resize = round(size * 256 / 224) if resize is None else _check_size(resize, "resize")
        if self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be at least size ({self.size})")
        self.mean, self.std = _check_stats(mean, std)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(size={self.size}, resize={self.resize}, mean={self.mean}, "
            f"std={self.std})"
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The ``(width, height)`` an image is resized to before the crop."""
        factor = self.resize / min(width, height)
        return max(self.resize, round(width * factor)), max(self.resize, round(height * factor))

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest ``(width, height)`` worth decoding (JPEG draft mode)."""
        return self.resized_size(width, height)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        new_w, new_h = self.resized_size(*image.size)
        resized = image.resize((new_w, new_h), _BILINEAR)
        left = (new_w - self.size) // 2
        top = (new_h - self.size) // 2
        crop = resized.crop((left, top, left + self.size, top + self.size))
        return normalize(to_tensor(crop), self.mean, self.std)


class TrainTransform:
    """Training transform for photographs: a random resized crop to ``size`` × ``size``
    (Szegedy et al., 2015), a horizontal flip with probability ``hflip``, optional colour jitter,
    scaled to ``[0, 1]`` and normalised.

    Every random number comes from the generator, in a fixed order (crop, flip, jitter factors),
    so the same image and seed give the same tensor on any process. Colour jitter multiplies
    brightness, contrast and saturation, in that order, by factors uniform in
    ``[max(0, 1 - s), 1 + s]`` (Pillow's ``ImageEnhance``); hue is left alone.

    Args:
        size: side of the output.
        scale: range of the crop's area as a fraction of the image (0.16-1 in the DML recipes;
            ImageNet training uses 0.08-1).
        ratio: range of the crop's aspect ratio, width / height.
        hflip: probability of a horizontal flip.
        color_jitter: ``s`` for brightness, contrast and saturation alike, or a triple of them;
            0 turns jitter off.
        mean, std: the backbone's normalisation.

    Shapes: an image of any size -> ``(C, size, size)`` float32.
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.16, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | tuple[float, float, float] = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.size = _check_size(size)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
        jitter = (
            (float(color_jitter),) * 3
            if isinstance(color_jitter, (int, float))
            else tuple(float(v) for v in color_jitter)
        )
        if len(jitter) != 3 or any(v < 0 for v in jitter):
            raise ValueError(
                f"color_jitter is one value >= 0 or (brightness, contrast, saturation) >= 0, "
                f"got {color_jitter}"
            )
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.color_jitter = jitter
        self.mean, self.std = _check_stats(mean, std)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip}, color_jitter={self.color_jitter}, mean={self.mean}, "
            f"std={self.std})"
        )

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest ``(width, height)`` worth decoding: the smallest crop (area ``scale[0]``)
        must still hold ``size`` pixels across, so the shorter side keeps ``size /
        sqrt(scale[0])`` pixels (560 for 224 and 0.16)."""
        shorter = math.ceil(self.size / math.sqrt(self.scale[0]))
        factor = min(1.0, shorter / min(width, height))
        return max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        left, top, w, h = random_resized_crop_box(*image.size, self.scale, self.ratio, generator)
        crop = image.crop((left, top, left + w, top + h))
        out = crop.resize((self.size, self.size), _BILINEAR)
        if _uniform(generator, 0.0, 1.0) < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        for strength, enhancer in zip(self.color_jitter, enhancers, strict=True):
            if strength > 0:
                factor = _uniform(generator, max(0.0, 1.0 - strength), 1.0 + strength)
                out = enhancer(out).enhance(factor)
        return normalize(to_tensor(out), self.mean, self.std)


class SmallImageTransform:
    """Small (grey) images, Omniglot-like: resize to ``size`` (bilinear, aspect not kept — the
    layout of :func:`deepmetric.data.load_image_folder`), scale to ``[0, 1]``, normalise.
    Deterministic (the generator is ignored).

    Args:
        size: side of the square output, or ``(height, width)``.
        mean, std: default ``(0,)`` and ``(1,)``: the pixels stay in ``[0, 1]``.

    Shapes: an image of any size -> ``(C, height, width)`` float32.
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 28,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ) -> None:
        if isinstance(size, int):
            self.height = self.width = _check_size(size)
        else:
            self.height, self.width = (_check_size(s) for s in size)
        self.mean, self.std = _check_stats(mean, std)

    def __repr__(self) -> str:
        return (
            f"SmallImageTransform(size=({self.height}, {self.width}), mean={self.mean}, "
            f"std={self.std})"
        )

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        resized = image.resize((self.width, self.height), _BILINEAR)
        return normalize(to_tensor(resized), self.mean, self.std)
