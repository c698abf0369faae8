"""Seeding, device selection and mixed precision: the runtime knobs every recipe shares."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import numpy as np
import torch

__all__ = ["autocast", "loader_kwargs", "seed_everything", "select_device"]


def seed_everything(seed: int, *, deterministic: bool = False) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) and return a CPU generator seeded with ``seed``.

    With ``deterministic=True`` torch is asked for deterministic kernels (slower on GPU; an op
    without a deterministic implementation then raises instead of silently varying).
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def select_device(name: str = "auto") -> torch.device:
    """Return the device called ``name``: ``"auto"`` (CUDA if present, else CPU), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``. Asking for CUDA where none exists raises ``RuntimeError``.

    On CUDA, ``cudnn.benchmark`` is switched on (fixed input shapes in these recipes).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        torch.backends.cudnn.benchmark = True
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use 'auto', 'cpu' or 'cuda[:N]'")
    return device


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """Context for forward passes: bfloat16 autocast on ``device`` when ``bf16`` is true, else a
    no-op. Keep solver arithmetic (CG, optimiser updates) outside it, in float32."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def loader_kwargs(device: torch.device, workers: int) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.data.DataLoader``: ``workers`` processes, pinned memory
    and persistent workers on CUDA."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kwargs["persistent_workers"] = True
    return kwargs
