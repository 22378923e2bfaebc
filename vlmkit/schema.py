"""Dataclasses from plain mappings (YAML, JSON), checked against their type annotations.

`build(cls, data, where)` is how both config layers read their files: the run config
(vlmkit/config.py, YAML) and the model config (vlmkit/models/config.py, a checkpoint's
config.json). Unknown keys and wrong types fail with the dotted path of the offending field
(`stages.0.steps`, `llm.hidden_size`); nested dataclasses, Literal, Optional / unions, list,
tuple and dict annotations are followed. Range checks stay in each dataclass's `__post_init__`;
`require_at_least` words the most common of them the same way everywhere.

Standard library only, so that every layer (models/ included) can use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterable, Literal

from vlmkit.errors import ConfigError


def build(cls, data: Any, where: str = ""):
    """Build dataclass `cls` from a mapping (None: every default); `where` is the dotted path of
    `data` in the whole file ("" at the top), so errors name e.g. `llm.hidden_size`."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(_join(where, k) for k in unknown)}; "
                          f"valid keys of {label} are {sorted(fields)}")
    kwargs = {k: _convert(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a range check of __post_init__: say where the section is
        msg = str(e)
        raise ConfigError(msg if not where or msg.startswith(where) else f"{where}: {msg}") from None


def require_at_least(obj, names: Iterable[str], minimum: int, where: str = "") -> None:
    """ConfigError for the first field of `obj` among `names` below `minimum`; `where` is the
    message's prefix (`world.`, `stage 'sft': `)."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            raise ConfigError(f"{where}{name} must be >= {minimum}, got {value}")


# ---------------------------------------------------------------------------------------------


def _convert(value: Any, tp, where: str) -> Any:
    """`value` checked against the annotation `tp`, with nested dataclasses built."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (list, tuple):
        return _convert_sequence(value, tp, where)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        value_type = args[1] if args else Any
        return {str(k): _convert(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp in _SCALARS:
        return _SCALARS[tp](value, where)
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _type_name(tp) -> str:
    """`int`, `tuple[float, float]`, `Literal['a', 'b']`: an annotation as a reader writes it."""
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert_union(value: Any, tp, where: str) -> Any:
    """The first member of the union that accepts `value` (None where the union allows it)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")


def _convert_sequence(value: Any, tp, where: str) -> list | tuple:
    """list[T], tuple[T, ...] (any length) or tuple[A, B] (exactly those items)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    fixed = origin is tuple and args and args[-1] is not Ellipsis
    item_types = args if fixed else (args[:1] or (Any,)) * len(value)
    if len(item_types) != len(value):
        raise ConfigError(f"{where}: expected {len(item_types)} values, got {len(value)}")
    items = [_convert(v, t, f"{where}.{i}") for i, (v, t) in enumerate(zip(value, item_types))]
    return tuple(items) if origin is tuple else items


def _as_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    return value


def _as_float(value: Any, where: str) -> float:
    # YAML 1.1 reads `1e-3` (no dot) as a string: accept numeric strings for float fields.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _as_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    return value


_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}
