"""Tiny random Hugging Face models saved to folders, shared by the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models.model_cases import _SAVED
from tests.tiny_hf import TINY_VIT

# ---------------------------------------------------------------------------------------------
# Hugging Face transformers vision models from a local folder


def _tiny_hf_models() -> dict[str, object]:
    transformers = pytest.importorskip("transformers")
    vit = TINY_VIT
    return {
        "dinov2": transformers.Dinov2Model(transformers.Dinov2Config(**vit)),
        "vit": transformers.ViTModel(transformers.ViTConfig(**vit)),
        "clip": transformers.CLIPModel(
            transformers.CLIPConfig(
                text_config=dict(
                    hidden_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=20,
                    vocab_size=50,
                    bos_token_id=0,
                    eos_token_id=1,
                    pad_token_id=1,
                    max_position_embeddings=16,
                ),
                vision_config=vit,
                projection_dim=24,
            )
        ),
        "convnext": transformers.ConvNextModel(
            transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
        ),
        "resnet": transformers.ResNetModel(
            transformers.ResNetConfig(
                embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
            )
        ),
    }


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models saved to folders; ``_SAVED`` keeps the weights that were saved."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    folders = {}
    for kind, model in _tiny_hf_models().items():
        folders[kind] = root / kind
        model.save_pretrained(folders[kind])  # type: ignore[attr-defined]
        _SAVED[kind] = {k: v.clone() for k, v in model.state_dict().items()}  # type: ignore[attr-defined]
    return folders
