"""What the BiSSL trainer writes beside its checkpoint as it goes.

``metrics.jsonl`` always holds exactly the records of the alternations the checkpoint holds:
:func:`rewrite_log` writes them atomically before a run appends to it, so a resume after a kill
(or after a failed save) neither loses nor repeats an alternation. Every line is strict JSON
(:func:`json_line`): a number that is not finite (a residual a solver does not measure, a NaN
loss) is written as ``null``. :func:`progress_bar` is the optional tqdm bar over the alternations.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["json_line", "progress_bar", "rewrite_log", "strict_json"]


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, in nested dicts and
    lists, so ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    """One strict-JSON line (non-finite numbers as ``null``), newline included."""
    return json.dumps(strict_json(record), allow_nan=False) + "\n"


def rewrite_log(path: Path, history: list[dict[str, Any]]) -> Any:
    """``metrics.jsonl`` holding exactly ``history`` (the records up to the checkpoint, none when
    starting over), written atomically; returned open for appending."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        for record in history:
            handle.write(json_line(record))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return open(path, "a")  # noqa: SIM115


def progress_bar(enabled: bool, total: int, initial: int) -> Any:
    """A tqdm bar over the alternations (``None`` when disabled or tqdm is missing)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the library
        return None
    return tqdm(total=total, initial=initial, desc="BiSSL", unit="alt", dynamic_ncols=True)
