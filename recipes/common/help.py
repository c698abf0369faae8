"""The recipes' ``--help`` and ``--help-config`` texts, in plain text.

A recipe's module docstring doubles as the description of its ``--help``; :func:`plain` strips the
reStructuredText markup it carries for the API pages (an inline literal
becomes its text, a role such as ``:mod:`` its target's name). :func:`stages_help` describes every
command, :func:`config_help` lists every ``--set`` key of a config class with its type, default,
bounds and meaning, read from the pydantic fields, so the list cannot fall behind the configs.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
import types
import typing
from typing import Annotated, Any, Literal

import annotated_types

__all__ = ["SWEEP_TABLES", "config_help", "config_keys", "plain", "stages_help"]

#: The thesis's table of each ``sweep --param`` grid (chapter 6 and appendix F; the grids are in
#: Table 6.2 and the tabulated results in appendix F).
SWEEP_TABLES = {
    "lam": "λ, constant (grid of Table 6.2; results as Table F.1)",
    "alternations": "T, the alternations (Table 6.2; Table F.2)",
    "upper_steps": "N_U, upper steps per alternation (Table 6.2; Table F.3)",
    "lower_steps": "N_L, lower steps per alternation (Table 6.2; Table F.4)",
    "finetune_epochs": "fine-tuning epochs, BiSSL+FT and Only-FT (Table 6.2; Table F.5)",
    "cosine_increase_lam_max": "λ_max of the cosine increase, λ_min = 1e-8 (Table F.6)",
    "cosine_decay_lam_max": "λ_max of the cosine decrease, λ_min = 1e-8 (Table F.6)",
    "exp_lam_max": "λ_max of the exponential increase (Table F.7)",
    "exp_alpha": "α of the exponential increase (Table F.7)",
    "lam_init": "the initial σ(λ) of a learnable λ; --set bissl.lam_damping=0 or 10 "
                "(Table F.8)",
}

_STAGES = [
    ("all", "every stage below in order, then the report (the default)"),
    ("pretext", "self-supervised pretraining of the backbone, or the pretrained weights"),
    ("only-ft", "the Only-FT baseline: (lr, wd) search, then retraining over the seeds"),
    ("head-warmup", "the downstream head trained on the frozen pretrained backbone"),
    ("bissl", "BiSSL (Algorithm 2): alternating lower (pretext) and upper (downstream) steps; "
              "resumable with --resume"),
    ("finetune", "BiSSL+FT: the Only-FT procedure started from the BiSSL backbone"),
    ("report", "results.json, the BiSSL+FT vs Only-FT table (paired t-test) and the plots"),
    ("sweep", "one hyperparameter over a thesis grid (--param NAME, grids in sweep.*): reruns "
              "the stages it affects per value, writes sweep_NAME.json, a table and a plot"),
    ("study", "Only-FT vs BiSSL+FT over the fine-tuning budgets study.epochs, with "
              "study.replicates independent replicates of every stage that differs between the "
              "methods and study.seeds fine-tuning seeds in each; tests over the replicates, "
              "p-values adjusted over every cell (study.correction, Holm by default); writes "
              "study/study.json, .md and .png and continues from finished cells"),
]

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def plain(text: str) -> str:
    """``text`` without reStructuredText markup: roles become their target's (short) name,
    inline literals their text, and ``::`` at a line's end a colon."""
    def role(match: re.Match[str]) -> str:
        target = match.group(1).strip()
        whole = match.group(0)
        return target.rsplit(".", 1)[-1] if "`~" in whole else target

    text = _ROLE.sub(role, text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"(?<=\S)::$", ":", text, flags=re.M)
    return text.replace("\\\\\n", "\\\n")


def _table(rows: list[tuple[str, str]], width: int = 100) -> list[str]:
    """``name  text`` rows, the text wrapped under itself."""
    left = max(len(name) for name, _ in rows) + 4
    return [textwrap.fill(text, width, initial_indent=f"  {name:<{left - 4}}  ",
                          subsequent_indent=" " * left) for name, text in rows]


def stages_help() -> str:
    """Every command with what it does, and every sweep parameter with its grid and table."""
    from .sweep import SWEEPS

    lines = ["commands (STAGE):", *_table(_STAGES), "",
             "sweep --param NAME (thesis chapter 6; the values are the config key sweep.NAME, "
             "or the one named):"]
    lines += _table([(name, SWEEP_TABLES[name] + ("" if sweep.grid == name else
                                                  f"; values: sweep.{sweep.grid}"))
                     for name, sweep in SWEEPS.items()])
    lines += ["", "Every --set KEY=VALUE key, with its default, bounds and meaning: --help-config."]
    return "\n".join(lines)


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """The type under ``Annotated`` and the constraints it carries (pydantic ``FieldInfo``
    metadata included)."""
    found: list[Any] = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        for item in extra:
            found.extend(getattr(item, "metadata", None) or [item])
    return tp, found


_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
           (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="))


def _bounds(constraints: list[Any]) -> list[str]:
    out = []
    for item in constraints:
        for cls, attr, sign in _BOUNDS:
            if isinstance(item, cls):
                out.append(f"{sign} {getattr(item, attr)}")
    return out


def _describe_type(tp: Any, constraints: list[Any]) -> tuple[str, list[str]]:
    """A type's short name (``float``, ``list[int]``, ``one of a|b``) and its bounds."""
    tp, more = _unwrap(tp)
    bounds = _bounds(constraints + more)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args), bounds
    if origin in (typing.Union, types.UnionType):
        named = [_describe_type(a, []) for a in args if a is not type(None)]
        inner = " or ".join(name for name, _ in named)
        bounds += [b for _, bs in named for b in bs]
        return (f"{inner} or null" if type(None) in args else inner), bounds
    if origin is list:
        name, each = _describe_type(args[0] if args else Any, [])
        return f"list[{name}]", bounds + [f"each {b}" for b in each]
    return getattr(tp, "__name__", str(tp)), bounds


def config_keys(cls: type) -> list[dict[str, Any]]:
    """Every leaf key of the config dataclass ``cls`` (dotted), in declaration order, with its
    type, default (the value of ``cls()``), bounds and description; the block docstrings too."""
    from .config import from_dict

    instance = from_dict(cls, {})
    return _keys(type(instance), instance, "")


def _keys(cls: type, instance: Any, prefix: str) -> list[dict[str, Any]]:
    fields = getattr(cls, "__pydantic_fields__", {})
    out: list[dict[str, Any]] = []
    for f in dataclasses.fields(instance):
        info = fields.get(f.name)
        value = getattr(instance, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            doc = " ".join((type(value).__doc__ or "").split("\n\n")[0].split())
            out.append({"block": key, "doc": plain(doc)})
            out.extend(_keys(type(value), value, key + "."))
            continue
        annotation = info.annotation if info is not None else f.type
        type_name, bounds = _describe_type(annotation, list(info.metadata) if info else [])
        out.append({"key": key, "type": type_name, "default": value, "bounds": bounds,
                    "doc": plain(info.description or "") if info is not None else ""})
    return out


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    return str(value)


def config_help(cls: type, loaded: Any = None, config_name: str = "") -> str:
    """The ``--help-config`` text: every key of ``cls`` with ``type, default, bounds`` and its
    meaning; where ``loaded`` (the config ``--config`` gives) sets another value, that value."""
    lines = ["Every key --set KEY=VALUE takes (VALUE is YAML: 0.01, true, [1, 2], null).",
             "Format: KEY  TYPE  default VALUE  [BOUNDS]  meaning"
             + (f"; '{config_name}:' the value --config sets where it differs" if loaded
                is not None else ""), ""]
    for entry in config_keys(cls):
        if "block" in entry:
            lines.append(f"[{entry['block']}] {entry['doc']}".rstrip())
            continue
        parts = [f"  {entry['key']}  {entry['type']}  default {_show(entry['default'])}"]
        if entry["bounds"]:
            parts.append(f"  [{', '.join(entry['bounds'])}]")
        if entry["doc"]:
            parts.append(f"  {entry['doc']}")
        if loaded is not None:
            current: Any = loaded
            for part in entry["key"].split("."):
                current = getattr(current, part)
            if current != entry["default"]:
                parts.append(f"  ({config_name}: {_show(current)})")
        lines.append("".join(parts))
    return "\n".join(lines)
