"""Peak memory of one call and measurements in a fresh interpreter, for the benchmarks' memory
tables (CPU: ``/proc/self`` RSS and its high-water mark; CUDA: the allocator's peak)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .harness import ROOT, device_type

__all__ = ["in_subprocess", "malloc_trim", "peak_memory", "rss_kib"]


def rss_kib(field: str) -> int:
    """A field of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def malloc_trim() -> Callable[[int], Any]:
    """glibc's ``malloc_trim`` (a no-op where there is none)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda _pad: 0


def peak_memory(step: Callable[[], Any], device: str, release: bool = False) -> tuple[int, int]:
    """``(before, peak)`` in bytes around one call of ``step``.

    CPU: ``VmRSS`` before, ``VmHWM`` after, the high-water mark reset through
    ``/proc/self/clear_refs``; with ``release`` freed heap memory is first handed back
    (``malloc_trim(0)``) so that the step's pages are new ones. CUDA: the memory allocated before
    and ``torch.cuda.max_memory_allocated`` after (with ``release`` the cache emptied first).
    """
    cuda = device_type(device) == "cuda"
    if cuda:
        torch.cuda.synchronize()
        if release:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        if release:
            malloc_trim()(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = rss_kib("VmRSS") * 1024
    step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss_kib("VmHWM") * 1024
    return before, peak


def in_subprocess(function: str, spec: Mapping[str, Any], env: Mapping[str, str] | None = None,
                  timeout: float = 600) -> tuple[Any, str | None]:
    """``module.function(spec)`` in a fresh interpreter (``function`` as ``"module:name"``).

    Returns the JSON the function returned and ``None``, or ``None`` and the last line of the
    error output.
    """
    module, name = function.split(":")
    code = (f"import json, sys; from {module} import {name}; "
            f"print(json.dumps({name}(json.loads(sys.argv[1]))))")
    path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    full_env = dict(os.environ, PYTHONPATH=path, **(env or {}))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None
