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

How the system is formed and solved is one value, ``ij=``
:class:`~implicitbilevel.ImplicitJacobian`; its fields below are written ``ij.<field>``.

- ``S`` = the coupled variables (``ij.solve_over="coupled"``, default; the pretext head is held
  fixed, Prop. 4.2), or every lower variable (``ij.solve_over="all"``: the concatenated head, Sec.
  5.3.4, Cor. 5.6, where the bracket becomes ``diag(I, 0) + H_ω/μ``, indefinite in general, so the
  default solver there is :class:`~implicitbilevel.MINRES`; ``ij.head_damping = ε`` adds ``εI``
  on the head block).
- ``ij.subset`` restricts ``S`` to named variables (the BatchNorm affine parameters, Sec. 9.1),
  the curvature elsewhere taken as zero: ``u = v`` (or ``0``) on the other coupled names
  (:mod:`implicitbilevel.subset`).
- ``∇²_yy ℓ`` is the exact Hessian (``ij.curvature="hessian"``) or, for a lower loss given as
  ``ℓ(y) = L(z(y))`` with ``L`` convex in the outputs ``z``, the generalised Gauss–Newton matrix
  ``Jᵀ∇²L J`` (``ij.curvature=GaussNewton(outputs, output_loss)``), positive semi-definite by
  construction, so ``I + G/μ`` is positive definite and CG converges.
- A learnable ``λ = σ(ρ)`` makes ``ρ`` a parameter of the problem itself
  (:attr:`~BilevelProblem.params`, ``{"lam.rho": ρ}``), optimised with the upper level. Its
  gradient, returned in the upper gradient dict under ``"lam.rho"``, is
  ``dF/dρ = −σ'(ρ)/ν · ⟨∇_y r, u⟩`` with the same ``u`` and ``ν = λ + λ_damp^ρ`` (the learnable
  λ's own damping, by default ``λ_damp``); for the proximal regulariser that is eq. 5.6,
  ``σ'(ρ)/(σ(ρ)+λ_damp^ρ) ⟨θ_D − θ_P, u⟩``: one dot product on top of the solve.

The lower-level gradient is ``∇_y ℓ + λ ∇_y r`` (Algorithm 2 line 6: ``∇_θ L^P + λ(θ_P − θ_D)``).
Both gradients come back as dicts with the names of the inputs (the upper one also with the
problem's own :attr:`~BilevelProblem.params`), ready for ``torch.optim``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._autograd import check_loss, grads_of, leaves
from ._checks import check_distinct_levels, require_finite, require_finite_grads
from ._lower_level import LowerLevel, LowerLoss
from .curvature.gauss_newton import GaussNewtonOperator
from .curvature.hessian import HessianOperator
from .errors import NonFiniteError
from .implicit_jacobian import IJSystem, ImplicitJacobian, from_legacy, implicit_step
from .lam import LambdaSchedule, LearnableLambda, as_lambda
from .regularizers import BaseRegularizer, ProximalL2
from .results import LAM_RHO, LowerGradient, UpperGradient, assign_grads
from .solvers.base import LinearSolver
from .solvers.cg import CG
from .solvers.minres import MINRES
from .tree import Params, tree_axpy, tree_dot

__all__ = [
    "BilevelProblem",
    "LowerGradient",
    "NonFiniteError",
    "UpperGradient",
    "assign_grads",
]

#: The keywords BilevelProblem took before ImplicitJacobian (deprecated).
_PROBLEM_LEGACY = ("ij", "damping", "curvature", "solve_over", "head_damping", "ij_subset",
                   "ij_outside", "hvp_mode", "reuse_graph", "on_breakdown")

UpperLoss = Callable[[Params, Params, Any], Tensor]


class BilevelProblem(LowerLevel):
    """A bilevel problem whose hypergradient is computed by implicit differentiation.

    Args:
        upper_loss: ``f(upper, lower, batch) -> scalar``. For BiSSL use
            :func:`implicitbilevel.bissl.bissl_upper_loss`, which builds
            ``L^D(θ_P, φ_D) + L^D(θ_D, φ_D)`` from the downstream loss.
        lower_loss: ``ℓ(lower, batch) -> scalar`` (BiSSL: the pretext loss ``L^P(θ_P, φ_P)``).
        lam: λ > 0 as a float, a :class:`~implicitbilevel.LambdaSchedule` evaluated at the
            alternation ``t``, or a :class:`~implicitbilevel.LearnableLambda` (whose ``ρ`` then
            becomes the problem parameter ``"lam.rho"``, see ``params`` below).
        regularizer: the coupling ``r(x, y)``; default :class:`ProximalL2` over every name the two
            levels share.
        ij: how the implicit-Jacobian system is formed and solved, an
            :class:`~implicitbilevel.ImplicitJacobian`: the solver (default ``CG()`` over the
            coupled variables, ``MINRES()`` over all of them), ``damping`` ``λ_damp`` (the system
            is evaluated with ``μ = λ + λ_damp``, Algorithm 3; thesis default 10, 0 for the exact
            hypergradient; a learnable λ's gradient uses it too unless the
            :class:`~implicitbilevel.LearnableLambda` has a ``damping`` of its own), the
            curvature (exact Hessian or Gauss–Newton), ``solve_over`` (``"coupled"``, Prop. 4.2,
            or ``"all"``, the concatenated head, Sec. 5.3.4) with ``head_damping``, a ``subset``
            of the solved names (Sec. 9.1), the product mode, graph reuse and the breakdown
            policy. A bare :class:`~implicitbilevel.LinearSolver`, and the keywords ``damping``,
            ``solve_over``, ``head_damping``, ``curvature``, ``ij_subset``, ``ij_outside``,
            ``hvp_mode``, ``reuse_graph`` and ``on_breakdown`` of earlier releases, are still
            accepted with a ``DeprecationWarning``.
        check_finite: raise :class:`NonFiniteError` on a NaN/inf loss, solution or returned
            gradient, naming it (one host synchronisation per check).
        reducer: averages batch-dependent dicts across data-parallel ranks (gradients of ``ℓ`` and
            ``f``, every Hessian-vector product, the loss values), e.g.
            :class:`~implicitbilevel.distributed.AllReduceMean`. ``None``: a single process.

    The problem's own upper-level parameters (a learnable λ's ``ρ``) are :attr:`params`.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> b, c = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> lam = torch.tensor(0.5, dtype=torch.float64)
        >>> def lower_loss(y, batch):                     # l(y) = 1/2 y^T Q y - b^T y
        ...     return 0.5 * y["w"] @ Q @ y["w"] - b @ y["w"]
        >>> def upper_loss(x, y, batch):                  # f(x, y) = 1/2 ||y - c||^2
        ...     return 0.5 * ((y["w"] - c) ** 2).sum()
        >>> x = {"w": torch.tensor([0.2, -0.1], dtype=torch.float64, requires_grad=True)}
        >>> QL = Q + lam * torch.eye(2, dtype=torch.float64)
        >>> y = {"w": torch.linalg.solve(QL, b + lam * x["w"].detach()).requires_grad_()}  # y*(x)
        >>> problem = ib.BilevelProblem(upper_loss, lower_loss, lam=float(lam),
        ...                             regularizer=ib.ProximalL2(),
        ...                             ij=ib.ImplicitJacobian(ib.Dense()))
        >>> out = problem.upper_grad(x, y, upper_batch=None, lower_batch=None)    # eq. 4.9
        >>> exact = lam * torch.linalg.solve(QL, y["w"].detach() - c)            # d/dx f(x, y*(x))
        >>> torch.allclose(out.grads["w"], exact)
        True
        >>> low = problem.lower_grad(x, y, batch=None)   # grad l + lam (y - x) vanishes at y*
        >>> float(low.grads["w"].abs().max()) < 1e-12
        True
    """

    def __init__(
        self,
        upper_loss: UpperLoss,
        lower_loss: LowerLoss,
        *,
        lam: float | LambdaSchedule | LearnableLambda,
        regularizer: BaseRegularizer | None = None,
        ij: ImplicitJacobian | LinearSolver | None = None,
        check_finite: bool = True,
        reducer: Callable[[Mapping[Any, Tensor]], dict] | None = None,
        **legacy: Any,
    ) -> None:
        self.upper_loss = upper_loss
        self.lower_loss = lower_loss
        self.lam = as_lambda(lam)
        self.regularizer = ProximalL2() if regularizer is None else regularizer
        self.ij = from_legacy(ij, legacy, "BilevelProblem", allowed=_PROBLEM_LEGACY)
        self.ij_subset = self.ij.ij_subset()
        if (self.ij_subset is not None and self.ij.outside == "identity"
                and not self.regularizer.identity_lower_hessian):
            raise ValueError("outside='identity' (u = v outside the subset) solves the system "
                             "only where the regulariser's lower Hessian is the identity "
                             "(ProximalL2); use ImplicitJacobian(outside='zero') with this "
                             "regulariser")
        self._split_checked = False
        solver = self.ij.solver
        self.solver: LinearSolver = solver if solver is not None else (
            CG() if self.ij.solve_over == "coupled" else MINRES())
        self.check_finite = check_finite
        self.reducer = reducer if reducer is not None else dict

    # -- λ -----------------------------------------------------------------------------------

    @property
    def params(self) -> Params:
        """The problem's own upper-level parameters by name, ``{"lam.rho": ρ}`` for a learnable
        λ and ``{}`` otherwise.

        :meth:`upper_grad` returns their gradients in ``UpperGradient.grads`` under these names,
        next to the upper variables', so ``{**upper, **problem.params}`` is everything the upper
        optimiser updates (register these tensors with it), clips, checkpoints and broadcasts.
        """
        if isinstance(self.lam, LearnableLambda):
            return {LAM_RHO: self.lam.rho}
        return {}

    def lam_at(self, t: int = 0) -> float:
        """λ at alternation ``t`` (the current value for a learnable λ)."""
        value = self.lam(t)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"λ must stay finite and > 0, got {value} at alternation {t}")
        return value

    # -- the lower level: inherited from LowerLevel (implicitbilevel._lower_level) ------------

    # -- the upper level ---------------------------------------------------------------------

    def upper_grad(
        self,
        upper: Mapping[str, Tensor],
        lower: Mapping[str, Tensor],
        upper_batch: Any,
        lower_batch: Any = None,
        *,
        t: int = 0,
        lower_hessian: HessianOperator | GaussNewtonOperator | None = None,
    ) -> UpperGradient:
        """The hypergradient ``dF/dx`` (eq. 4.9 / Cor. 5.6) and, for a learnable λ, ``dF/dρ``.

        ``dF/dρ`` (eq. 5.6) is in the returned ``grads`` under ``"lam.rho"``, the name of ``ρ`` in
        :attr:`params`.

        Args:
            upper: the upper variables ``x`` (θ_D, φ_D), without the problem's own :attr:`params`.
            lower: the lower variables ``y`` at (approximately) the lower solution (θ_P, φ_P).
            upper_batch: the batch for ``f``.
            lower_batch: the batch for ``ℓ``'s Hessian (unused when ``lower_hessian`` is given).
            t: the alternation, for a λ schedule.
            lower_hessian: a :meth:`lower_hessian` operator to reuse.
        """
        lam = self.lam_at(t)
        mu = lam + self.ij.damping
        clash = sorted(set(upper) & set(self.params))
        if clash:
            raise ValueError(f"the upper variables must not contain the problem's own parameters "
                             f"{clash} (problem.params): their gradients are returned under "
                             "these names")
        check_distinct_levels(upper, lower)
        x = {n: p.detach() for n, p in upper.items()}
        y = {n: p.detach() for n, p in lower.items()}
        coupled = self.regularizer.coupled_names(x, y)
        solved = self._solve_names(coupled, y)  # every solved name; the system is over `names`
        names = self._subset(solved)
        if lower_hessian is None:
            lower_hessian = self.lower_hessian(x, y, lower_batch)
        elif lower_hessian.names != names:
            raise ValueError("lower_hessian was built over other lower variables than this "
                             "problem solves over; rebuild it with problem.lower_hessian(...)")
        else:  # bound to its point: refuse one built at other values (or changed via .data)
            lower_hessian.check_point(at=y)
        reg = lower_hessian.memo.get("regularizer", self.regularizer)

        x_leaves = leaves(x)
        y_leaves = leaves({n: y[n] for n in solved})
        with torch.enable_grad():
            loss = check_loss(self.upper_loss(x_leaves, {**y, **y_leaves}, upper_batch), "upper")
            grads = grads_of(loss, {**{("x", n): p for n, p in x_leaves.items()},
                                  **{("y", n): p for n, p in y_leaves.items()}})
        grads, loss = self._average(grads, loss)
        if self.check_finite:
            require_finite(loss, "upper-level loss", t)
        grad_x = {n: grads[("x", n)] for n in x}
        v_solved = {n: grads[("y", n)] for n in solved}
        v = {n: v_solved[n] for n in names}

        def complete(u_: Params) -> Params:  # u outside ij_subset (implicitbilevel.subset)
            subset = self.ij_subset
            return u_ if subset is None else subset.complete(u_, v_solved, coupled)

        system = self.system(x, y, lower_hessian, mu, coupled)
        step = implicit_step(
            system, v, self.solver, lambda u_: reg.mixed_vjp(x, y, complete(u_)),
            on_breakdown=self.ij.on_breakdown, check_finite=self.check_finite,
            where="implicit-Jacobian solve", t=t, stacklevel=2,
        )
        u, info = step.u, step.info
        grad_x.update(tree_axpy(-1.0, step.mixed, grad_x))

        if isinstance(self.lam, LearnableLambda):
            # eq. 5.6: −σ'(ρ)/(σ(ρ) + λ_damp^ρ) ⟨∇_y r, u⟩, u from the solve above (damped with μ).
            reg_grad, u_all = reg.lower_grad(x, y), complete(u)
            inner = tree_dot({n: reg_grad[n] for n in reg_grad if n in u_all}, u_all)
            scale = self.lam.gradient_scale(self.ij.damping)
            grad_x[LAM_RHO] = (-scale * inner).to(self.lam.rho.dtype)
        if self.check_finite:
            require_finite_grads(grad_x, "upper-level gradient (hypergradient)", t)
        return UpperGradient(grad_x, loss.detach(), u, info, lam, v, system, step.prepare_seconds)

    def system(
        self,
        upper: Mapping[str, Tensor],
        lower: Mapping[str, Tensor],
        lower_hessian: HessianOperator | GaussNewtonOperator,
        mu: float,
        coupled: list[str] | None = None,
    ) -> IJSystem:
        """The implicit-Jacobian operator ``A = ∇²_yy r + (∇²_yy ℓ)/μ`` over the solved names."""
        if coupled is None:
            coupled = self.regularizer.coupled_names(upper, lower)
        reg = lower_hessian.memo.get("regularizer", self.regularizer)
        names = lower_hessian.names
        known = set(coupled)
        uncoupled = [n for n in names if n not in known]
        if reg.identity_lower_hessian:
            identity, lower_hvp = [n for n in names if n in known], None
        else:
            identity = None

            def lower_hvp(z: Params) -> Params:
                return reg.lower_hvp(upper, lower, z)

        return IJSystem(lower_hessian, mu, identity=identity, lower_hvp=lower_hvp,
                        ridge=self.ij.head_damping, ridge_names=uncoupled, reducer=self.reducer)
