"""Typed checking of config values (deepmetric._config): each hint against values of every
plain type YAML can produce, with the accepted set written out independently in the test."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepmetric._config import build_dataclass, check_kwargs, check_value

# every kind of value a YAML document or a --set flag can hand over
yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)


ACCEPTS = {
    int: _is_int,
    float: _is_number,
    bool: lambda v: type(v) is bool,
    str: lambda v: type(v) is str,
    int | None: lambda v: v is None or _is_int(v),
    float | None: lambda v: v is None or _is_number(v),
    list[int]: lambda v: type(v) is list and all(_is_int(x) for x in v),
    dict[str, Any]: lambda v: type(v) is dict,
    Literal["cosine", "step"]: lambda v: v in ("cosine", "step") and type(v) is str,
}


@pytest.mark.parametrize("hint", list(ACCEPTS), ids=str)
@given(value=yaml_values)
def test_check_value_accepts_exactly_the_hinted_values(hint: Any, value: Any) -> None:
    if ACCEPTS[hint](value):
        checked = check_value(hint, value, "train.key")
        assert checked == value
    else:
        with pytest.raises(ValueError, match=r"config key 'train\.key(\[\d+\])?' must be"):
            check_value(hint, value, "train.key")


def test_messages_name_the_key_and_suggest_the_fix() -> None:
    with pytest.raises(ValueError, match=r"'train\.lr' must be a number, got '0\.1' \(a string\)"):
        check_value(float, "0.1", "train.lr")
    with pytest.raises(ValueError, match="without quotes"):
        check_value(float, "0.1", "train.lr")
    with pytest.raises(ValueError, match=r"'train\.epochs' must be an integer, got 1\.5"):
        check_value(int, 1.5, "train.epochs")
    with pytest.raises(ValueError, match=r"'train\.epochs' must be an integer, got True"):
        check_value(int, True, "train.epochs")
    with pytest.raises(ValueError, match="one of cosine, step"):
        check_value(Literal["cosine", "step"], "linear", "train.scheduler")


def test_int_widens_to_float_and_lists_become_tuples() -> None:
    assert check_value(float, 3, "k") == 3.0 and type(check_value(float, 3, "k")) is float
    assert check_value(tuple[int, ...], [1, 2], "k") == (1, 2)


@dataclass
class _Inner:
    size: int = 3
    names: list[str] = field(default_factory=list)


@dataclass
class _Outer:
    epochs: int = 1
    lr: float = 0.1
    inner: _Inner = field(default_factory=_Inner)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


def test_build_dataclass_checks_nested_keys() -> None:
    built = build_dataclass(_Outer, {"epochs": 2, "inner": {"size": 5}}, "")
    assert built == _Outer(epochs=2, inner=_Inner(size=5))
    with pytest.raises(ValueError, match=r"unknown key\(s\) in 'inner': colour \(accepted: size"):
        build_dataclass(_Outer, {"inner": {"colour": 1}}, "")
    with pytest.raises(ValueError, match=r"'inner\.size' must be an integer"):
        build_dataclass(_Outer, {"inner": {"size": "x"}}, "")
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        build_dataclass(_Outer, {"epochs": 0}, "")
    with pytest.raises(ValueError, match="must be a mapping"):
        build_dataclass(_Outer, [1, 2], "")


def _loss(margin: float = 0.1, swap: bool = False) -> None:
    return None


def test_check_kwargs_against_a_signature() -> None:
    check_kwargs(_loss, {"margin": 0.2}, "loss")
    with pytest.raises(ValueError, match=r"'loss\.margin' must be a number, got 'abc'"):
        check_kwargs(_loss, {"margin": "abc"}, "loss")
    with pytest.raises(ValueError, match=r"'loss' has no option 'margn' \(accepted: margin, swap"):
        check_kwargs(_loss, {"margn": 0.2}, "loss")


def test_yaml_reads_exponents_as_numbers_and_quoted_text_as_text() -> None:
    from deepmetric.config import parse_yaml

    values = parse_yaml("lr: 1e-4\nquoted: '1e-4'\nplain: 1.5e3\nwhole: 3\nname: e5")
    assert values == {"lr": 1e-4, "quoted": "1e-4", "plain": 1500.0, "whole": 3, "name": "e5"}
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_yaml("a: [1, 2")


def test_optional_packages_asked_for_are_checked_before_a_run() -> None:
    import importlib.util

    from deepmetric.config import RunConfig

    config = RunConfig.from_dict({"train": {"tensorboard": True}})
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match="tensorboard package is not installed"):
            config.check_optional_packages()
    else:
        config.check_optional_packages()
    RunConfig().check_optional_packages()  # the defaults need no optional package


def _config_keys() -> list[str]:
    import dataclasses

    from deepmetric.config import ModelConfig, RunConfig, TrainConfig

    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("model", "train")]
    keys += [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
    keys += [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)]
    return keys + ["no_such_key", "train.no_such_key"]


@given(assignments=st.dictionaries(st.sampled_from(_config_keys()), yaml_values, max_size=3))
def test_any_config_is_built_or_refused_with_a_value_error_naming_a_key(
    assignments: dict[str, Any],
) -> None:
    """Whatever keys and values a YAML file holds, the config is either built, with every value
    of its declared type, or refused with a ValueError (never a TypeError or a crash later)."""
    from deepmetric.config import RunConfig

    values: dict[str, Any] = {}
    for key, value in assignments.items():
        section, _, name = key.rpartition(".")
        (values.setdefault(section, {}) if section else values)[name] = value
    try:
        config = RunConfig.from_dict(values)
    except ValueError as error:
        assert any(key.rpartition(".")[2] in str(error) for key in assignments) or (
            "needs" in str(error) or "must" in str(error)
        )
        return
    for key, value in assignments.items():
        if key == "train.amp":  # true/false of older configs become auto/none
            continue
        section, _, name = key.rpartition(".")
        got = getattr(getattr(config, section) if section else config, name)
        if isinstance(value, bool) or value is None:
            assert got is value or got == value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            assert got == value
