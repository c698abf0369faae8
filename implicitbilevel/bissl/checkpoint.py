"""Atomic checkpoint files that load safely.

A checkpoint is written to a temporary file in the same directory, flushed to disk and moved over
the target with ``os.replace`` (atomic on POSIX and Windows), so a run killed mid-write leaves the
previous checkpoint intact. The previous file is kept as ``<name>.prev``, a second line of
defence.
Loading uses ``torch.load(weights_only=True)``: only tensors and plain containers are unpickled,
never arbitrary code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]


def save_checkpoint(obj: Any, path: str | os.PathLike, keep_previous: bool = True) -> Path:
    """Atomically write ``obj`` (tensors and plain containers) to ``path`` with ``torch.save``.

    Args:
        obj: what to save; it must load with ``weights_only=True``.
        path: the target file; its directory is created if needed.
        keep_previous: move an existing ``path`` to ``path.prev`` before replacing it.

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from implicitbilevel.bissl.checkpoint import load_checkpoint, save_checkpoint
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = save_checkpoint({"step": 3, "w": torch.ones(2)}, Path(folder) / "run.pt")
        ...     load_checkpoint(path)
        {'step': 3, 'w': tensor([1., 1.])}
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.exists():
            os.replace(path, path.with_name(path.name + ".prev"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt; the message names the file and,
            when one exists, the previous good checkpoint ``<name>.prev``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from implicitbilevel.bissl.checkpoint import load_checkpoint, save_checkpoint
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "run.pt"
        ...     _ = save_checkpoint({"step": 1}, path)
        ...     _ = save_checkpoint({"step": 2}, path)        # the first is kept as .prev
        ...     load_checkpoint(path)["step"], sorted(p.name for p in Path(folder).iterdir())
        (2, ['run.pt', 'run.pt.prev'])
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the file does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        previous = path.with_name(path.name + ".prev")
        if not previous.is_file():
            hint = "; delete it to start over"
        elif _loads(previous, map_location):
            hint = (f"; the previous checkpoint {previous} is intact, move it to {path} to "
                    "resume from it")
        else:
            hint = f"; the previous checkpoint {previous} is corrupt too: delete both to start over"
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err}){hint}"
        ) from err


def _loads(path: Path, map_location: Any) -> bool:
    """Whether ``path`` loads with ``weights_only=True``."""
    try:
        torch.load(path, map_location=map_location, weights_only=True)
    except Exception:
        return False
    return True
