"""The lower level of a :class:`~implicitbilevel.BilevelProblem`: the variables the implicit
Jacobian solves over, the lower gradient, the curvature operator and the gradients a solver
observes.

For ``y*(x) = argmin_y G(x, y) = ℓ(y) + λ r(x, y)`` (thesis eq. 3.1, BiSSL Definition 4.1):

- the solved names ``S``: the coupled variables, or every lower variable with
  ``ij.solve_over="all"`` (Sec. 5.3.4), restricted to ``ij.subset`` (Sec. 9.1);
- the lower gradient ``∇_y ℓ + λ ∇_y r`` (Algorithm 2, lines 5-6);
- the curvature ``z ↦ ∇²_yy ℓ z`` over ``S`` (exact Hessian or Gauss–Newton), built once per
  lower point and batch and shared by the upper steps of an alternation (Algorithm 3);
- ``∇_y ℓ`` over ``S`` for a solver that observes gradients (:class:`~implicitbilevel.MFAC`).

:class:`~implicitbilevel.BilevelProblem` inherits these methods; the hypergradient that uses them
is in :mod:`implicitbilevel.problem`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._autograd import check_loss, grads_of, leaves
from ._checks import check_distinct_levels, require_finite, require_finite_grads
from .curvature.base import RNGPin
from .curvature.gauss_newton import GaussNewton, GaussNewtonOperator
from .curvature.hessian import HessianOperator, _hvp_context
from .implicit_jacobian import ImplicitJacobian, curvature_operator
from .regularizers import BaseRegularizer
from .results import LowerGradient
from .solvers.base import LinearSolver
from .subset import IJSubset
from .tree import Params, tree_axpy

__all__ = ["LowerLoss"]

LowerLoss = Callable[[Params, Any], Tensor]


class LowerLevel:
    """The lower-level methods of :class:`~implicitbilevel.BilevelProblem`, over the attributes
    its constructor sets (annotated below)."""

    lower_loss: LowerLoss
    regularizer: BaseRegularizer
    ij: ImplicitJacobian
    ij_subset: IJSubset | None
    solver: LinearSolver
    check_finite: bool
    reducer: Callable[[Mapping[Any, Tensor]], dict]
    _split_checked: bool

    if TYPE_CHECKING:
        def lam_at(self, t: int = 0) -> float: ...

    def solve_names(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> list[str]:
        """The lower variables the implicit Jacobian is solved over (``S`` above; only those in
        ``ij_subset`` when one is given)."""
        return self._subset(self._solve_names(self.regularizer.coupled_names(upper, lower), lower))

    def _subset(self, names: list[str]) -> list[str]:
        return names if self.ij_subset is None else self.ij_subset.names(names)

    def _solve_names(self, coupled: list[str], lower: Mapping[str, Tensor]) -> list[str]:
        if self.ij.solve_over == "all":
            known = set(coupled)
            return coupled + [n for n in lower if n not in known]
        return coupled

    def lower_grad(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], batch: Any, t: int = 0
    ) -> LowerGradient:
        """``∇_y ℓ(y) + λ ∇_y r(x, y)`` for every lower variable (Algorithm 2, lines 5-6)."""
        lam = self.lam_at(t)
        check_distinct_levels(upper, lower)
        self.regularizer.coupled_names(upper, lower)  # fail on a bad coupling before any pass
        y_leaves = leaves(lower)
        with torch.enable_grad():
            loss = check_loss(self.lower_loss(y_leaves, batch), "lower")
            grads = grads_of(loss, y_leaves)
        grads, loss = self._average(grads, loss)
        x = {n: p.detach() for n, p in upper.items()}
        y = {n: p.detach() for n, p in lower.items()}
        if self.check_finite:
            require_finite(loss, "lower-level loss", t)
        # Out of place: autograd may hand back expanded (stride-0) gradients.
        reg = self.regularizer.bind(batch)
        grads.update(tree_axpy(lam, reg.lower_grad(x, y), grads))
        reg_value = reg.value(x, y).detach()
        if self.check_finite:
            require_finite_grads(grads, "lower-level gradient", t)
        return LowerGradient(grads, loss.detach(), reg_value, lam)

    def lower_hessian(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], batch: Any
    ) -> HessianOperator | GaussNewtonOperator:
        """The curvature ``z ↦ ∇²_yy ℓ(y) z`` over :meth:`solve_names` at ``lower`` and ``batch``.

        The exact Hessian, or the Gauss–Newton matrix with ``ij.curvature=GaussNewton(...)``.

        Build it once and pass it to :meth:`upper_grad` for every upper step that shares the lower
        point and batch (in BiSSL: all ``N_U`` steps of an alternation). With ``reuse_graph`` it
        keeps ``ℓ``'s first-order graph alive until it is dropped.
        """
        check_distinct_levels(upper, lower)
        names = self.solve_names(upper, lower)
        fixed = {n: p.detach() for n, p in lower.items()}
        operator = curvature_operator(
            self.lower_loss, self.ij.curvature, {n: fixed[n] for n in names}, (batch,),
            embed=lambda sub: {**fixed, **sub}, mode=self.ij.hvp_mode, reuse=self.ij.reuse_graph,
        )
        if isinstance(self.ij.curvature, GaussNewton) and not self._split_checked:
            self._check_split(self.ij.curvature, fixed, batch)
        # The regulariser at this lower batch (itself unless it reads data), for the upper steps.
        operator.memo["regularizer"] = self.regularizer.bind(batch)
        if self.check_finite and operator.loss is not None:
            require_finite(operator.loss, "lower-level loss on the Hessian batch")
        return operator

    def _check_split(self, split: GaussNewton, lower: Params, batch: Any) -> None:
        """At the first use, refuse a Gauss–Newton split whose composed loss is not the lower loss
        at this point (one comparison of the two scalars, under one random state)."""
        pin = RNGPin(lower.values())
        with torch.no_grad(), _hvp_context():
            with pin():
                composed = float(split(lower, batch))
            with pin():
                direct = float(self.lower_loss(lower, batch))
        rtol = 2e-2 if torch.is_autocast_enabled() else 1e-4
        if not math.isclose(composed, direct, rel_tol=rtol, abs_tol=1e-6):
            raise ValueError(
                f"the GaussNewton split is not the lower loss: output_loss(outputs(y)) = "
                f"{composed:.6g} but lower_loss(y) = {direct:.6g} at the same point and batch. "
                "Its curvature would be that of another function: make outputs and output_loss "
                "compose to the lower loss"
            )
        self._split_checked = True

    def observe_lower_gradient(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor],
                               lower_gradient: LowerGradient) -> None:
        """Send ``∇_y ℓ`` over the solved names to the solver, if it observes gradients
        (:attr:`LinearSolver.observes_gradients <implicitbilevel.LinearSolver.observes_gradients>`:
        :class:`~implicitbilevel.MFAC`); otherwise nothing is computed.

        ``lower_gradient`` is :meth:`lower_grad`'s result at ``(upper, lower)``,
        ``∇_y ℓ + λ ∇_y r`` (Algorithm 2 line 6); the regulariser's part is taken off, so the
        solver sees gradients of the lower loss alone (whose Fisher stands in for its Hessian).
        Call it before the lower optimiser steps (the point must be the one of the gradient).
        """
        if not self.solver.observes_gradients:
            return
        x = {n: p.detach() for n, p in upper.items()}
        y = {n: p.detach() for n, p in lower.items()}
        grads = {n: lower_gradient.grads[n] for n in self.solve_names(x, y)}
        reg = self.regularizer.lower_grad(x, y)
        grads.update(tree_axpy(-lower_gradient.lam, {n: reg[n] for n in reg if n in grads},
                               grads))
        self.solver.observe(grads)

    def _average(self, grads: dict, loss: Tensor) -> tuple[dict, Tensor]:
        """Average gradients and the loss across ranks in one collective call."""
        if self.reducer is dict:
            return grads, loss
        averaged = self.reducer({**grads, "__loss__": loss.detach()})
        loss = averaged.pop("__loss__")
        return averaged, loss
