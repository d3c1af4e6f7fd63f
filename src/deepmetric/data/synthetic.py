"""Synthetic photo folders for examples, tests and benchmarks: nothing to download.

Two generators write ``root/<class>/<image>.jpg`` trees that look, to a metric-learning model,
like the two workflows deepmetric serves:

* :func:`make_faces` — "identities": each has its own face geometry (head shape, eye spacing
  and size, nose, mouth width), skin, hair and eye colours; each photo of it varies the pose
  (shift, scale, small rotation), expression (mouth curve, eyes open), lighting and background,
  and adds sensor noise. Telling two identities apart needs the geometry, not the colours alone.
* :func:`make_products` — "products": each is a shape (one of several), a two-colour pattern
  (stripes, dots, checks, plain) and a label band; each photo varies the viewpoint (scale,
  position, rotation, perspective-like squeeze), lighting, background clutter and occlusion.

Both are deterministic in ``seed`` and fast (a few milliseconds per 128-pixel image), so a
test can make a folder of a few dozen images and a benchmark one of 50,000.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["make_faces", "make_products"]


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(low, high, size=3))
    return r, g, b


def _jitter(colour: tuple[int, ...], rng: np.random.Generator, amount: float) -> tuple[int, ...]:
    factor = 1 + rng.uniform(-amount, amount)
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


def _finish(
    image: Image.Image, rng: np.random.Generator, rotation: float, noise: float
) -> Image.Image:
    """Rotate about the centre, blur a little and add sensor noise."""
    image = image.rotate(rotation, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 0.8))))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0, noise, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


#: Darkest and lightest skin tone (RGB); identities take a tone in between.
_SKIN = ((95, 60, 40), (245, 210, 185))
_HAIR = ((20, 15, 10), (70, 45, 25), (130, 90, 50), (200, 170, 110), (150, 150, 150), (110, 40, 20))


def _box(
    cx: float, cy: float, scale: float, x: float, y: float, w: float, h: float
) -> tuple[float, ...]:
    return (cx + (x - w) * scale, cy + (y - h) * scale, cx + (x + w) * scale, cy + (y + h) * scale)


def make_faces(
    root: str | Path,
    identities: int = 20,
    photos: int = 10,
    size: int = 128,
    seed: int = 0,
    prefix: str = "person",
) -> list[Path]:
    """Write ``identities`` × ``photos`` synthetic face photos (JPEG, ``size`` pixels) to
    ``root/<prefix>NNN/photoNN.jpg``; returns the paths. Identity ``i`` looks the same for a
    given ``seed`` whatever ``photos`` is, so two calls with different counts agree."""
    if identities < 1 or photos < 1 or size < 32:
        raise ValueError("need identities >= 1, photos >= 1 and size >= 32")
    root = Path(root)
    paths = []
    for person in range(identities):
        traits = np.random.default_rng([seed, person, 0])
        head_w, head_h = traits.uniform(0.28, 0.38), traits.uniform(0.36, 0.46)
        eye_gap, eye_y = traits.uniform(0.08, 0.16), traits.uniform(-0.08, 0.02)
        eye_r, nose_len = traits.uniform(0.025, 0.05), traits.uniform(0.05, 0.12)
        mouth_w, mouth_y = traits.uniform(0.06, 0.14), traits.uniform(0.12, 0.2)
        tone = traits.uniform()  # from dark to light skin, as people's skin varies
        skin = tuple(
            int(dark + tone * (light - dark) + traits.uniform(-12, 12))
            for dark, light in zip(*_SKIN, strict=True)
        )
        hair = _HAIR[int(traits.integers(len(_HAIR)))]
        iris, hair_len = _colour(traits, 20, 200), traits.uniform(0.05, 0.3)
        folder = root / f"{prefix}{person:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for shot in range(photos):
            rng = np.random.default_rng([seed, person, shot + 1])
            background = _colour(rng, 0, 256)
            image = Image.new("RGB", (size, size), background)
            draw = ImageDraw.Draw(image)
            scale = size * rng.uniform(0.85, 1.1)
            cx = size / 2 + rng.uniform(-0.08, 0.08) * size
            cy = size / 2 + rng.uniform(-0.06, 0.06) * size
            light = 0.15  # brightness of this photo's lighting, relative

            def box(x: float, y: float, w: float, h: float) -> tuple[float, ...]:
                """A box around ``(x, y)`` of half-size ``(w, h)``, in face units."""
                return _box(cx, cy, scale, x, y, w, h)  # noqa: B023 (used in this iteration)

            draw.ellipse(
                box(0, -head_h * 0.35, head_w * 1.05, head_h * 0.75 + hair_len * 0.3),
                fill=_jitter(hair, rng, light),
            )
            draw.ellipse(box(0, 0, head_w, head_h), fill=_jitter(skin, rng, light))
            openness = rng.uniform(0.3, 1.0)
            for side in (-1, 1):
                x = side * eye_gap
                draw.ellipse(box(x, eye_y, eye_r * 1.6, eye_r * openness), fill=(245, 245, 245))
                draw.ellipse(box(x, eye_y, eye_r * 0.7, eye_r * 0.7 * openness), fill=iris)
            nose = [
                (cx, cy + (eye_y + 0.03) * scale),
                (cx - 0.03 * scale, cy + (eye_y + 0.03 + nose_len) * scale),
                (cx + 0.03 * scale, cy + (eye_y + 0.03 + nose_len) * scale),
            ]
            draw.polygon(nose, fill=_jitter(skin, rng, 0.25))
            smile = rng.uniform(-0.04, 0.05)
            mouth = [
                (cx + t * mouth_w * scale, cy + (mouth_y + smile * (1 - t * t)) * scale)
                for t in np.linspace(-1, 1, 9)
            ]
            draw.line(mouth, fill=(120, 30, 40), width=max(1, size // 48))
            image = _finish(image, rng, float(rng.uniform(-12, 12)), noise=6.0)
            path = folder / f"photo{shot:02d}.jpg"
            image.save(path, quality=90)
            paths.append(path)
    return paths


_SHAPES = ("box", "bottle", "disc", "triangle", "ring")
_PATTERNS = ("plain", "stripes", "dots", "checks")


def make_products(
    root: str | Path,
    products: int = 20,
    photos: int = 8,
    size: int = 128,
    seed: int = 0,
    prefix: str = "product",
) -> list[Path]:
    """Write ``products`` × ``photos`` synthetic product photos (JPEG, ``size`` pixels) to
    ``root/<prefix>NNN/viewNN.jpg``; returns the paths. Product ``i`` looks the same for a given
    ``seed`` whatever ``photos`` is."""
    if products < 1 or photos < 1 or size < 32:
        raise ValueError("need products >= 1, photos >= 1 and size >= 32")
    root = Path(root)
    paths = []
    for item in range(products):
        traits = np.random.default_rng([seed, item, 0, 1])
        shape = _SHAPES[int(traits.integers(len(_SHAPES)))]
        pattern = _PATTERNS[int(traits.integers(len(_PATTERNS)))]
        base, accent = _colour(traits), _colour(traits)
        band_y, band_h = traits.uniform(-0.15, 0.15), traits.uniform(0.05, 0.15)
        period = traits.uniform(0.06, 0.14)
        aspect = traits.uniform(0.5, 1.0)
        folder = root / f"{prefix}{item:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for shot in range(photos):
            rng = np.random.default_rng([seed, item, shot + 1, 1])
            image = Image.new("RGB", (size, size), _colour(rng, 60, 256))
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(0, 4))):  # clutter behind the product
                x0, y0 = rng.uniform(0, size, 2)
                draw.rectangle(
                    (x0, y0, x0 + rng.uniform(5, size / 3), y0 + rng.uniform(5, size / 3)),
                    fill=_colour(rng, 60, 256),
                )
            scale = size * rng.uniform(0.32, 0.45)
            squeeze = rng.uniform(0.8, 1.0)
            cx = size / 2 + rng.uniform(-0.1, 0.1) * size
            cy = size / 2 + rng.uniform(-0.1, 0.1) * size
            half_w, half_h = scale * aspect * squeeze, scale
            outline = (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
            mask = Image.new("L", (size, size), 0)
            mask_draw = ImageDraw.Draw(mask)
            if shape == "box":
                mask_draw.rectangle(outline, fill=255)
            elif shape == "bottle":
                mask_draw.rounded_rectangle(outline, radius=half_w * 0.6, fill=255)
                mask_draw.rectangle(
                    (cx - half_w * 0.3, cy - half_h * 1.25, cx + half_w * 0.3, cy - half_h),
                    fill=255,
                )
            elif shape == "disc":
                mask_draw.ellipse(outline, fill=255)
            elif shape == "triangle":
                mask_draw.polygon(
                    [(cx, cy - half_h), (cx - half_w, cy + half_h), (cx + half_w, cy + half_h)],
                    fill=255,
                )
            else:
                mask_draw.ellipse(outline, fill=255)
                mask_draw.ellipse(
                    (cx - half_w / 2, cy - half_h / 2, cx + half_w / 2, cy + half_h / 2), fill=0
                )
            light = 0.2
            surface = Image.new("RGB", (size, size), _jitter(base, rng, light))
            paint = ImageDraw.Draw(surface)
            step = max(2, int(period * size))
            accent_lit = _jitter(accent, rng, light)
            if pattern == "stripes":
                for x in range(0, size, 2 * step):
                    paint.rectangle((x, 0, x + step - 1, size), fill=accent_lit)
            elif pattern == "dots":
                for x in range(0, size, 2 * step):
                    for y in range(0, size, 2 * step):
                        paint.ellipse((x, y, x + step, y + step), fill=accent_lit)
            elif pattern == "checks":
                for x in range(0, size, step):
                    for y in range(0, size, step):
                        if (x // step + y // step) % 2:
                            paint.rectangle((x, y, x + step - 1, y + step - 1), fill=accent_lit)
            band_top = cy + (band_y - band_h) * scale * 2
            paint.rectangle(
                (0, band_top, size, band_top + band_h * scale * 2), fill=_jitter(accent, rng, 0.1)
            )
            image.paste(surface, (0, 0), mask)
            if rng.uniform() < 0.3:  # something in front of the product
                x0 = rng.uniform(0, size * 0.8)
                draw.rectangle(
                    (x0, rng.uniform(0, size), x0 + size * 0.2, size), fill=_colour(rng, 0, 256)
                )
            rotation = float(rng.uniform(-25, 25)) + (180.0 if rng.uniform() < 0.05 else 0.0)
            image = _finish(image, rng, rotation, noise=5.0)
            path = folder / f"view{shot:02d}.jpg"
            image.save(path, quality=90)
            paths.append(path)
    return paths
