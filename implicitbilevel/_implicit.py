"""The implicit step shared by :class:`~implicitbilevel.BilevelProblem` and
:func:`~implicitbilevel.argmin`: build the curvature operator, solve, apply the mixed partial.

By the implicit function theorem (thesis Theorem 3.2), at a stationary point of the inner objective
``G`` the hypergradient's implicit part is

.. math::

    -\\nabla^2_{xy} G \\, \\big[\\nabla^2_{yy} G\\big]^{-1} v,

``v`` the upper gradient with respect to ``y``. Both callers hand the same three pieces to
:func:`implicit_step`: the system ``A`` (an :class:`~implicitbilevel.system.IJSystem` over a
curvature operator from :func:`curvature_operator`), the right-hand side ``v`` and the mixed
vector-Jacobian product ``u ↦ ∇_x ⟨∇_y ·, u⟩``. They differ only in how they split ``G``:
``BilevelProblem`` as ``ℓ(y) + λ r(x, y)`` (``A = ∇²r + ∇²ℓ/μ``, mixed term of ``r``), the argmin
not at all (``A = ∇²G``, mixed term of ``G``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from .gauss_newton import GaussNewton, GaussNewtonOperator
from .gradients import require_finite
from .hessian import HessianOperator, HVPMode
from .solvers import LinearSolver, SolveInfo, SolverBreakdownError
from .system import IJSystem
from .tree import Params, tree_dot

Curvature = Literal["hessian"] | GaussNewton
BreakdownPolicy = Literal["raise", "warn", "ignore"]


def check_curvature(curvature: Any) -> None:
    """Reject anything but ``"hessian"`` or a :class:`~implicitbilevel.GaussNewton`."""
    if not (curvature == "hessian" or isinstance(curvature, GaussNewton)):
        raise TypeError("curvature must be 'hessian' or a GaussNewton(outputs, output_loss), "
                        f"got {curvature!r}")


def check_policy(on_breakdown: Any) -> None:
    """Reject an unknown breakdown policy."""
    if on_breakdown not in ("raise", "warn", "ignore"):
        raise ValueError(
            f"on_breakdown must be 'raise', 'warn' or 'ignore', got {on_breakdown!r}"
        )


def check_solver(solver: Any, what: str) -> None:
    """Reject a solver that is not a :class:`~implicitbilevel.LinearSolver`."""
    if not isinstance(solver, LinearSolver):
        raise TypeError(f"{what} must be a LinearSolver (CG, MINRES, Neumann, ...), "
                        f"got {type(solver).__name__}")


def curvature_operator(
    loss: Callable[..., Tensor],
    curvature: Curvature,
    point: Mapping[str, Tensor],
    args: tuple,
    *,
    embed: Callable[[Params], Any],
    mode: HVPMode,
    reuse: bool,
) -> HessianOperator | GaussNewtonOperator:
    """``z ↦ ∇²_yy loss · z`` over the names of ``point`` (or the Gauss–Newton matrix).

    ``loss(embed(sub), *args)`` (``curvature.outputs(embed(sub), *args)`` for Gauss–Newton) is
    evaluated with ``sub`` the solved variables; ``embed`` completes them to what the loss takes
    (the held-fixed lower variables of a :class:`~implicitbilevel.BilevelProblem`).
    """
    if isinstance(curvature, GaussNewton):
        outputs = curvature.outputs

        def outputs_over_solved(sub: Params, *args_: Any) -> Any:
            return outputs(embed(sub), *args_)

        return GaussNewtonOperator(outputs_over_solved, curvature.output_loss, point, *args,
                                   mode=mode, reuse=reuse)

    def loss_over_solved(sub: Params, *args_: Any) -> Tensor:
        return loss(embed(sub), *args_)

    return HessianOperator(loss_over_solved, point, *args, mode=mode, reuse=reuse)


def handle_breakdown(info: SolveInfo, policy: BreakdownPolicy, where: str, t: int | None = None,
                     stacklevel: int = 2) -> None:
    """Apply the breakdown policy to a solve's diagnostics (``where`` names the solve, ``t`` the
    alternation if there is one)."""
    if info.breakdown is None or policy == "ignore":
        return
    at = "" if t is None else f" at alternation {t}"
    message = f"{where} broke down{at} after {info.iterations} iterations: {info.breakdown}"
    if policy == "raise":
        raise SolverBreakdownError(message, info)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


@dataclass
class ImplicitStep:
    """One implicit step: ``u = A⁻¹ v`` and the mixed product ``∇_x ⟨∇_y ·, u⟩``."""

    u: Params
    info: SolveInfo
    mixed: Params


def implicit_step(
    system: IJSystem,
    rhs: Mapping[str, Tensor],
    solver: LinearSolver,
    mixed_vjp: Callable[[Params], Params],
    *,
    on_breakdown: BreakdownPolicy,
    check_finite: bool,
    where: str,
    t: int | None = None,
    stacklevel: int = 2,
) -> ImplicitStep:
    """Solve ``A u = v`` with ``solver``, apply the breakdown policy, return ``u`` and the mixed
    product ``mixed_vjp(u)`` (the implicit part of the hypergradient is its negative)."""
    u, info = solver(system, dict(rhs))
    handle_breakdown(info, on_breakdown, where, t, stacklevel + 1)
    if check_finite:
        require_finite(tree_dot(u, u), "implicit-Jacobian solution", t)
    return ImplicitStep(u, info, mixed_vjp(u))


