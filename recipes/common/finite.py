"""Non-finite guards: a NaN/inf loss or weight stops the stage before anything is saved."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["NonFiniteStage", "check_loss", "check_weights"]


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
