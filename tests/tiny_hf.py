"""The smallest Hugging Face ViT the model and command-line tests build (random weights, saved
to a folder as a local pretrained backbone): one layer, 32 features, 32 px images in 8 px
patches."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_VIT = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=37,
    image_size=32,
    patch_size=8,
)
"""Keyword arguments of ``ViTConfig`` (also a CLIP vision tower's and a DINOv2's)."""


def save_tiny_vit(folder: Path, pooler: bool = True) -> None:
    """Save a random tiny ``ViTModel`` to ``folder``; ``pooler=False`` saves it without the
    pooling layer, as DINO checkpoints are."""
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTModel(transformers.ViTConfig(**TINY_VIT), add_pooling_layer=pooler)
    model.save_pretrained(folder)
