"""What a trunk is fed (:mod:`deepmetric.models.spec`): InputSpec checks, JSON and overrides."""

from __future__ import annotations

import json

import pytest

from deepmetric.models import (
    InputSpec,
    build_backbone,
)

# ---------------------------------------------------------------------------------------------
# InputSpec and the built-in small CNN


def test_input_spec_validates_and_round_trips_through_json() -> None:
    spec = InputSpec(3, 224, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3"):
        InputSpec(2, 28, (0.0, 0.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="one value per channel"):
        InputSpec(3, 28, (0.0,), (1.0,))
    with pytest.raises(ValueError, match="positive"):
        InputSpec(1, 28, (0.0,), (0.0,))


def test_input_spec_overrides_apply_to_any_trunk() -> None:
    backbone = build_backbone("small_cnn", input_size=56, mean=[0.5], std=[0.25])
    assert backbone.input == InputSpec(1, 56, (0.5,), (0.25,))
