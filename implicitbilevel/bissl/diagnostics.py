"""What each alternation's record says about its implicit-Jacobian solve.

Three numbers, for the last upper step of the alternation, so that a run shows whether the IJ does
anything at all:

- ``ij_relative_residual``: ``‖v − A u‖/‖v‖`` on the system that was solved (one product);
- ``ij_exact_relative_residual``: the same on the exact-Hessian system ``D + H/μ`` (thesis eq.
  4.8-4.9), which differs from the solved one when the curvature is Gauss–Newton (one more
  product, with no kept graph); for the exact Hessian it is the number above (NaN when that is
  not measured);
- ``ij_cosine_u_v``: the cosine between ``u`` and ``v`` (1 when the solve leaves ``v``'s direction
  alone, as it does when ``H/μ`` is negligible).

Above 1, a residual says ``u`` is further from the solution than ``u = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..curvature.hessian import HessianOperator
from ..problem import BilevelProblem
from ..results import UpperGradient
from ..tree import tree_dot, tree_norm, tree_sub

__all__ = ["solve_diagnostics"]


def solve_diagnostics(problem: BilevelProblem, out: UpperGradient, upper: Mapping[str, Tensor],
                      lower: Mapping[str, Tensor], lower_batch: Any, *, residual: bool,
                      exact: bool) -> dict[str, float]:
    """The record's IJ numbers (module docstring) for the solve ``out`` at ``(upper, lower)``
    with the Hessian batch ``lower_batch``; ``residual`` and ``exact`` switch the products off
    (their entries are then NaN)."""
    cosine = float(tree_dot(out.u, out.rhs) / (tree_norm(out.u) * tree_norm(out.rhs)
                                               ).clamp_min(1e-30))
    solved = out.true_relative_residual() if residual else math.nan
    if not exact:
        exact_residual = math.nan
    elif isinstance(problem.ij.curvature, str):  # the exact Hessian was solved with
        exact_residual = solved
    else:
        exact_residual = _exact_residual(problem, out, upper, lower, lower_batch)
    return {"ij_relative_residual": solved, "ij_exact_relative_residual": exact_residual,
            "ij_cosine_u_v": cosine}


def _exact_residual(problem: BilevelProblem, out: UpperGradient, upper: Mapping[str, Tensor],
                    lower: Mapping[str, Tensor], batch: Any) -> float:
    """``‖v − (D + H/μ) u‖/‖v‖`` with the exact Hessian ``H`` of the lower loss at the point."""
    rhs_norm = float(tree_norm(out.rhs))
    if rhs_norm == 0:
        return 0.0
    fixed = {n: p.detach() for n, p in lower.items()}

    def loss(sub: Any, batch_: Any) -> Tensor:
        return problem.lower_loss({**fixed, **sub}, batch_)

    operator = HessianOperator(loss, {n: fixed[n] for n in out.system.names}, batch,
                               mode=problem.ij.hvp_mode, reuse=False)
    operator.memo["regularizer"] = problem.regularizer.bind(batch)
    system = problem.system(upper, lower, operator, out.system.mu)
    return float(tree_norm(tree_sub(out.rhs, system(out.u)))) / rhs_norm
