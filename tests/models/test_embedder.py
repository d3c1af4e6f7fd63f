"""The embedder builder (:mod:`deepmetric.models.embedder`): it records how to rebuild the net."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from deepmetric.models import (
    EmbeddingNet,
    InputSpec,
    SmallConvNet,
    build_embedder,
    embedder_from_config,
)

# ---------------------------------------------------------------------------------------------
# The embedder builder


def test_build_embedder_records_how_to_rebuild_it(tmp_path: Path) -> None:
    net = build_embedder(
        "small_cnn", channels=8, blocks=2, embedding_size=6, hidden=(12,), batch_norm=True
    )
    assert isinstance(net, EmbeddingNet) and net.input_spec == InputSpec(1, 28, (0.0,), (1.0,))
    described = net.describe()
    assert json.loads(json.dumps(described)) == described
    assert described["trunk"] == "small_cnn" and described["channels"] == 8
    rebuilt = embedder_from_config(json.loads(json.dumps(described)))
    rebuilt.load_state_dict(net.state_dict())  # strict: the same architecture
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(rebuilt.eval()(x), net.eval()(x))
    assert rebuilt.describe() == described
    # The small CNN embedder is the one the run config built by hand so far, weight for weight.
    torch.manual_seed(3)
    built = build_embedder("small_cnn", channels=8, blocks=2, embedding_size=6, hidden=(12,))
    torch.manual_seed(3)
    by_hand = EmbeddingNet(SmallConvNet(1, 8, 2), 8, 6, hidden=(12,))
    torch.testing.assert_close(built.eval()(x), by_hand.eval()(x))
    with pytest.raises(ValueError, match="built by hand"):
        EmbeddingNet(nn.Flatten(), 4).describe()
    with pytest.raises(ValueError, match="JSON"):
        build_embedder("small_cnn", channels=object())


def test_build_embedder_from_a_weights_file_rebuilds_without_it(tmp_path: Path) -> None:
    path = tmp_path / "trunk.pth"
    torch.save(SmallConvNet(channels=8).state_dict(), path)
    net = build_embedder("small_cnn", channels=8, weights=path, embedding_size=4)
    assert net.describe()["weights"] == str(path)
    path.unlink()  # a run folder rebuilds the architecture without the original file
    rebuilt = embedder_from_config(net.describe())
    rebuilt.load_state_dict(net.state_dict())


def test_hf_embedder_rebuilds_with_random_weights(hf_folders: dict[str, Path]) -> None:
    net = build_embedder(f"hf:{hf_folders['convnext']}", embedding_size=8)
    assert net.trunk_features == 16
    rebuilt = embedder_from_config(net.describe())
    assert set(rebuilt.state_dict()) == set(net.state_dict())
    rebuilt.load_state_dict(net.state_dict())
