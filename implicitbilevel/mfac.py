"""Deprecated: the names of this module now live in :mod:`implicitbilevel.solvers.mfac`; they
import from here for one more release, with a ``DeprecationWarning``. The trainer helpers below
gave way to the solver protocol (:meth:`LinearSolver.observe
<implicitbilevel.LinearSolver.observe>`, :meth:`LinearSolver.state_dict
<implicitbilevel.LinearSolver.state_dict>`) and
:meth:`BilevelProblem.observe_lower_gradient
<implicitbilevel.BilevelProblem.observe_lower_gradient>`."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from ._deprecated import moved

__getattr__ = moved("implicitbilevel.mfac", ["implicitbilevel.solvers.mfac"])


def _warn(old: str, new: str) -> None:
    warnings.warn(f"implicitbilevel.mfac.{old} is deprecated: use {new}", DeprecationWarning,
                  stacklevel=3)


def observe_lower_gradient(problem: Any, upper: Mapping, lower: Mapping,
                           lower_gradient: Any) -> None:
    """Deprecated: ``problem.observe_lower_gradient(upper, lower, lower_gradient)``."""
    _warn("observe_lower_gradient", "BilevelProblem.observe_lower_gradient")
    problem.observe_lower_gradient(upper, lower, lower_gradient)


def solver_state(solver: Any) -> dict[str, Any]:
    """Deprecated: ``{"ij": solver.state_dict()}`` when the state is not empty."""
    _warn("solver_state", "LinearSolver.state_dict")
    state = solver.state_dict()
    return {"ij": state} if state else {}


def load_solver_state(solver: Any, state: Mapping[str, Any]) -> None:
    """Deprecated: ``solver.load_state_dict(state["ij"])`` when the checkpoint holds one."""
    _warn("load_solver_state", "LinearSolver.load_state_dict")
    if "ij" in state:
        solver.load_state_dict(state["ij"])
