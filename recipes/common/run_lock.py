"""The run-folder lock: one command at a time on a ``run.out_dir``, by ``filelock``.

``out_dir/.lock`` is held with the operating system's file lock (``flock``): two processes can
never both hold it, and a killed command's lock is free at once. The file also records its
holder (pid, host, start time, ``"lock": "flock"``), which a second command names when it stops,
and is removed when the command ends. A record left by a killed command is reported (a warning)
and replaced. A record without ``"lock": "flock"`` was written by a lock without ``flock`` (the
recipes before ``filelock``): it holds while its process runs, as it did there.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import filelock

__all__ = ["RunLock", "RunLocked"]


class RunLocked(RuntimeError):
    """Another command is running on the same ``run.out_dir``."""


def _record(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data.decode())
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


def _running(record: dict[str, Any]) -> bool:
    """Whether the process of a record without ``flock`` may still run (another host: yes)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        pid = int(record["pid"])
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except (KeyError, TypeError, ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``out_dir/.lock`` while a command runs; a second command stops at once with
    :class:`RunLocked` naming the folder and the holder."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / ".lock"
        self._lock: filelock.BaseFileLock | None = None
        self._file: os.stat_result | None = None
        self._stale: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock is not None

    def _busy(self, record: dict[str, Any]) -> RunLocked:
        holder = (f"process {record.get('pid')} on {record.get('host')} (started "
                  f"{record.get('start', '?')})" if "pid" in record else "another command")
        return RunLocked(f"{self.path.parent} is in use by {holder}; wait for it to finish or "
                         "use another run.out_dir")

    def _claim(self, fd: int) -> None:
        """Under the file lock: check the previous record, then write ours."""
        previous = _record(os.pread(fd, 1 << 16, 0))
        if previous.get("lock") != "flock" and "pid" in previous and _running(previous):
            raise self._busy(previous)
        self._stale = previous if "pid" in previous else None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "start": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "lock": "flock"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record, allow_nan=False).encode(), 0)
        self._file = os.fstat(fd)

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLocked` at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(self.path, blocking=False, on_acquired=self._claim)
        try:
            lock.acquire()
        except filelock.Timeout:
            try:  # a record without "flock" is not the holder's yet: it is still being written
                record = _record(self.path.read_bytes())
            except OSError:
                record = {}
            raise self._busy(record if record.get("lock") == "flock" else {}) from None
        self._lock = lock
        if self._stale is not None:
            warnings.warn(f"{self.path}: taking over the stale lock of process "
                          f"{self._stale['pid']} (started {self._stale.get('start', '?')}), "
                          "which is not running", stacklevel=2)
        return self

    def release(self) -> None:
        """Remove the file (while still holding it: a later command makes a new one), then
        release the lock."""
        if self._lock is None:
            return
        try:
            if self._file is not None and os.path.samestat(self.path.stat(), self._file):
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
