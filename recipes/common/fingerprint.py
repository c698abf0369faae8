"""Configuration fingerprints: the settings each stage's outputs depend on.

A stage's fingerprint is the flat ``{dotted key: value}`` of every config section except ``run``
(only ``run.seed`` and ``run.bf16`` count), ``sweep`` and ``study``, without the sections of
later stages (``finetune``, ``warmup``, ``bissl``) and without ``data.tasks`` (which targets run,
not what one computes), plus ``implicitbilevel.__version__``. The head warm-up and BiSSL take
from ``finetune`` only what they use: never the retrain seeds, checkpoints or the BiSSL+FT search
switch, and the (lr, wd) search settings only when the warm-up inherits Only-FT's choice
(:func:`choice_fingerprint`, the settings that choice depends on).

The run records of :mod:`recipes.common.records` store a stage's fingerprint with its outputs'
digests; :func:`differences` compares a recorded fingerprint with the current one.
:func:`check` and :func:`stamp` are the older record of a ``study`` cell (written before the cell
runs; see :func:`recipes.common.records.write_record` for one written after its outputs).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import implicitbilevel

from .jsonio import write_json

__all__ = ["ConfigChanged", "changed_keys", "check", "choice_fingerprint", "dependency",
           "differences", "fingerprint", "fingerprint_path", "format_differences",
           "read_fingerprint", "stamp"]

# config sections first read by a later stage (the stage they belong to)
STAGE_SECTIONS = {"finetune": "only-ft", "warmup": "head-warmup", "bissl": "bissl"}
ORDER = ("pretext", "only-ft", "head-warmup", "bissl", "finetune")
RUN_KEYS = ("seed", "bf16")
VERSION = "implicitbilevel.__version__"
# which targets run, not what a stage computes for one
NOT_RESULTS = ("data.tasks",)
# finetune keys only the retrains (and BiSSL+FT) read, never the head warm-up or BiSSL
RETRAIN_ONLY = ("seeds", "save_checkpoints", "search_after_bissl")
# finetune keys Only-FT's (lr, wd) choice may depend on (see _unused_for_choice)
SEARCH = ("search", "search_trials", "lr_range", "wd_range", "lrs", "weight_decays", "lr",
          "weight_decay", "search_epochs", "search_seed", "select", "epochs", "warmup_fraction",
          "patience", "min_epochs")


class ConfigChanged(RuntimeError):
    """A finished or resumed stage, or a stage's input, was produced under a different
    configuration."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _unused_for_choice(ft: dict[str, Any]) -> set[str]:
    """The finetune keys Only-FT's chosen (lr, wd) does not depend on under ``ft``."""
    unused = set(RETRAIN_ONLY)
    if ft.get("search") == "none":
        return unused | (set(SEARCH) - {"search", "lr", "weight_decay"})
    unused |= {"lr", "weight_decay"}
    unused |= {"lrs", "weight_decays"} if ft.get("search") == "random" else {
        "search_trials", "lr_range", "wd_range"}
    if ft.get("search_epochs"):
        unused.add("epochs")
    return unused


def _inherits(tree: dict[str, Any]) -> bool:
    warmup = tree.get("warmup") or {}
    return warmup.get("lr") is None or warmup.get("weight_decay") is None


def fingerprint(cfg: Any, stage: str) -> dict[str, Any]:
    """The flat ``{dotted key: value}`` of what determines ``stage``'s result."""
    tree = asdict(cfg)
    index = ORDER.index(stage)
    kept: dict[str, Any] = {}
    for section, value in tree.items():
        if section in ("sweep", "study"):  # what runs, not what a stage computes
            continue
        if section == "run":
            kept["run"] = {k: value[k] for k in RUN_KEYS if k in value}
            continue
        owner = STAGE_SECTIONS.get(section)
        if owner is not None and ORDER.index(owner) > index:
            continue
        if section == "finetune" and stage in ("head-warmup", "bissl"):
            drop = _unused_for_choice(value) if _inherits(tree) else set(RETRAIN_ONLY + SEARCH)
            value = {k: v for k, v in value.items() if k not in drop}
        kept[section] = value
    flat = {k: v for k, v in _flatten(kept).items() if k not in NOT_RESULTS}
    flat[VERSION] = implicitbilevel.__version__
    # JSON round trip: tuples become lists, as they are read back
    return json.loads(json.dumps(flat, default=str))


def choice_fingerprint(cfg: Any) -> dict[str, Any]:
    """What Only-FT's chosen (lr, wd) depends on: its fingerprint without the retrain-only
    settings and the search settings the configured search does not read."""
    drop = {f"finetune.{k}" for k in _unused_for_choice(asdict(cfg.finetune))}
    return {k: v for k, v in fingerprint(cfg, "only-ft").items() if k not in drop}


def dependency(cfg: Any, stage: str, use: str = "all") -> dict[str, Any]:
    """The settings a consumer of ``stage``'s outputs relies on: all of its fingerprint, or
    (``use="choice"``, only_ft.json read for its (lr, wd)) :func:`choice_fingerprint`."""
    return choice_fingerprint(cfg) if use == "choice" else fingerprint(cfg, stage)


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, current value)`` for every key of ``current`` whose recorded value
    differs (``"<absent>"`` where the record lacks the key); keys only the record holds are no
    dependency now and are left out."""
    out = []
    for key in sorted(current):
        old = recorded.get(key, "<absent>")
        if key not in recorded or old != current[key]:
            out.append((key, old, current[key]))
    return out


def format_differences(diff: list[tuple[str, Any, Any]]) -> list[str]:
    """``key: recorded -> current`` lines."""
    return [f"{k}: {a if a == '<absent>' else repr(a)} -> {b!r}" for k, a, b in diff]


def fingerprint_path(output: Path) -> Path:
    """Where the record of the stage writing ``output`` lives."""
    return output.with_name(output.name + ".config.json")


def read_fingerprint(output: Path) -> dict[str, Any] | None:
    """The recorded fingerprint file of ``output``'s stage (``None`` when none was recorded)."""
    path = fingerprint_path(output)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigChanged(f"{path}: unreadable configuration record ({err}); delete it or "
                            "rerun the stage with --overwrite") from None
    if not isinstance(record, dict):
        raise ConfigChanged(f"{path}: not a configuration record; delete it or rerun the stage "
                            "with --overwrite")
    return record


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a = repr(old[key]) if key in old else "<absent>"
        b = repr(new[key]) if key in new else "<absent>"
        if key not in old or key not in new or old[key] != new[key]:
            out.append(f"{key}: {a} -> {b}")
    return out


def check(output: Path, stage: str, cfg: Any, allow_changed: bool) -> list[str]:
    """Compare ``stage``'s record with ``cfg``; ``ConfigChanged`` listing the keys that differ
    unless ``allow_changed`` (then the differences are returned)."""
    record = read_fingerprint(output)
    if record is None:
        return []
    diff = format_differences(differences(record.get("fingerprint", {}), fingerprint(cfg, stage)))
    if diff and not allow_changed:
        raise ConfigChanged(
            f"{output.parent} stage {stage!r} was run with a different configuration:\n  "
            + "\n  ".join(diff)
            + "\nrestore these values, use another run.out_dir, or pass --allow-changed-config "
            "to continue anyway (recorded in " + fingerprint_path(output).name + ")")
    return diff


def stamp(output: Path, stage: str, cfg: Any, allowed: list[str] | None = None,
          keep: bool = False) -> None:
    """Record ``stage``'s fingerprint next to ``output`` (keeping earlier allowed changes and
    adding ``allowed``, the differences accepted by ``--allow-changed-config``; ``keep``: a
    skipped stage, whose recorded fingerprint stays). Written before the output, this record
    cannot vouch for it: the pipeline's stages use :mod:`recipes.common.records` instead."""
    previous: list[Any] = []
    fp = fingerprint(cfg, stage)
    try:
        record = read_fingerprint(output)
    except ConfigChanged:
        record = None
    if record is not None:
        previous = list(record.get("allowed_changes", []))
        if keep:
            fp = record.get("fingerprint", fp)
    if allowed:
        previous.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": allowed})
    write_json({"stage": stage, "fingerprint": fp,
                "allowed_changes": previous}, fingerprint_path(output))
