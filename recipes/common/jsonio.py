"""Strict JSON for every file the recipes write.

Every JSON (and JSON Lines) file under a run folder is strict JSON, readable by any parser:
non-finite floats (NaN, ±inf) are written as ``null`` and ``json.dumps(..., allow_nan=False)``
refuses anything else that is not JSON; tensors and NumPy scalars become numbers, paths strings.
The BiSSL trainer's ``metrics.jsonl`` follows the same rule
(:func:`implicitbilevel.bissl.run_log.strict_json`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["dumps", "strict", "write_json"]


def strict(obj: Any) -> Any:
    """``obj`` as plain JSON values: non-finite floats ``None``, mappings with string keys, lists
    for tuples, ``.item()`` for tensors and NumPy scalars, ``str`` for paths."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return strict(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see :func:`strict`)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented strict JSON atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(obj)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
