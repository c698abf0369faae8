"""Typed configs: pydantic dataclasses read from YAML (``--config``) and ``--set key=value``.

A config is a (possibly nested) dataclass made with :func:`config_block` (a pydantic dataclass
that refuses unknown keys); bounds are ``Field`` constraints and choices ``Literal`` types::

    @config_block
    class Optim:
        lr: Float = Field(0.1, gt=0)
        schedule: Literal["cosine", "constant"] = "cosine"

    @config_block
    class Config:
        optim: Optim = Field(default_factory=Optim)
        epochs: Int = Field(10, ge=1)

    cfg = load_config("run.yaml", Config, overrides=["optim.lr=0.05"])

:data:`Int`, :data:`Bool` and :data:`Str` take only their own type; :data:`Float` takes a number
or a numeric string (PyYAML reads ``1e-3`` as a string), never a bool or a non-finite value;
:data:`PositiveFloats`, :data:`NonNegativeFloats`, :data:`Counts` (>= 1) and :data:`Seeds` (>= 0)
are lists bounded element by element.
Every error is a :class:`ConfigError` naming the offending key by its dotted path (``optim.lr``).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, StrictBool, StrictStr

__all__ = ["CONFIG", "FROM_CONFIG", "Bool", "ConfigError", "Counts", "Float", "Int",
           "NonNegativeFloats",
           "PositiveFloats", "Seeds", "Str", "config_block", "config_to_dict", "field",
           "from_dict", "load_config", "parse_overrides"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key."""


def _number(value: Any) -> Any:
    """YAML's numeric strings (``1e-3``) and ints as floats; anything else as it came."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


Float = Annotated[float, Strict(), Field(allow_inf_nan=False), BeforeValidator(_number)]
Int = Annotated[int, Strict()]
Bool = StrictBool
Str = StrictStr
PositiveFloats = list[Annotated[Float, Field(gt=0.0)]]
NonNegativeFloats = list[Annotated[Float, Field(ge=0.0)]]
Counts = list[Annotated[Int, Field(ge=1)]]
Seeds = list[Annotated[Int, Field(ge=0)]]
CONFIG = ConfigDict(extra="forbid")
FROM_CONFIG = "from_config"
"""Key of the validation context set by :func:`from_dict`: a validator may check more of a config
read from the user than of a block built in Python (``info.context``)."""


def config_block(cls: type[T]) -> type[T]:
    """``cls`` as a pydantic dataclass with :data:`CONFIG` (unknown keys refused)."""
    return pydantic.dataclasses.dataclass(cls, config=CONFIG)  # type: ignore[return-value]


def field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
          ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, choices: Sequence[Any] | None = None, doc: str = "") -> Any:
    """A field of a *plain* dataclass config, with bounds (on a number or on each element of a
    list) or allowed ``choices``; :func:`load_config` checks them through pydantic."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict, set)):
        value, default = default, dataclasses.MISSING

        def default_factory() -> Any:
            return type(value)(value)

    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


_SCALARS = {float: Float, int: Int, bool: Bool, str: Str}


def _field_type(tp: Any, meta: Mapping[str, Any]) -> Any:
    """The pydantic type of a plain-dataclass field: :func:`field`'s metadata as constraints."""
    if meta.get("choices") is not None:
        return Literal[tuple(meta["choices"])]  # type: ignore[valid-type]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(a if a is type(None) else _field_type(a, meta)  # noqa: UP007
                                  for a in args)]
    if origin is list or tp is list:
        return list[_field_type(args[0] if args else Any, meta)]  # type: ignore[misc]
    if dataclasses.is_dataclass(tp):
        return _pydantic(tp)
    bounds = {k: meta[k] for k in ("ge", "gt", "le", "lt") if meta.get(k) is not None}
    tp = _SCALARS.get(tp, tp)
    return Annotated[tp, Field(**bounds)] if bounds else tp


@functools.cache
def _pydantic(cls: type) -> type:
    """``cls``, or for a plain dataclass a pydantic subclass with its fields' constraints."""
    if pydantic.dataclasses.is_pydantic_dataclass(cls):
        return cls
    hints = typing.get_type_hints(cls)
    specs = [(f.name, _field_type(hints[f.name], f.metadata),
              dataclasses.field(default=f.default, default_factory=f.default_factory))
             for f in dataclasses.fields(cls)]
    return config_block(dataclasses.make_dataclass(cls.__name__, specs, bases=(cls,)))


def _bare(tp: Any) -> Any:
    """``tp`` without ``Annotated`` and ``| None``."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]
            continue
        return tp


def _type_at(cls: type, loc: tuple[Any, ...]) -> Any:
    """The declared type at the error location ``loc`` below ``cls``."""
    tp: Any = cls
    for part in loc:
        tp = _bare(tp)
        if isinstance(part, int):
            tp = (typing.get_args(tp) or (Any,))[0]
        elif dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp, include_extras=True).get(part, Any)
        else:
            return Any
    return _bare(tp)


def _dotted(loc: Sequence[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


_RANGE = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
          "less_than_equal": "<="}
_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "bool_type": "true/false", "bool_parsing": "true/false", "float_type": "a number",
             "float_parsing": "a number", "finite_number": "a finite number",
             "string_type": "a string", "list_type": "a list", "dataclass_type": "a mapping",
             "dict_type": "a mapping"}


def _message(cls: type, error: Any) -> str:
    """One pydantic error as ``key: what is wrong``."""
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    key = _dotted(loc)
    if kind in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key"):
        parent = _dotted(loc[:-1])
        known = ", ".join(sorted(f.name for f in dataclasses.fields(_type_at(cls, loc[:-1]))))
        name = f"{parent}.{loc[-1]}" if parent else str(loc[-1])
        return f"unknown key {name!r} (known here: {known})"
    if kind in ("missing", "missing_argument"):
        return f"missing required key {key!r}"
    if kind in _RANGE:
        if _type_at(cls, loc) is float and not isinstance(value, bool):
            value = float(value)
        while loc and isinstance(loc[-1], int):  # a list's bounds hold for each element
            loc = loc[:-1]
        bound = next(iter(error["ctx"].values()))
        return f"{_dotted(loc)}: {value!r} is out of range (must be {_RANGE[kind]} {bound})"
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of {list(typing.get_args(_type_at(cls, loc)))}"
    if kind in ("value_error", "assertion_error"):  # a validator's message
        reason = str(error["ctx"]["error"])
        if not key or reason.startswith(key):
            return reason
        return f"{key}.{reason}" if dataclasses.is_dataclass(_type_at(cls, loc)) else \
            f"{key}: {reason}"
    if kind in _EXPECTED:
        got = type(value).__name__ if _EXPECTED[kind] in ("a list", "a mapping") else repr(value)
        return f"{key or 'config'}: expected {_EXPECTED[kind]}, got {got}"
    if kind == "too_short":
        return f"{key}: needs at least {error['ctx']['min_length']} value(s), got {value!r}"
    return f"{key or 'config'}: {error['msg']} (got {value!r})"


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(_pydantic(cls))


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build the dataclass ``cls`` from a mapping; missing keys take the defaults. Unknown keys,
    wrong types and out-of-range values raise :class:`ConfigError` naming each key."""
    try:
        return _adapter(cls).validate_python(data, context={FROM_CONFIG: True})
    except pydantic.ValidationError as err:
        target = _pydantic(cls)
        raise ConfigError("\n".join(_message(target, e) for e in err.errors())) from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-dict form of a config (for ``results.json`` and the fingerprints)."""
    return dataclasses.asdict(cfg)


def _value(item: str, raw: str) -> Any:
    """The YAML value of the override ``item``; a ``#`` never starts a comment here."""
    try:
        node = yaml.compose(raw, Loader=yaml.SafeLoader)
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem})") from None
    if raw[node.end_mark.index if node is not None else 0:].strip().startswith("#"):
        if node is None or (isinstance(node, yaml.ScalarNode) and node.style is None):
            return raw.strip()  # plain text: the '#' and what follows are part of it
        raise ConfigError(f"--set {item!r}: the '#' after the value would start a YAML comment; "
                          "quote the text that holds it, or drop it")
    return value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML, except that
    plain text keeps a ``#`` (``run.out_dir=runs/a #b`` sets ``runs/a #b``)."""
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
        node[parts[-1]] = _value(item, raw)
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte "
                          f"{err.object[err.start]:#04x} at offset {err.start}); --config takes "
                          "a YAML file") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if loaded is not None and not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return dict(loaded or {})


def load_config(path: str | Path | None, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from the YAML file ``path`` (``None``: the defaults), then apply
    ``key.sub=value`` overrides. Uses ``yaml.safe_load``; raises :class:`ConfigError`."""
    data = {} if path is None else _read_yaml(Path(path))
    return from_dict(cls, _merge(data, parse_overrides(overrides)))
