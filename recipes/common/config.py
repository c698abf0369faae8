"""Typed configs: dataclasses loaded from YAML with unknown keys and out-of-range values rejected.

A config is a (possibly nested) dataclass. Bounds and choices live in field metadata, written with
:func:`field`::

    @dataclass
    class Optim:
        lr: float = field(0.1, gt=0)
        schedule: str = field("cosine", choices=("cosine", "constant"))

    @dataclass
    class Config:
        optim: Optim = field(default_factory=Optim)
        epochs: int = field(10, ge=1)

    cfg = load_config("run.yaml", Config, overrides=["optim.lr=0.05"])

Every error names the offending key by its dotted path (``optim.lr``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigError", "config_to_dict", "field", "from_dict", "load_config", "parse_overrides"]

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key."""


def field(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with bounds (``ge``/``gt``/``le``/``lt``) or allowed ``choices``.

    Bounds apply to numbers and to every element of a list of numbers.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "doc": doc}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _check_bounds(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for name, ok, sym in (
            ("ge", lambda a, b: a >= b, ">="),
            ("gt", lambda a, b: a > b, ">"),
            ("le", lambda a, b: a <= b, "<="),
            ("lt", lambda a, b: a < b, "<"),
        ):
            bound = meta.get(name)
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"{key}: {v!r} is out of range (must be {sym} {bound})")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where YAML is ambiguous
    (``1e-3`` loads as a string; an int is accepted for a float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches no type")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        else:
            number = float(value)
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping; unknown keys, wrong types and out-of-range
    values raise :class:`ConfigError` naming the key. Missing keys take the field defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key {prefix + str(unknown[0])!r} (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in data:
            value = _coerce(key, data[name], hints[name])
        elif f.default is not _MISSING:
            value = f.default
        elif f.default_factory is not _MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(f"missing required key {key!r}")
        _check_bounds(key, value, f.metadata)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # cross-field checks in __post_init__
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{prefix}{err}" if prefix else str(err)) from err


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (for ``results.json`` and YAML dumps)."""
    return dataclasses.asdict(cfg)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from the YAML file ``path`` (``None``: the defaults), then apply
    ``key.sub=value`` overrides. Uses ``yaml.safe_load``; raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = dict(loaded or {})
    data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data)
