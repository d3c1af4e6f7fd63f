"""Augmentation of small images: random affine distortions for training, and test-time
augmentation for embedding.

Koch et al. (2015) trained their one-shot Siamese networks on Omniglot with small random affine
distortions of every training image (rotation, shear, scale, translation); for a few hundred
classes of hand-drawn characters they act like more drawers. :class:`RandomAffine` applies an
independent distortion to each image of a batch, on whatever device the batch is on, with one
``affine_grid`` + ``grid_sample`` call, and draws its random numbers from the generator it is
given, so that the trainer's exact resume covers it::

    trainer = Trainer(model, loss, train_set, augment=RandomAffine(rotation=15))

At test time the same distortions can average out what one drawing of a character leaves to
chance: :func:`embed_augmented` embeds each image together with ``copies`` distorted versions of
it and takes the mean (test-time augmentation). Each image is embedded on its own — nothing is
shared between the images of a query set — so it applies wherever a single embedding would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .training import embed


class RandomAffine:
    """Random affine distortion of each image of a batch (Koch et al., 2015).

    Each image gets its own rotation in ``[-rotation, rotation]`` degrees, shear factor in
    ``[-shear, shear]``, scale in ``[1 - scale, 1 + scale]`` and translation in
    ``[-translate, translate]`` of the image size along each axis, all uniform. Pixels moved in
    from outside the image are zero (Omniglot's background after :func:`deepmetric.data.
    load_omniglot`, which makes ink 1 and paper 0).

    Shapes: ``(N, C, H, W)`` float images -> the same shape and dtype.

    The defaults are the distortions that raised 20-way one-shot accuracy on Omniglot's small
    background sets most in this project's measurements (``deepmetric oneshot``).

    Args:
        rotation: largest rotation, degrees.
        shear: largest horizontal shear factor.
        scale: largest relative change of size.
        translate: largest shift, as a fraction of the image's width or height.
    """

    def __init__(
        self,
        rotation: float = 15.0,
        shear: float = 0.3,
        scale: float = 0.15,
        translate: float = 0.075,
    ) -> None:
        for name, value in (
            ("rotation", rotation),
            ("shear", shear),
            ("scale", scale),
            ("translate", translate),
        ):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"RandomAffine: {name} must be finite and >= 0, got {value}")
        if scale >= 1:
            raise ValueError(f"RandomAffine: scale must be < 1 (a factor 1 ± scale), got {scale}")
        self.rotation = rotation
        self.shear = shear
        self.scale = scale
        self.translate = translate

    def __repr__(self) -> str:
        return (
            f"RandomAffine(rotation={self.rotation}, shear={self.shear}, scale={self.scale}, "
            f"translate={self.translate})"
        )

    def matrices(self, n: int, generator: torch.Generator) -> Tensor:
        """``(n, 2, 3)`` sampling matrices for ``affine_grid`` (output coordinates -> input
        coordinates, in the ``[-1, 1]`` units of ``affine_grid``)."""

        def uniform(limit: float) -> Tensor:
            return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * limit

        angle = uniform(math.radians(self.rotation))
        shear = uniform(self.shear)
        size = 1 + uniform(self.scale)
        shift_x, shift_y = uniform(2 * self.translate), uniform(2 * self.translate)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # rotate, then shear along x, then scale; sampling divides by the size to enlarge
        row_x = torch.stack([cos / size, (cos * shear - sin) / size, shift_x], dim=1)
        row_y = torch.stack([sin / size, (sin * shear + cos) / size, shift_y], dim=1)
        return torch.stack([row_x, row_y], dim=1)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"RandomAffine expects (N, C, H, W) float images, got {tuple(x.shape)} {x.dtype}"
            )
        if len(x) == 0:
            return x
        theta = self.matrices(len(x), generator).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def embed_augmented(
    model: nn.Module,
    x: Tensor,
    augment: RandomAffine,
    copies: int = 16,
    seed: int = 0,
    batch_size: int = 512,
    normalize: bool = True,
) -> Tensor:
    """Test-time augmentation: the mean embedding of each image and ``copies`` random
    distortions of it (``augment``, drawn from a generator seeded with ``seed``: the same call
    gives the same embeddings), L2-normalised again when ``normalize``.

    Shapes: ``(N, C, H, W)`` images -> ``(N, E)`` float32 embeddings on the CPU (the model runs in
    evaluation mode on its own device, in batches of ``batch_size``).
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise ValueError(f"copies must be an int >= 0, got {copies!r}")
    generator = torch.Generator().manual_seed(seed)
    total = embed(model, x, batch_size)
    for _ in range(copies):
        total += embed(model, augment(x, generator), batch_size)
    mean = total / (copies + 1)
    return F.normalize(mean, dim=1) if normalize else mean
