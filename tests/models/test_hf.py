"""Hugging Face vision models from a local folder (:mod:`deepmetric.models.hf`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepmetric.models import (
    InputSpec,
    build_backbone,
)
from tests.models.model_cases import _SAVED
from tests.tiny_hf import save_tiny_vit


def _raw_pooled(kind: str, folder: Path, x: torch.Tensor) -> torch.Tensor:
    """The transformers model's own pooled output, loaded independently of deepmetric."""
    import transformers

    cls = transformers.CLIPVisionModel if kind == "clip" else transformers.AutoModel
    model = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=x).pooler_output.flatten(1)


@pytest.mark.parametrize("kind", ["dinov2", "vit", "clip", "convnext", "resnet"])
def test_hf_vision_models_load_from_a_folder(hf_folders: dict[str, Path], kind: str) -> None:
    folder = hf_folders[kind]
    backbone = build_backbone(f"hf:{folder}")
    assert backbone.features == (16 if kind in ("convnext", "resnet") else 32)
    assert backbone.input.channels == 3 and backbone.module.training
    loaded = backbone.module.model.state_dict()
    saved = _SAVED[kind]
    if kind == "clip":  # the vision tower: the full model's "vision_model." keys
        prefix = "vision_model."
        saved = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    assert set(loaded) == set(saved)
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = backbone.module.eval()(x)
    assert out.shape == (2, backbone.features)
    torch.testing.assert_close(out, _raw_pooled(kind, folder, x))


def test_hf_input_spec_from_the_image_processor(hf_folders: dict[str, Path]) -> None:
    folder = hf_folders["dinov2"]
    # Without a processor config: ImageNet statistics at the config's image_size.
    assert build_backbone(f"hf:{folder}").input == InputSpec(
        3, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )
    processor = {
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3],
        "size": {"shortest_edge": 40},
        "crop_size": {"height": 24, "width": 24},
        "do_center_crop": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    try:
        backbone = build_backbone(str(folder))  # a bare folder path works too
        assert backbone.input == InputSpec(3, 24, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
        # DINOv2 interpolates its position embeddings: the crop side runs.
        assert backbone.module(torch.randn(1, 3, 24, 24)).shape == (1, 32)
    finally:
        (folder / "preprocessor_config.json").unlink()


def test_hf_vit_without_pooler_weights_uses_the_cls_token(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    save_tiny_vit(tmp_path, pooler=False)  # how DINO ViT checkpoints are saved
    backbone = build_backbone(f"hf:{tmp_path}")
    reference = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 48, 48)  # another side: position embeddings are interpolated
    with torch.no_grad():
        expected = reference(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(backbone.module.eval()(x), expected[:, 0])


def test_hf_clip_projection(hf_folders: dict[str, Path]) -> None:
    import transformers

    folder = hf_folders["clip"]
    backbone = build_backbone(f"hf:{folder}", projection=True)
    assert backbone.features == 24
    reference = transformers.CLIPVisionModelWithProjection.from_pretrained(
        folder, projection_dim=24
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.module.eval()(x), reference(pixel_values=x).image_embeds
        )


def test_hf_refuses_text_models_and_missing_folders(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        vocab_size=50,
    )
    transformers.BertModel(bert).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"bert.*'bert' model, which is not a vision model"):
        build_backbone(f"hf:{tmp_path / 'bert'}")
    with pytest.raises(ValueError, match="no config.json"):
        build_backbone(f"hf:{tmp_path / 'absent'}")


def test_hf_refuses_grey_input_for_an_rgb_model(hf_folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="takes 3-channel images"):
        build_backbone(f"hf:{hf_folders['vit']}", in_channels=1)
