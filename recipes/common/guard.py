"""Guards on a run directory: configuration fingerprints per stage and the run lock.

Each stage records, next to its output (``<output>.config.json``), the configuration that
determines its result: every config section except ``run`` (only ``run.seed`` and ``run.bf16``
count), ``sweep`` and ``study``, without the sections of later stages (``finetune``, ``warmup``,
``bissl``), plus ``implicitbilevel.__version__``. ``--resume`` compares it with the current
configuration and stops on a difference unless ``--allow-changed-config`` is given (recorded in
the file). While a command runs, ``run.out_dir`` holds ``.lock`` (pid, host, start time).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import implicitbilevel

from .report import write_json

__all__ = ["ConfigChanged", "NonFiniteStage", "RunLock", "RunLocked", "changed_keys",
           "check_loss", "check_weights", "fingerprint", "fingerprint_path", "read_fingerprint",
           "stamp"]

# config sections first read by a later stage (the stage they belong to)
STAGE_SECTIONS = {"finetune": "only-ft", "warmup": "head-warmup", "bissl": "bissl"}
ORDER = ("pretext", "only-ft", "head-warmup", "bissl", "finetune")
RUN_KEYS = ("seed", "bf16")


class ConfigChanged(RuntimeError):
    """A finished or resumed stage was produced under a different configuration."""


class RunLocked(RuntimeError):
    """Another command is running on the same ``run.out_dir``."""


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``out_dir/.lock`` while a command runs: a second command stops at once naming the holder;
    the lock of a dead process (on this host) is taken over with a warning."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / ".lock"
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "start": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    held = json.loads(self.path.read_text())
                    pid, host = int(held["pid"]), str(held["host"])
                except (OSError, ValueError, KeyError, TypeError):
                    held, pid, host = {}, -1, info["host"]
                if host == info["host"] and (pid <= 0 or not _alive(pid)):
                    warnings.warn(f"{self.path}: taking over the stale lock of process {pid} "
                                  f"(started {held.get('start', '?')}), which is not running",
                                  stacklevel=2)
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLocked(f"{self.path.parent} is in use by process {pid} on {host} "
                                f"(started {held.get('start', '?')}); wait for it to finish or "
                                f"use another run.out_dir") from None
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return self
        raise RunLocked(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class NonFiniteStage(FloatingPointError):
    """A stage met a NaN/inf loss or weight; nothing non-finite was saved."""


def check_loss(stage: str, where: str, value: float) -> None:
    """``NonFiniteStage`` naming ``stage``, ``where`` (epoch/step) and the loss when ``value`` is
    NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteStage(f"stage {stage!r}: the training loss is {value} at {where}; "
                             "nothing was saved (lower the learning rate?)")


def check_weights(stage: str, state: Mapping[str, Any], what: str = "weights") -> None:
    """``NonFiniteStage`` naming ``stage`` and the first non-finite tensor of ``state``."""
    for name, tensor in state.items():
        if isinstance(tensor, Mapping):
            check_weights(stage, tensor, f"{what} {name}")
        elif (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
              and not bool(torch.isfinite(tensor).all())):
            raise NonFiniteStage(f"stage {stage!r}: {what} {name!r} holds NaN/inf values; "
                                 "nothing was saved (lower the learning rate?)")
