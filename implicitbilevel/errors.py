"""Every exception the library raises of its own, in one leaf module that imports nothing from the
package, so any module can raise any of them without an import circle.

==============================  ===========================================================
exception                       raised when
==============================  ===========================================================
:class:`NonFiniteError`         a loss, gradient, product or solution is NaN or infinite
:class:`SolverBreakdownError`   a linear solve broke down (``on_breakdown="raise"``)
:class:`HVPModeError`           a curvature-product mode cannot run on the given model
:class:`CheckpointError`        a checkpoint is missing, truncated, corrupt or of another format
==============================  ===========================================================
"""

from __future__ import annotations

from typing import Any

__all__ = ["CheckpointError", "HVPModeError", "NonFiniteError", "SolverBreakdownError"]


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite."""


class SolverBreakdownError(RuntimeError):
    """A linear solve broke down; ``info`` holds its diagnostics
    (a :class:`~implicitbilevel.SolveInfo`)."""

    def __init__(self, message: str, info: Any) -> None:
        super().__init__(message)
        self.info = info


class HVPModeError(RuntimeError):
    """An HVP mode was requested that the loss's operations cannot run."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of an unexpected format."""
