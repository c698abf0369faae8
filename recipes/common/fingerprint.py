"""Configuration fingerprints: what each stage of a run folder was computed with.

Each stage records, next to its output (``<output>.config.json``), the configuration that
determines its result: every config section except ``run`` (only ``run.seed`` and ``run.bf16``
count), ``sweep`` and ``study``, without the sections of later stages (``finetune``, ``warmup``,
``bissl``), plus ``implicitbilevel.__version__``. ``--resume`` compares it with the current
configuration and stops on a difference unless ``--allow-changed-config`` is given (recorded in
the file).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import implicitbilevel

from .report import write_json

__all__ = ["ConfigChanged", "changed_keys", "check", "fingerprint", "fingerprint_path",
           "read_fingerprint", "stamp"]

# config sections first read by a later stage (the stage they belong to)
STAGE_SECTIONS = {"finetune": "only-ft", "warmup": "head-warmup", "bissl": "bissl"}
ORDER = ("pretext", "only-ft", "head-warmup", "bissl", "finetune")
RUN_KEYS = ("seed", "bf16")


class ConfigChanged(RuntimeError):
    """A finished or resumed stage was produced under a different configuration."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


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
        kept[section] = value
    flat = _flatten(kept)
    flat["implicitbilevel.__version__"] = implicitbilevel.__version__
    # JSON round trip: tuples become lists, as they are read back
    return json.loads(json.dumps(flat, default=str))


def fingerprint_path(output: Path) -> Path:
    """Where the fingerprint of the stage writing ``output`` lives."""
    return output.with_name(output.name + ".config.json")


def read_fingerprint(output: Path) -> dict[str, Any] | None:
    """The recorded fingerprint file of ``output``'s stage (``None`` when none was recorded)."""
    path = fingerprint_path(output)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigChanged(f"{path}: unreadable configuration record ({err}); delete it or "
                            "rerun the stage with --overwrite") from None


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
    diff = changed_keys(record.get("fingerprint", {}), fingerprint(cfg, stage))
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
    skipped stage, whose recorded fingerprint stays)."""
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
