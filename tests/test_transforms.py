"""Transforms: geometry checked on synthetic images with known content, exact reproducibility
from a seed, and the normalisation's closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric import transforms as T

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
PLAIN = {"mean": (0.0,), "std": (1.0,)}  # no normalisation: outputs in [0, 1]


def _photo(width: int = 90, height: int = 70, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _three_squares(side: int = 100) -> Image.Image:
    """A red, a green and a blue square side by side: ``(3 * side) x side``."""
    array = np.zeros((side, 3 * side, 3), dtype=np.uint8)
    for i, colour in enumerate((RED, GREEN, BLUE)):
        array[:, i * side : (i + 1) * side] = colour
    return Image.fromarray(array)


def test_to_tensor_and_normalize_closed_form() -> None:
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    x = T.to_tensor(Image.fromarray(array))
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32)) / 255)
    grey = T.to_tensor(Image.fromarray(array[:, :, 0]))
    assert grey.shape == (1, 2, 3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = T.normalize(x, mean, std)
    for c in range(3):
        assert torch.allclose(out[c], (x[c] - mean[c]) / std[c])
    with pytest.raises(ValueError, match="1 channel"):
        T.normalize(grey, T.IMAGENET_MEAN, T.IMAGENET_STD)
    assert torch.allclose(T.normalize(grey, (0.5,), (0.5,)), (grey - 0.5) / 0.5)


def test_eval_transform_keeps_the_centre_and_the_aspect() -> None:
    # 300 x 100 -> shorter side 50 -> 150 x 50 -> centre 50 x 50 is the green square.
    out = T.EvalTransform(size=50, resize=50, **PLAIN)(_three_squares(), None)
    assert out.shape == (3, 50, 50)
    inner = out[:, :, 3:-3]  # the columns next to the crop's edges blend in the neighbours
    assert torch.allclose(inner, torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand_as(inner))
    # A dark vertical stripe 10% of the width wide: kept 10% of the resized width (10 of 100
    # columns), where squashing the image to a square would halve it to 5.
    array = np.full((100, 200), 255, dtype=np.uint8)
    array[:, 90:110] = 0
    grey = T.EvalTransform(size=50, resize=50, **PLAIN)(Image.fromarray(array), None)
    dark_columns = int((grey[0].mean(dim=0) < 0.5).sum())
    assert dark_columns == 10
    assert T.EvalTransform(size=50, resize=50).resized_size(400, 100) == (200, 50)
    assert T.EvalTransform(size=224).resize == 256


def test_eval_transform_is_the_imagenet_recipe_by_hand() -> None:
    image = _photo(90, 70)
    out = T.EvalTransform(size=32, resize=40)(image, None)
    # by hand: shorter side 70 -> 40, so 90 -> round(90 * 40 / 70) = 51; centre crop 32
    resized = image.resize((51, 40), Image.Resampling.BILINEAR)
    left, top = (51 - 32) // 2, (40 - 32) // 2
    crop = np.asarray(resized, dtype=np.float32)[top : top + 32, left : left + 32] / 255
    expected = (crop - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD)
    assert np.allclose(out.numpy(), expected.transpose(2, 0, 1), atol=1e-6)


def test_train_transform_is_reproducible_from_the_seed() -> None:
    transform = T.TrainTransform(size=24, color_jitter=0.4)
    image = _photo()
    first = transform(image, torch.Generator().manual_seed(7))
    again = transform(image, torch.Generator().manual_seed(7))
    assert first.shape == (3, 24, 24) and torch.equal(first, again)
    others = [transform(image, torch.Generator().manual_seed(s)) for s in range(8, 12)]
    assert all(not torch.equal(first, other) for other in others)


def test_horizontal_flip_mirrors() -> None:
    image = _photo(32, 32)
    whole = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), **PLAIN}  # the crop is the whole image
    kept = T.TrainTransform(size=32, hflip=0.0, **whole)(image, torch.Generator().manual_seed(0))
    flipped = T.TrainTransform(size=32, hflip=1.0, **whole)(image, torch.Generator().manual_seed(0))
    array = np.asarray(image, dtype=np.float32) / 255
    assert np.allclose(kept.numpy(), array.transpose(2, 0, 1), atol=1e-6)
    assert np.allclose(flipped.numpy(), array[:, ::-1].transpose(2, 0, 1), atol=1e-6)


def test_random_resized_crop_box_respects_scale_ratio_and_bounds() -> None:
    generator = torch.Generator().manual_seed(0)
    areas, ratios = [], []
    for _ in range(300):
        left, top, w, h = T.random_resized_crop_box(120, 80, (0.2, 0.6), (0.5, 2.0), generator)
        assert 0 <= left and left + w <= 120 and 0 <= top and top + h <= 80
        areas.append(w * h / (120 * 80))
        ratios.append(w / h)
    # rounding the sides to pixels moves the area and ratio by a pixel's worth
    assert 0.2 - 0.02 <= min(areas) and max(areas) <= 0.6 + 0.02
    assert 0.5 - 0.05 <= min(ratios) and max(ratios) <= 2.0 + 0.05
    assert max(areas) - min(areas) > 0.3  # the range is used, not one value
    # an image too thin for any crop of the ratio range: the centred fallback, ratio clamped
    left, top, w, h = T.random_resized_crop_box(400, 10, (0.9, 1.0), (0.75, 4 / 3), generator)
    assert (h, w) == (10, round(10 * 4 / 3)) and left == (400 - w) // 2 and top == 0


def test_train_crop_is_a_part_of_the_image_resized() -> None:
    # scale (0.25, 0.25) and ratio (1, 1) on a 100 x 100 image: a 50 x 50 crop, resized to 25
    image = _photo(100, 100)
    transform = T.TrainTransform(size=25, scale=(0.25, 0.25), ratio=(1, 1), hflip=0.0, **PLAIN)
    out = transform(image, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    left, top, w, h = T.random_resized_crop_box(100, 100, (0.25, 0.25), (1, 1), generator)
    assert (w, h) == (50, 50)
    by_hand = image.crop((left, top, left + 50, top + 50)).resize((25, 25), Image.BILINEAR)
    assert np.allclose(out.numpy(), np.asarray(by_hand).transpose(2, 0, 1) / 255, atol=1e-6)


def test_colour_jitter_factor_stays_in_range() -> None:
    grey = Image.new("RGB", (8, 8), (100, 100, 100))
    transform = T.TrainTransform(size=8, scale=(1, 1), ratio=(1, 1), color_jitter=(0.5, 0, 0))
    factors = set()
    for seed in range(20):
        out = transform(grey, torch.Generator().manual_seed(seed))
        raw = out * torch.tensor(transform.std).view(3, 1, 1) + torch.tensor(transform.mean).view(
            3, 1, 1
        )
        factor = float(raw.mean()) / (100 / 255)
        assert 0.5 - 0.01 <= factor <= 1.5 + 0.01
        factors.add(round(factor, 2))
    assert len(factors) > 10


def test_small_image_transform_resizes_to_a_square_or_height_width() -> None:
    image = Image.new("L", (30, 10), 51)
    out = T.SmallImageTransform(8)(image, None)
    assert out.shape == (1, 8, 8) and torch.allclose(out, torch.full_like(out, 0.2))
    assert T.SmallImageTransform((6, 4))(image, None).shape == (1, 6, 4)
    # a left-to-right ramp stays a ramp
    ramp = Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1)))
    row = T.SmallImageTransform(10)(ramp, None)[0, 0]
    assert bool((row[1:] > row[:-1]).all())


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="at least size"):
        T.EvalTransform(size=224, resize=200)
    with pytest.raises(ValueError, match="scale"):
        T.TrainTransform(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hflip"):
        T.TrainTransform(hflip=2.0)
    with pytest.raises(ValueError, match="color_jitter"):
        T.TrainTransform(color_jitter=-0.1)
    with pytest.raises(ValueError, match="size"):
        T.SmallImageTransform(0)
    with pytest.raises(ValueError, match="as many values"):
        T.EvalTransform(mean=(0.5, 0.5), std=(0.5,))


def test_decode_size_never_goes_below_what_the_transform_uses() -> None:
    assert T.EvalTransform(224).decode_size(1000, 800) == (320, 256)
    width, height = T.TrainTransform(224, scale=(0.16, 1.0)).decode_size(4000, 3000)
    assert height == 560 and width == math.ceil(4000 * 560 / 3000)
    assert T.TrainTransform(224).decode_size(300, 200) == (300, 200)  # never upscaled
