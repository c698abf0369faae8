"""``BilevelProblem``: hypergradients by implicit differentiation (thesis Theorem 3.2).

The problem (eq. 3.1, BiSSL Definition 4.1)::

    min_x  F(x) = f(x, y*(x)),     y*(x) = argmin_y  G(x, y) = ℓ(y) + λ r(x, y)

with upper variables ``x`` (BiSSL: θ_D and φ_D) and lower variables ``y`` (θ_P and φ_P), all
parameter dicts. At a lower-level stationary point, with ``μ = λ + λ_damp`` and ``S`` the lower
variables the implicit Jacobian responds through, the hypergradient is

.. math::

    \\frac{dF}{dx} = \\nabla_x f - \\nabla_x \\langle \\nabla_y r, u \\rangle, \\qquad
    \\Big(\\nabla^2_{yy} r + \\tfrac{1}{\\mu} \\nabla^2_{yy} \\ell\\Big)_{SS}\\, u
    = \\nabla_{y_S} f.

With ``λ_damp = 0`` this is eq. 3.2-3.3 exactly (``G``'s Hessian is ``λ`` times the bracket). For
the proximal regulariser ``r = ½‖θ_D − θ_P‖²`` the bracket is ``I + H/μ`` and the mixed term is
``+u`` (eq. 4.8-4.9); ``λ_damp > 0`` is the damped operator of Algorithm 3.

- ``S`` = the coupled variables (default; the pretext head is held fixed, Prop. 4.2), or every
  lower variable when the solver has ``include_uncoupled=True`` (concatenated head, Sec. 5.3.4,
  Cor. 5.6: the bracket becomes ``diag(I, 0) + H_ω/μ``).
- A learnable ``λ = σ(ρ)`` gets ``dF/dρ = −σ'(ρ)/μ · ⟨∇_y r, u⟩``, which for the proximal
  regulariser is eq. 5.6, ``σ'(ρ)/(σ(ρ)+λ_damp) ⟨θ_D − θ_P, u⟩``: one dot product on top of the
  solve.

The lower-level gradient is ``∇_y ℓ + λ ∇_y r`` (Algorithm 2 line 6: ``∇_θ L^P + λ(θ_P − θ_D)``).
Both gradients come back as dicts with the names of the inputs, ready for ``torch.optim``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .hessian import HessianOperator, HVPMode
from .regularizers import BaseRegularizer, ProximalL2
from .schedules import LambdaSchedule, LearnableLambda, as_lambda
from .solvers import CG, LinearSolver, SolveInfo, SolverBreakdownError
from .tree import Params, tree_axpy, tree_dot, tree_scale

__all__ = [
    "BilevelProblem",
    "LowerGradient",
    "NonFiniteError",
    "UpperGradient",
    "assign_grads",
]

UpperLoss = Callable[[Params, Params, Any], Tensor]
LowerLoss = Callable[[Params, Any], Tensor]


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite."""


@dataclass
class UpperGradient:
    """The upper-level hypergradient and what was computed on the way.

    Attributes:
        grads: ``dF/dx`` for every upper variable (same names as the upper dict).
        lam_grad: ``dF/dρ`` for a :class:`~implicitbilevel.LearnableLambda`, else ``None``.
        loss: ``f(x, y)``, detached.
        ij: the implicit-Jacobian solution ``u`` over the solved lower variables.
        info: the linear solver's diagnostics.
        lam: the λ used.
    """

    grads: Params
    lam_grad: Tensor | None
    loss: Tensor
    ij: Params
    info: SolveInfo
    lam: float


@dataclass
class LowerGradient:
    """The lower-level gradient ``∇_y ℓ + λ ∇_y r`` and the loss terms.

    Attributes:
        grads: the gradient for every lower variable (same names as the lower dict).
        loss: ``ℓ(y)``, detached.
        regularizer: ``r(x, y)``, detached.
        lam: the λ used.
    """

    grads: Params
    loss: Tensor
    regularizer: Tensor
    lam: float


def _leaves(params: Mapping[str, Tensor]) -> Params:
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}


def _check_loss(loss: Any, which: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the {which} loss must return a scalar tensor, got {shape}; reduce it "
                         "(e.g. .mean()) first")
    return loss


def _grads(loss: Tensor, leaves: Mapping[str, Tensor]) -> Params:
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {
        n: g if g is not None else torch.zeros_like(p)
        for (n, p), g in zip(leaves.items(), grads)
    }


def assign_grads(params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
    """Write ``grads`` into ``params[name].grad`` so a ``torch.optim`` optimiser can step.

    Names in ``params`` without a gradient get ``None`` (the optimiser skips them).
    """
    for name, p in params.items():
        g = grads.get(name)
        p.grad = None if g is None else g.detach().to(p.dtype)


class BilevelProblem:
    """A bilevel problem whose hypergradient is computed by implicit differentiation.

    Args:
        upper_loss: ``f(upper, lower, batch) -> scalar``. For BiSSL use
            :func:`implicitbilevel.bissl.bissl_upper_loss`, which builds
            ``L^D(θ_P, φ_D) + L^D(θ_D, φ_D)`` from the downstream loss.
        lower_loss: ``ℓ(lower, batch) -> scalar`` (BiSSL: the pretext loss ``L^P(θ_P, φ_P)``).
        lam: λ > 0 as a float, a :class:`~implicitbilevel.LambdaSchedule` evaluated at the
            alternation ``t``, or a :class:`~implicitbilevel.LearnableLambda`.
        regularizer: the coupling ``r(x, y)``; default :class:`ProximalL2` over every name the two
            levels share.
        damping: ``λ_damp ≥ 0``; the implicit Jacobian is evaluated with ``μ = λ + λ_damp``
            (Algorithm 3; thesis default 10, 0 for the exact hypergradient).
        ij: the linear solver for the implicit-Jacobian system (:class:`CG`, :class:`Neumann`,
            :class:`ConcatenatedHeadCG`, :class:`Dense`).
        hvp_mode: how Hessian-vector products of ``ℓ`` are formed when not reusing a graph.
        reuse_graph: build the first-order graph of ``ℓ`` once per solve (or per
            :meth:`lower_hessian`) and reuse it for every product (faster, more memory; see
            :mod:`implicitbilevel.hessian`).
        on_breakdown: ``"raise"`` a :class:`SolverBreakdownError`, ``"warn"`` and use the iterate
            reached, or ``"ignore"`` (the diagnostics are in :class:`UpperGradient` either way).
        check_finite: raise :class:`NonFiniteError` on a NaN/inf loss, solution or gradient (one
            host synchronisation per check).
        reducer: averages batch-dependent dicts across data-parallel ranks (gradients of ``ℓ`` and
            ``f``, every Hessian-vector product, the loss values), e.g.
            :class:`~implicitbilevel.distributed.AllReduceMean`. ``None``: a single process.
    """

    def __init__(
        self,
        upper_loss: UpperLoss,
        lower_loss: LowerLoss,
        *,
        lam: float | LambdaSchedule | LearnableLambda,
        regularizer: BaseRegularizer | None = None,
        damping: float = 0.0,
        ij: LinearSolver | None = None,
        hvp_mode: HVPMode = "auto",
        reuse_graph: bool = True,
        on_breakdown: Literal["raise", "warn", "ignore"] = "raise",
        check_finite: bool = True,
        reducer: Callable[[Mapping[Any, Tensor]], dict] | None = None,
    ) -> None:
        self.upper_loss = upper_loss
        self.lower_loss = lower_loss
        self.lam = as_lambda(lam)
        self.regularizer = ProximalL2() if regularizer is None else regularizer
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping (λ_damp) must be a finite number >= 0, got {damping!r}")
        self.damping = float(damping)
        self.ij = CG() if ij is None else ij
        if not isinstance(self.ij, LinearSolver):
            raise TypeError(
                f"ij must be a LinearSolver (CG, Neumann, ...), got {type(ij).__name__}"
            )
        if on_breakdown not in ("raise", "warn", "ignore"):
            raise ValueError(
                f"on_breakdown must be 'raise', 'warn' or 'ignore', got {on_breakdown!r}"
            )
        self.hvp_mode = hvp_mode
        self.reuse_graph = reuse_graph
        self.on_breakdown = on_breakdown
        self.check_finite = check_finite
        self.reducer = reducer if reducer is not None else dict

    # -- λ -----------------------------------------------------------------------------------

    def lam_at(self, t: int = 0) -> float:
        """λ at alternation ``t`` (the current value for a learnable λ)."""
        value = self.lam(t)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"λ must stay finite and > 0, got {value} at alternation {t}")
        return value

    # -- the lower level ---------------------------------------------------------------------

    def solve_names(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> list[str]:
        """The lower variables the implicit Jacobian is solved over (``S`` above)."""
        return self._solve_names(self.regularizer.coupled_names(upper, lower), lower)

    def _solve_names(self, coupled: list[str], lower: Mapping[str, Tensor]) -> list[str]:
        if self.ij.include_uncoupled:
            known = set(coupled)
            return coupled + [n for n in lower if n not in known]
        return coupled

    def lower_grad(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], batch: Any, t: int = 0
    ) -> LowerGradient:
        """``∇_y ℓ(y) + λ ∇_y r(x, y)`` for every lower variable (Algorithm 2, lines 5-6)."""
        lam = self.lam_at(t)
        self.regularizer.coupled_names(upper, lower)  # fail on a bad coupling before any pass
        leaves = _leaves(lower)
        with torch.enable_grad():
            loss = _check_loss(self.lower_loss(leaves, batch), "lower")
            grads = _grads(loss, leaves)
        grads, loss = self._average(grads, loss)
        x = {n: p.detach() for n, p in upper.items()}
        y = {n: p.detach() for n, p in lower.items()}
        if self.check_finite:
            self._require_finite(loss, "lower-level loss", t)
        # Out of place: autograd may hand back expanded (stride-0) gradients.
        grads.update(tree_axpy(lam, self.regularizer.lower_grad(x, y), grads))
        reg_value = self.regularizer.value(x, y).detach()
        return LowerGradient(grads, loss.detach(), reg_value, lam)

    def lower_hessian(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], batch: Any
    ) -> HessianOperator:
        """The operator ``z ↦ ∇²_yy ℓ(y) z`` over :meth:`solve_names` at ``lower`` and ``batch``.

        Build it once and pass it to :meth:`upper_grad` for every upper step that shares the lower
        point and batch (in BiSSL: all ``N_U`` steps of an alternation). With ``reuse_graph`` it
        keeps ``ℓ``'s first-order graph alive until it is dropped.
        """
        names = self.solve_names(upper, lower)
        fixed = {n: p.detach() for n, p in lower.items()}

        def loss_over_solved(sub: Params, batch_: Any) -> Tensor:
            return self.lower_loss({**fixed, **sub}, batch_)

        operator = HessianOperator(
            loss_over_solved, {n: fixed[n] for n in names}, batch,
            mode=self.hvp_mode, reuse=self.reuse_graph,
        )
        if self.check_finite and operator.loss is not None:
            self._require_finite(operator.loss, "lower-level loss on the Hessian batch")
        return operator

    # -- the upper level ---------------------------------------------------------------------

    def upper_grad(
        self,
        upper: Mapping[str, Tensor],
        lower: Mapping[str, Tensor],
        upper_batch: Any,
        lower_batch: Any = None,
        *,
        t: int = 0,
        lower_hessian: HessianOperator | None = None,
    ) -> UpperGradient:
        """The hypergradient ``dF/dx`` (eq. 4.9 / Cor. 5.6) and, for a learnable λ, ``dF/dρ``.

        Args:
            upper: the upper variables ``x`` (θ_D, φ_D).
            lower: the lower variables ``y`` at (approximately) the lower solution (θ_P, φ_P).
            upper_batch: the batch for ``f``.
            lower_batch: the batch for ``ℓ``'s Hessian (unused when ``lower_hessian`` is given).
            t: the alternation, for a λ schedule.
            lower_hessian: a :meth:`lower_hessian` operator to reuse.
        """
        lam = self.lam_at(t)
        mu = lam + self.damping
        x = {n: p.detach() for n, p in upper.items()}
        y = {n: p.detach() for n, p in lower.items()}
        coupled = self.regularizer.coupled_names(x, y)
        names = self._solve_names(coupled, y)
        if lower_hessian is None:
            lower_hessian = self.lower_hessian(x, y, lower_batch)
        elif lower_hessian.names != names:
            raise ValueError("lower_hessian was built over other lower variables than this "
                             "problem solves over; rebuild it with problem.lower_hessian(...)")

        x_leaves = _leaves(x)
        y_leaves = _leaves({n: y[n] for n in names})
        with torch.enable_grad():
            loss = _check_loss(self.upper_loss(x_leaves, {**y, **y_leaves}, upper_batch), "upper")
            grads = _grads(loss, {**{("x", n): p for n, p in x_leaves.items()},
                                  **{("y", n): p for n, p in y_leaves.items()}})
        grads, loss = self._average(grads, loss)
        if self.check_finite:
            self._require_finite(loss, "upper-level loss", t)
        grad_x = {n: grads[("x", n)] for n in x}
        v = {n: grads[("y", n)] for n in names}

        uncoupled = names[len(coupled):]  # _solve_names lists the coupled names first
        head_damping = self.ij.head_damping

        def matvec(z: Params) -> Params:
            out = tree_scale(self.reducer(lower_hessian(z)), 1.0 / mu)
            reg = self.regularizer.lower_hvp(x, y, z)
            torch._foreach_add_([out[n] for n in reg], list(reg.values()))
            if uncoupled and head_damping:
                torch._foreach_add_([out[n] for n in uncoupled], [z[n] for n in uncoupled],
                                    alpha=head_damping)
            return out

        u, info = self.ij(matvec, v)
        self._handle_breakdown(info, t)
        if self.check_finite:
            self._require_finite(tree_dot(u, u), "implicit-Jacobian solution", t)

        grad_x.update(tree_axpy(-1.0, self.regularizer.mixed_vjp(x, y, u), grad_x))

        lam_grad = None
        if isinstance(self.lam, LearnableLambda):
            reg_grad = self.regularizer.lower_grad(x, y)
            inner = tree_dot({n: reg_grad[n] for n in reg_grad if n in u}, u)
            lam_grad = (-self.lam.derivative() / mu * inner).to(self.lam.rho.dtype)
        return UpperGradient(grad_x, lam_grad, loss.detach(), u, info, lam)

    def _average(self, grads: dict, loss: Tensor) -> tuple[dict, Tensor]:
        """Average gradients and the loss across ranks in one collective call."""
        if self.reducer is dict:
            return grads, loss
        averaged = self.reducer({**grads, "__loss__": loss.detach()})
        loss = averaged.pop("__loss__")
        return averaged, loss

    # -- checks ------------------------------------------------------------------------------

    def _handle_breakdown(self, info: SolveInfo, t: int) -> None:
        if info.breakdown is None or self.on_breakdown == "ignore":
            return
        message = (
            f"implicit-Jacobian solve broke down at alternation {t} after {info.iterations} "
            f"iterations: {info.breakdown}"
        )
        if self.on_breakdown == "raise":
            raise SolverBreakdownError(message, info)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    @staticmethod
    def _require_finite(value: Tensor, what: str, t: int | None = None) -> None:
        value = value.detach()
        if not bool(torch.isfinite(value)):
            where = "" if t is None else f" at alternation {t}"
            raise NonFiniteError(f"non-finite {what} ({float(value)}){where}")
