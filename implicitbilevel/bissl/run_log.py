"""What the BiSSL trainer writes beside its checkpoint as it goes.

``metrics.jsonl`` always holds exactly the records of the alternations the checkpoint holds:
:func:`rewrite_log` writes them atomically before a run appends to it, so a resume after a kill
(or after a failed save) neither loses nor repeats an alternation. :func:`progress_bar` is the
optional tqdm bar over the alternations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["progress_bar", "rewrite_log"]


def rewrite_log(path: Path, history: list[dict[str, Any]]) -> Any:
    """``metrics.jsonl`` holding exactly ``history`` (the records up to the checkpoint, none when
    starting over), written atomically; returned open for appending."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        for record in history:
            handle.write(json.dumps(record) + "\n")
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
