"""Run records: what a stage's outputs were made with and from, written after them.

A stage's record is ``<main output>.config.json`` (``pretext.pt.config.json``,
``<target>/bissl.pt.config.json``, ...), written atomically once every output of the stage is
written::

    {"format": 2, "stage": "bissl", "target": "digits", "finished": "2026-...",
     "fingerprint": {"bissl.lam": 0.001, ...},        # what the outputs were made with
     "outputs": {"digits/bissl.pt": "<sha256>", "digits/bissl_history.json": "<sha256>"},
     "inputs": {"pretext.pt": {"stage": "pretext", "record": "pretext.pt.config.json",
                               "sha256": {"pretext.pt": "<sha256>", ...}}, ...},
     "allowed_changes": [{"time": ..., "input": "pretext.pt", "changes": ["key: old -> new"]}]}

Paths are relative to the run folder. The record is removed before a stage runs again, so an
output without a record is one whose stage did not finish. Before a stage runs, each input is
verified (:func:`check_inputs`): its record exists and is of this format, the file (and the
run's ``tokenizer.json`` where the record lists it) still has its digest, the files it was made
from are still those it recorded, and the settings it depends on
(:func:`~recipes.common.fingerprint.dependency`) are the current ones. A failure raises a
:class:`RecordError` (or :class:`~recipes.common.fingerprint.ConfigChanged`) naming the file, or
each setting with its recorded and current value;
``--allow-changed-config`` lets a missing/older record or a changed setting or input through and
records it in the new record. A digest that does not match is always refused.

A record whose ``format`` is missing was written by the recipes before records were written after
their outputs (before the stage ran): it cannot vouch for its files (:class:`LegacyRecord`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fingerprint import (
    ConfigChanged,
    dependency,
    differences,
    fingerprint_path,
    format_differences,
)
from .jsonio import write_json

__all__ = ["FORMAT", "OUTPUTS", "Checked", "DigestMismatch", "Input", "InputReplaced",
           "LegacyRecord", "Problem", "RecordError", "Unrecorded", "amend_record",
           "check_done", "check_inputs", "digests", "read_record", "record_path", "relative",
           "remove_record", "replaced_inputs", "restore_record", "sha256",
           "write_record"]

FORMAT = 2
OUTPUTS = {"pretext": "pretext.pt", "only-ft": "only_ft.json", "head-warmup": "warmup.pt",
           "bissl": "bissl.pt", "finetune": "bissl_ft.json"}
SHORT = 12  # hex digits of a digest in messages
# files every stage reads beside its inputs, verified with any input whose record lists them
SHARED = ("tokenizer.json",)  # the GPT recipe's token ids


class RecordError(RuntimeError):
    """A run record is missing, older than this format, or does not match its files."""


class Unrecorded(RecordError):
    """A file has no run record: its stage did not finish, or it was copied without it."""


class LegacyRecord(RecordError):
    """A record written before its stage ran (the recipes before run records)."""


class DigestMismatch(RecordError):
    """A file differs from (or is missing against) the digest its record holds."""


class InputReplaced(RecordError):
    """A file a stage's output was made from has been replaced since."""


def now() -> str:
    """The local time, as records write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def sha256(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes (cached per file identity, size and modification time)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def relative(out: Path, path: Path) -> str:
    """``path`` relative to the run folder ``out`` (POSIX separators)."""
    try:
        return Path(path).relative_to(out).as_posix()
    except ValueError:
        return str(path)


def record_path(output: Path) -> Path:
    """The record of the stage whose main output is ``output``."""
    return fingerprint_path(output)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path`` (``None`` when there is none)."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RecordError(f"{path}: unreadable run record ({err}); rerun its stage with "
                          "--overwrite") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}: not a run record; rerun its stage with --overwrite")
    return record


def digests(out: Path, files: Iterable[Path]) -> dict[str, str]:
    """``{relative path: sha256}`` of ``files``."""
    return {relative(out, f): sha256(f) for f in files}


def write_record(out: Path, output: Path, stage: str, target: str | None,
                 fp: dict[str, Any], files: Iterable[Path], inputs: dict[str, Any] | None = None,
                 allowed: list[dict[str, Any]] | None = None) -> Path:
    """Write the record of ``stage`` (main output ``output``) after its ``files`` are written:
    their digests, the fingerprint ``fp`` they were made with, the ``inputs`` entries of
    :func:`check_inputs` and the ``allowed`` changes. Atomic; returns the record's path."""
    record = {"format": FORMAT, "stage": stage, "target": target, "finished": now(),
              "fingerprint": fp, "outputs": digests(out, files), "inputs": inputs or {},
              "allowed_changes": list(allowed or [])}
    return write_json(record, record_path(output))


def remove_record(output: Path) -> str | None:
    """Remove ``output``'s record (a stage about to run again); returns its text, which
    :func:`restore_record` puts back when the stage fails before touching the files."""
    path = record_path(output)
    try:
        text = path.read_text()
    except OSError:
        return None
    path.unlink(missing_ok=True)
    return text


def restore_record(out: Path, output: Path, text: str | None) -> bool:
    """Put back a removed record when every file it lists still has its digest (the stage that
    failed did not touch them)."""
    if text is None:
        return False
    try:
        record = json.loads(text)
        if record.get("format") != FORMAT or _mismatch(out, record) is not None:
            return False
    except (ValueError, OSError, AttributeError):
        return False
    path = record_path(output)
    tmp = path.with_name(f".{path.name}.restore")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def amend_record(output: Path, changes: list[dict[str, Any]],
                 upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Append accepted ``changes`` to a finished stage's record (its fingerprint stays: the
    outputs were made with it); ``upgrade`` rewrites an older record's fields first."""
    path = record_path(output)
    record = read_record(path) or {}
    if upgrade is not None:
        record = upgrade(record)
    record["allowed_changes"] = [*record.get("allowed_changes", []), *changes]
    write_json(record, path)


def _mismatch(out: Path, record: dict[str, Any],
              names: Iterable[str] | None = None) -> tuple[str, str, str | None] | None:
    """The first listed file (of ``names``: all) whose digest differs: ``(name, recorded, now or
    None)``."""
    listed = record.get("outputs", {})
    for name in listed if names is None else names:
        digest, path = listed[name], out / name
        current = sha256(path) if path.is_file() else None
        if current != digest:
            return name, digest, current
    return None


def replaced_inputs(out: Path, record: dict[str, Any]) -> list[str]:
    """``input file: then -> now`` for each file the record's inputs held that differs now."""
    lines = []
    for entry in record.get("inputs", {}).values():
        for name, digest in (entry.get("sha256") or {}).items():
            path = out / name
            current = sha256(path) if path.is_file() else None
            if current != digest:
                lines.append(f"{name}: sha256 {digest[:SHORT]}… then, "
                             + (f"{current[:SHORT]}… now" if current else "missing now"))
    return lines


def _digest_message(who: str, name: str, record_name: str, recorded: str,
                    current: str | None, stage: str) -> str:
    if current is None:
        what = f"{name} is missing, though {record_name} lists it"
    else:
        what = (f"{name} is not the file {record_name} describes (sha256 {recorded[:SHORT]}… "
                f"recorded, {current[:SHORT]}… now): it was replaced or altered after stage "
                f"{stage!r} finished")
    return f"{who}: {what}; restore it, or rerun stage {stage!r} with --overwrite"


@dataclass
class Problem:
    """Why a finished stage cannot be reused as it is: ``kind`` is ``unrecorded``, ``legacy``,
    ``digest``, ``inputs`` or ``config``; ``changes`` what ``--allow-changed-config`` records."""

    kind: str
    message: str
    changes: list[str] = field(default_factory=list)

    def error(self) -> Exception:
        return {"unrecorded": Unrecorded, "legacy": LegacyRecord, "digest": DigestMismatch,
                "inputs": InputReplaced, "config": ConfigChanged}[self.kind](self.message)


def check_done(out: Path, output: Path, stage: str, current: dict[str, Any],
               who: str) -> Problem | None:
    """Whether the finished ``stage`` (main output ``output``) holds under the fingerprint
    ``current``: ``None``, or the :class:`Problem`."""
    path = record_path(output)
    name = relative(out, path)
    record = read_record(path)
    if record is None:
        return Problem("unrecorded", f"{who}: {relative(out, output)} has no run record "
                       f"({name}): the stage did not finish (killed?)",
                       [f"{relative(out, output)} has no run record"])
    if record.get("format") != FORMAT:
        return Problem("legacy", (
            f"{who}: {name} was written by an older version of the recipes, before the stage "
            f"ran, so it cannot vouch for {relative(out, output)}; rerun the stage with "
            "--overwrite, or pass --allow-changed-config to trust it (the record then gets the "
            "files' digests as they are now, and the trust is recorded)"),
            [f"{name}: written before its stage ran; trusted as the files are now"])
    bad = _mismatch(out, record)
    if bad is not None:
        return Problem("digest", _digest_message(who, bad[0], name, bad[1], bad[2], stage),
                       [f"{bad[0]} differs from {name}"])
    replaced = replaced_inputs(out, record)
    if replaced:
        return Problem("inputs", (
            f"{who}: the outputs were made from files that have been replaced since:\n  "
            + "\n  ".join(replaced) + f"\nrerun the stage with --overwrite, or pass "
            f"--allow-changed-config to keep it anyway (recorded in {name})"), replaced)
    diff = format_differences(differences(record.get("fingerprint", {}), current))
    if diff:
        return Problem("config", (
            f"{output.parent} stage {stage!r} was run with a different configuration (recorded "
            "-> current):\n  " + "\n  ".join(diff) + "\nrestore these values, use another "
            "run.out_dir, rerun the stage with --overwrite, or pass --allow-changed-config to "
            f"continue anyway (recorded in {name})"), diff)
    return None


@dataclass
class Input:
    """A file a stage reads: ``path``, the ``stage`` that makes it and how it is used
    (``"all"``, or ``"choice"``: only_ft.json read for its chosen (lr, wd))."""

    path: Path
    stage: str
    use: str = "all"


@dataclass
class Checked:
    """What :func:`check_inputs` found: the ``inputs`` entries of the consumer's record, the
    changes ``--allow-changed-config`` let through (to record) and the values the inputs were
    made with where the settings differ now (``recorded``)."""

    entries: dict[str, Any] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)
    recorded: dict[str, Any] = field(default_factory=dict)


def input_record(inp: Input) -> Path:
    """The record vouching for ``inp``: its own (``<file>.config.json``) where there is one, else
    that of the stage that makes it."""
    own = record_path(inp.path)
    return own if own.exists() else inp.path.parent / (OUTPUTS[inp.stage] + ".config.json")


def check_inputs(out: Path, inputs: Iterable[Input], who: str, cfg_for: Callable[[Input], Any],
                 allow: bool, record_name: str,
                 reused: Callable[[Input], bool] | None = None) -> Checked:
    """Verify every input of a stage (see the module docstring); ``cfg_for(input)`` is the
    configuration it must have been made with; ``record_name`` the consumer's record.
    ``reused(input)``: a file reused from another run folder (a sweep's base run), where the files
    it was made from were checked; they are not looked for here."""
    checked = Checked()
    for inp in inputs:
        name = relative(out, inp.path)
        if not inp.path.exists():
            raise FileNotFoundError(f"{inp.path} is missing: run the {inp.stage!r} stage first")
        rec_path = input_record(inp)
        rec_name = relative(out, rec_path)
        record = read_record(rec_path)
        accepted: list[str] = []
        if record is None or record.get("format") != FORMAT:
            why = (f"has no run record ({rec_name}): stage {inp.stage!r} did not finish "
                   "(killed?), or the file was copied without its record"
                   if record is None else
                   f"has only a record written before its stage ran ({rec_name}, an older "
                   "version of the recipes), which cannot vouch for it")
            fix = ("rerun stage {s!r} (--resume continues a killed stage, --overwrite runs a "
                   "finished one again), copy the record with the file, or pass "
                   "--allow-changed-config to use it unverified" if record is None else
                   "rerun stage {s!r} with --overwrite, or trust the file as it is now with "
                   "'{s} --resume --allow-changed-config' (which upgrades its record), or pass "
                   "--allow-changed-config here to use it unverified").format(s=inp.stage)
            if not allow:
                raise (Unrecorded if record is None else LegacyRecord)(
                    f"{who}: its input {name} {why}; {fix} (recorded in {record_name})")
            accepted.append(f"{name}: used unverified (it " + why.split(":")[0] + ")")
            checked.entries[name] = {"stage": inp.stage, "record": None,
                                     "sha256": {name: sha256(inp.path)}}
        else:
            if name not in record.get("outputs", {}):
                raise RecordError(f"{who}: its input {name} is not among the outputs "
                                  f"{rec_name} lists; rerun stage {inp.stage!r} with --overwrite")
            read = [name, *(n for n in SHARED if n in record["outputs"] and n != name)]
            bad = _mismatch(out, record, read)
            if bad is not None:
                raise DigestMismatch(_digest_message(who, bad[0], rec_name, bad[1], bad[2],
                                                     inp.stage))
            replaced = [] if reused and reused(inp) else replaced_inputs(out, record)
            if replaced and not allow:
                raise InputReplaced(
                    f"{who}: its input {name} was made from files that have been replaced "
                    "since:\n  " + "\n  ".join(replaced) + f"\nrerun stage {inp.stage!r} with "
                    "--overwrite, or pass --allow-changed-config to use it anyway (recorded in "
                    f"{record_name})")
            accepted += [f"{name} was made from {line}" for line in replaced]
            checked.entries[name] = {"stage": inp.stage, "record": rec_name,
                                     "sha256": {n: record["outputs"][n] for n in read}}
        if record is not None:
            diff = differences(record.get("fingerprint", {}),
                               dependency(cfg_for(inp), inp.stage, inp.use))
            if diff and not allow:
                raise ConfigChanged(
                    f"{who}: its input {name} was made with a different configuration of the "
                    "settings it depends on (recorded -> current):\n  "
                    + "\n  ".join(format_differences(diff))
                    + f"\nrerun stage {inp.stage!r} under this configuration (--overwrite), "
                    "restore these values, use another run.out_dir, or pass "
                    f"--allow-changed-config to go on with it anyway (recorded in {record_name})")
            accepted += format_differences(diff)
            checked.recorded.update({k: old for k, old, _ in diff if old != "<absent>"})
        if accepted:
            checked.changes.append({"time": now(), "input": name, "changes": accepted})
    return checked
