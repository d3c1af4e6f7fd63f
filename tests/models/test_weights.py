"""Trunk weights from local files (:mod:`deepmetric.models.weights`): key maps, mismatches, no
unpickling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deepmetric.models import (
    SmallConvNet,
    build_backbone,
)

# ---------------------------------------------------------------------------------------------
# Weights from local files


def _foreign_checkpoint(net: nn.Module) -> dict[str, torch.Tensor]:
    """What other code saves: DataParallel's "module." prefix, a "backbone." trunk, and a
    classifier the trunk has no use for."""
    state = {f"module.backbone.{k}": v.clone() for k, v in net.state_dict().items()}
    state["module.fc.weight"] = torch.randn(10, 16)
    state["module.fc.bias"] = torch.randn(10)
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_load_with_key_map_and_skip_the_classifier(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    source = SmallConvNet(channels=16, blocks=2)
    for m in source.modules():  # non-default running statistics, so the copy is checked too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    path = tmp_path / f"ckpt{suffix}"
    state = _foreign_checkpoint(source)
    if suffix == ".pth":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    with pytest.warns(UserWarning, match="skipped 2 classifier tensors.*fc.weight"):
        backbone = build_backbone(
            "small_cnn",
            channels=16,
            blocks=2,
            weights=path,
            key_map={"module.": "", "backbone.": ""},
        )
    loaded = backbone.module.state_dict()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_mismatched_weights_name_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(SmallConvNet(channels=16, blocks=3).state_dict(), path)
    with pytest.raises(ValueError, match="missing from the file: blocks.3.0.weight"):
        build_backbone("small_cnn", channels=16, blocks=4, weights=path)
    with pytest.raises(ValueError, match="not in the model: blocks.2.0.weight"):
        build_backbone("small_cnn", channels=16, blocks=2, weights=path)
    with pytest.raises(ValueError, match=r"shapes differ.*blocks.0.0.weight \(16, 1, 3, 3\)"):
        build_backbone("small_cnn", channels=8, blocks=3, weights=path)
    prefixed = tmp_path / "prefixed.pth"
    state = SmallConvNet(channels=16, blocks=3).state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    with pytest.raises(ValueError, match='try key_map=\\{"module.": ""\\}'):
        build_backbone("small_cnn", channels=16, blocks=3, weights=prefixed)


def test_weights_never_unpickle_code_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": SmallConvNet().state_dict(), "opt": torch.optim.SGD}, path)
    with pytest.raises(ValueError, match="weights-only"):
        build_backbone("small_cnn", weights=path)
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        build_backbone("small_cnn", weights=tmp_path / "w.npz")
    with pytest.raises(ValueError, match="not found"):
        build_backbone("small_cnn", weights=tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="key_map applies to a weights file"):
        build_backbone("small_cnn", key_map={"module.": ""})
