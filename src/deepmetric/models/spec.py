"""What a trunk must be fed: :class:`InputSpec`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: ImageNet channel statistics of RGB pixels in [0, 1]: the normalisation of most torchvision,
#: timm and ``transformers`` checkpoints.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """The images a trunk expects, for the data pipeline to produce.

    Pixels are read as floats in ``[0, 1]``, converted to ``channels`` (1 = grey, 3 = RGB),
    brought to ``size`` × ``size`` (the side the trunk was trained at; most trunks accept other
    sides too), then normalised per channel: ``(x - mean[c]) / std[c]``. ``mean`` and ``std``
    have one entry per channel.

    Attributes:
        channels: 1 or 3.
        size: default input side in pixels.
        mean, std: per-channel normalisation of ``[0, 1]`` pixels (``std > 0``).
    """

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"InputSpec.channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if int(self.size) < 1:
            raise ValueError(f"InputSpec.size must be a positive number of pixels, got {self.size}")
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if len(mean) != self.channels or len(std) != self.channels:
            raise ValueError(
                f"InputSpec mean and std need one value per channel ({self.channels}), "
                f"got mean={mean} and std={std}"
            )
        if min(std) <= 0:
            raise ValueError(f"InputSpec.std must be positive, got {std}")
        # Frozen dataclass: normalise the field types through object.__setattr__.
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists for the tuples)."""
        return {
            "channels": self.channels,
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict`."""
        unknown = set(values) - {"channels", "size", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown InputSpec keys {sorted(unknown)}")
        return cls(
            channels=int(values["channels"]),
            size=int(values["size"]),
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
        )


def imagenet_spec(size: int = 224) -> InputSpec:
    """RGB at ``size`` px with ImageNet normalisation."""
    return InputSpec(3, size, IMAGENET_MEAN, IMAGENET_STD)
