"""Embedding networks: a trunk (any ``nn.Module``) followed by an embedding head.

* :class:`EmbeddingNet` — trunk + linear or MLP head (optional BatchNorm) + optional L2
  normalisation. This is what losses, the trainer and the index consume.
* :class:`SmallConvNet` — a compact 4-block CNN trunk for small grey images (Omniglot at 28×28,
  digits at 8×8) that trains in minutes on two CPU cores.
* :class:`SiameseNetwork`, :class:`TripletNetwork` — one shared set of weights applied to two
  or three inputs, for code that thinks in pairs (Hadsell et al., 2006) or triplets (FaceNet,
  Schroff et al., 2015).

Pretrained trunks (EfficientNet-Lite0, torchvision, timm, Hugging Face ``transformers``, any
factory) are built by :mod:`deepmetric.models.backbones`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .spec import InputSpec


class SmallConvNet(nn.Module):
    """A compact CNN trunk: ``blocks`` × (3×3 conv, BatchNorm, ReLU, 2×2 max-pool), then global
    average pooling. The convolutions have no bias: BatchNorm's shift would cancel it (its true
    gradient is zero, and Adam would turn the rounding noise in it into full-size steps). The
    classic few-shot backbone (Vinyals et al., 2016; Snell et al., 2017).

    Pooling stops once the feature map is 1×1, so any input size from 8×8 up works.

    Shapes: ``(N, in_channels, H, W)`` -> ``(N, channels)``; ``out_features == channels``.
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, blocks: int = 4) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers.append(
                nn.Sequential(
                    nn.Conv2d(
                        in_channels if i == 0 else channels, channels, 3, padding=1, bias=False
                    ),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                )
            )
        self.blocks = nn.ModuleList(layers)
        self.out_features = channels

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(
                f"SmallConvNet expects (N, C, H, W) images, got shape {tuple(x.shape)}"
            )
        for block in self.blocks:
            x = block(x)
            if min(x.shape[-2:]) >= 2:
                x = F.max_pool2d(x, 2)
        return x.mean(dim=(-2, -1))


class EmbeddingNet(nn.Module):
    """Trunk + embedding head (+ optional L2 normalisation).

    Args:
        trunk: any module mapping inputs to ``(N, trunk_features)`` (flattened if it returns more
            dimensions).
        trunk_features: width of the trunk's output.
        embedding_size: width of the embedding.
        hidden: widths of hidden layers of an MLP head (``()`` = one linear layer).
        batch_norm: BatchNorm1d after each hidden layer and on the embedding.
        normalize: L2-normalise the embedding (then Euclidean and cosine rank alike).

        input_spec: what the trunk must be fed (channels, side, mean/std); :func:`build_embedder`
            fills it from the backbone, so the data pipeline can read it from the model.

    Shapes: ``(N, ...)`` -> ``(N, embedding_size)``. ``features(x)`` gives the trunk output and
    ``embed_features(f)`` the head alone, which HDML uses to re-embed synthetic features.

    ``model.trunk`` and ``model.head`` are the two parameter groups of fine-tuning (the trunk at a
    lower learning rate). ``describe()`` returns how :func:`build_embedder` built the model.
    """

    def __init__(
        self,
        trunk: nn.Module,
        trunk_features: int,
        embedding_size: int = 128,
        hidden: tuple[int, ...] = (),
        batch_norm: bool = False,
        normalize: bool = True,
        *,
        input_spec: InputSpec | None = None,
    ) -> None:
        super().__init__()
        if trunk_features < 1 or embedding_size < 1:
            raise ValueError("trunk_features and embedding_size must be positive")
        self.trunk = trunk
        layers: list[nn.Module] = []
        width = trunk_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU(inplace=True))
            width = h
        layers.append(nn.Linear(width, embedding_size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(embedding_size))
        self.head = nn.Sequential(*layers)
        self.trunk_features = trunk_features
        self.embedding_size = embedding_size
        self.normalize = normalize
        self.input_spec = input_spec
        # Set by build_embedder: the JSON-safe arguments that rebuild this architecture.
        self.build_config: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """The JSON-safe keyword arguments of :func:`build_embedder` that rebuild this
        architecture (``build_embedder(**net.describe())``); raises ``ValueError`` for a net
        built by hand, whose trunk cannot be named."""
        if self.build_config is None:
            raise ValueError(
                "this EmbeddingNet was built by hand, not by build_embedder, so how to rebuild "
                "its trunk is unknown; build it with deepmetric.models.build_embedder(...)"
            )
        return copy.deepcopy(self.build_config)

    def features(self, x: Tensor) -> Tensor:
        """Trunk output, flattened to ``(N, trunk_features)``."""
        return self.trunk(x).flatten(1)

    def embed_features(self, features: Tensor) -> Tensor:
        """Head (+ normalisation) applied to trunk features ``(N, trunk_features)``."""
        out = self.head(features)
        return F.normalize(out, dim=1) if self.normalize else out

    def forward(self, x: Tensor) -> Tensor:
        return self.embed_features(self.features(x))


class SiameseNetwork(nn.Module):
    """Apply one embedder (shared weights) to two inputs: ``(x1, x2) -> (e1, e2)``.

    Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an Invariant Mapping", 2006.
    The two batches run through the embedder together, so BatchNorm sees one batch.
    """

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        e = self.embedder(torch.cat([x1, x2]))
        return e[: len(x1)], e[len(x1) :]


class TripletNetwork(nn.Module):
    """Apply one embedder (shared weights) to anchors, positives and negatives.

    Schroff, Kalenichenko & Philbin, "FaceNet", 2015. ``(a, p, n) -> (e_a, e_p, e_n)``.
    """

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> tuple[Tensor, ...]:
        e = self.embedder(torch.cat([anchor, positive, negative]))
        sizes = [len(anchor), len(positive), len(negative)]
        return tuple(e.split(sizes))
