"""Per-process run state for exact resume: random-number states, gathered from every rank."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .distributed import world_size

__all__ = ["gather_per_rank", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, Python and numpy random states, as tensors and plain containers."""
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss]
    except ImportError:  # numpy is optional for the library
        pass
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states :func:`rng_state` returned."""
    torch.random.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss_value = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss_value))


def gather_per_rank(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``local`` dict, in rank order (``[local]`` in a single process)."""
    if world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, local)
    return gathered
