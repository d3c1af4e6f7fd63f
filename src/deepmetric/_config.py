"""Typed checking of configuration values: every key of a run config, every ``--set`` and every
keyword argument of a loss or miner named in a config is checked against its type hint before
anything runs, and a wrong one is a ``ValueError`` that names the key, the expected type and the
value it got.

YAML and the command line hand over plain values (``bool``, ``int``, ``float``, ``str``, lists,
mappings, ``None``); :func:`check_value` accepts a value only when it already has the hinted type
(an ``int`` where a ``float`` is expected is widened), never by conversion: ``epochs: 1.5`` and
``epochs: true`` are errors, not one epoch, and ``lr: '0.1'`` (a quoted string) is an error that
says to drop the quotes.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union, get_args, get_origin

__all__ = ["build_dataclass", "check_kwargs", "check_value", "describe_type"]


def describe_type(hint: Any) -> str:
    """A reader's name for a type hint: ``int``, ``a number``, ``one of cosine, step, none``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return "any value"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        suffix = " or null" if type(None) in args else ""
        return " or ".join(parts) + suffix
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        inner = describe_type(args[0]) if args else "values"
        return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s"
    if origin in (dict, Mapping) or hint is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _shown(value: Any) -> str:
    kind = type(value).__name__
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if value is None:
        return "null"
    return f"{value!r} ({kind})"


def check_value(hint: Any, value: Any, key: str) -> Any:
    """``value`` if it has the type ``hint`` (``int`` widened to ``float``; lists checked item by
    item; a list given for a tuple becomes a tuple), else a ``ValueError`` naming ``key``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return check_value(option, value, key)
            except ValueError:
                continue
        raise ValueError(_mismatch(key, hint, value))
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ValueError(_mismatch(key, hint, value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(_mismatch(key, hint, value))
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(_mismatch(key, hint, value))
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(_mismatch(key, hint, value))
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(_mismatch(key, hint, value))
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(_mismatch(key, hint, value))
        inner = args[0] if args else Any
        items = [check_value(inner, item, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(_mismatch(key, hint, value))
        value_hint = args[1] if len(args) == 2 else Any
        return {k: check_value(value_hint, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        return build_dataclass(hint, value, key)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise ValueError(_mismatch(key, hint, value))
    return value  # a hint this checker does not model (a Protocol, a Callable): trust it


def _mismatch(key: str, hint: Any, value: Any) -> str:
    message = f"config key '{key}' must be {describe_type(hint)}, got {_shown(value)}"
    if isinstance(value, str) and _looks_numeric(value) and _accepts_number(hint):
        message += f": write {key.rsplit('.', 1)[-1]}: {value} without quotes"
    return message


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _accepts_number(hint: Any) -> bool:
    if hint in (int, float):
        return True
    return any(_accepts_number(a) for a in get_args(hint) if a is not type(None))


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """``cls(**values)`` after checking that ``values`` is a mapping with only ``cls``'s fields,
    each of its hinted type. ``where`` prefixes the keys in messages (``"train"`` gives
    ``'train.epochs'``; ``""`` for the top level). The class's own ``__post_init__`` then checks
    ranges and combinations; its ``ValueError`` and ``TypeError`` are reported under ``where``."""
    label = f"'{where}'" if where else "the config"
    if not isinstance(values, Mapping):
        raise ValueError(f"{label} must be a mapping of keys to values, got {_shown(values)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(k) for k in values if k not in names)
    if unknown:
        place = f"key(s) in '{where}'" if where else "config key(s)"
        raise ValueError(f"unknown {place}: {', '.join(unknown)} (accepted: {', '.join(names)})")
    checked = {
        name: check_value(hints[name], value, f"{where}.{name}" if where else name)
        for name, value in values.items()
    }
    try:
        return cls(**checked)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{label}: {error}" if where else str(error)) from error


def check_kwargs(function: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> None:
    """Check keyword arguments meant for ``function`` (a class: its ``__init__``) against its
    signature and type hints: unknown names and wrongly typed values are ``ValueError`` naming
    ``where.name`` and the accepted names."""
    target = function.__init__ if inspect.isclass(function) else function
    signature = inspect.signature(function)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # hints that do not resolve (a forward reference to a private name)
        hints = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    accepted = [
        name
        for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    for name, value in kwargs.items():
        if name not in accepted:
            if takes_any:
                continue
            raise ValueError(
                f"'{where}' has no option '{name}' (accepted: {', '.join(accepted) or 'none'})"
            )
        if name in hints:
            check_value(hints[name], value, f"{where}.{name}")
