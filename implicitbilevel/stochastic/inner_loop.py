"""stocBiO and AmIGO: a few warm-started inner SGD steps, then an approximate solve for ``v`` and
one step of ``x`` along the resulting hypergradient estimate.

Both estimate ``∇h(x) = ∇_x f − ∇²_xy G · v`` with ``∇²_yy G · v = ∇_y f`` at the current
inner iterate; they differ in how ``v`` is found: stocBiO by a truncated Neumann series from
scratch each step (Ji, Yang & Liang, ICML 2021), AmIGO by SGD on the quadratic
``½ vᵀ ∇²_yy G v − vᵀ ∇_y f`` warm-started from the previous step's ``v`` (Arbel & Mairal, ICLR
2022), which amortises the solve across steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .._checks import check_int
from ..problem import BilevelProblem
from ..tree import Params, tree_axpy, tree_scale, tree_sub
from .base import StepInfo, StepSize, StochasticBilevel, _as_step, axpy_, draw, is_sampler, norm
from .oracles import BilevelOracles
from .products import Curvature

__all__ = ["AmIGO", "StocBiO"]


def inner_sgd(method: StochasticBilevel, lower_batch: Any, steps: int, lr: float, t: int
              ) -> float:
    """``steps`` warm-started SGD steps ``y ← y − α ∇_y G`` at the current ``x``; returns the
    norm of the last gradient."""
    grad_norm = 0.0
    for _ in range(steps):
        grad = method.oracles.inner_grad(method.upper, method.lower, draw(lower_batch), t)
        axpy_(method.lower, grad, -lr)
        grad_norm = norm(grad)
    return grad_norm


class _Products:
    """Curvature products at the current point: a fresh batch per product from a sampler, one
    kept graph for every product when the lower batch is a single batch."""

    def __init__(self, method: StochasticBilevel, lower_batch: Any, t: int) -> None:
        self._method, self._batch, self._t = method, lower_batch, t
        self._shared: Curvature | None = None
        if not is_sampler(lower_batch):
            self._shared = method.oracles.curvature(method.upper, method.lower, lower_batch, t)

    def next(self) -> Curvature:
        if self._shared is not None:
            return self._shared
        m = self._method
        return m.oracles.curvature(m.upper, m.lower, draw(self._batch), self._t)


class StocBiO(StochasticBilevel):
    """stocBiO (Ji, Yang & Liang 2021, Algorithm 2 with the Neumann estimate of Algorithm 3).

    At step ``k``, ``T`` warm-started inner steps ``y ← y − α ∇_y G(x_k, y; S_t)``, then at
    ``(x_k, y_k)``:

    .. math::

        v_Q = \\eta \\sum_{q=-1}^{Q-1} \\prod_{j=Q-q}^{Q}
              \\big(I - \\eta \\nabla^2_{yy} G(x_k, y_k; B_j)\\big)\\, \\nabla_y f(x_k, y_k; D_F),

        \\widehat{\\nabla} h(x_k) = \\nabla_x f(x_k, y_k; D_F)
            - \\nabla^2_{xy} G(x_k, y_k; D_G)\\, v_Q, \\qquad
        x_{k+1} = x_k - \\beta\\, \\widehat{\\nabla} h(x_k)

    (their eq. (4)-(5); ``Q`` products, ``Q + 1`` terms). ``v`` is recomputed from zero every
    step and kept only for inspection. ``v_residual`` is ``‖(I − ηĤ)^Q ∇_y f‖``, the last term of
    the series: with one lower batch, the residual ``‖∇_y f − Ĥ v‖`` of the series without it.

    Cost per step: ``T`` inner gradients, ``Q`` curvature products, one mixed product, one
    ``(∇_x f, ∇_y f)``.

    Args:
        problem: a :class:`~implicitbilevel.BilevelProblem` or
            :class:`~implicitbilevel.stochastic.BilevelOracles`.
        upper: ``x`` by name (updated in place).
        lower: ``y`` by name (updated in place).
        lr_inner: ``α``, the inner SGD step.
        lr_outer: ``β``, the outer step.
        neumann_lr: ``η`` (below ``1/L`` for a convergent series; default ``lr_inner``).
        inner_steps: ``T``.
        neumann_steps: ``Q``.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> c = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> problem = ib.BilevelProblem(
        ...     lambda x, y, batch: 0.5 * ((y["w"] - c) ** 2).sum(),   # f(x, y)
        ...     lambda y, batch: 0.5 * (y["w"] ** 2).sum(),            # G = |y|^2/2 + |x - y|^2/2
        ...     lam=1.0, regularizer=ib.ProximalL2())                  # y*(x) = x/2, x* = 2c
        >>> x = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> y = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> method = ib.StocBiO(problem, x, y, lr_inner=0.5, lr_outer=0.5)
        >>> for _ in range(80):
        ...     info = method.step(None, None)                  # full batches here
        >>> [round(v, 3) for v in x["w"].tolist() + y["w"].tolist()]
        [2.0, 2.0, 1.0, 1.0]
    """

    name = "stocBiO"

    def __init__(self, problem: BilevelProblem | BilevelOracles, upper: Mapping[str, Tensor],
                 lower: Mapping[str, Tensor], *, lr_inner: StepSize, lr_outer: StepSize,
                 neumann_lr: StepSize | None = None, inner_steps: int = 10,
                 neumann_steps: int = 10) -> None:
        super().__init__(problem, upper, lower, lr_inner=lr_inner, lr_outer=lr_outer)
        self.neumann_lr = self.lr_inner if neumann_lr is None else _as_step(neumann_lr,
                                                                             "neumann_lr")
        self.inner_steps = check_int(inner_steps, "inner_steps", 1)
        self.neumann_steps = check_int(neumann_steps, "neumann_steps", 0)

    def _step(self, upper_batch: Any, lower_batch: Any, t: int) -> StepInfo:
        alpha, beta, eta = self.lr_inner(t), self.lr_outer(t), self.neumann_lr(t)
        grad_norm = inner_sgd(self, lower_batch, self.inner_steps, alpha, t)
        fx, fy = self.oracles.outer_grads(self.upper, self.lower, draw(upper_batch))
        products = _Products(self, lower_batch, t)
        term, total = fy, dict(fy)
        for _ in range(self.neumann_steps):  # p ← (I − ηĤ_j) p, s ← s + p
            term = tree_axpy(-eta, products.next().hvp(term), term)
            total = {n: total[n] + term[n] for n in total}
        v = tree_scale(total, eta)
        d_x = tree_sub(fx, products.next().cross(v))
        axpy_(self.upper, d_x, -beta)
        assert self.v is not None
        for n, value in v.items():
            self.v[n].copy_(value)
        return StepInfo(t, grad_norm, norm(term), norm(d_x), alpha, beta)


class AmIGO(StochasticBilevel):
    """AmIGO (Arbel & Mairal 2022, Algorithm 1 with SGD inner and linear solvers).

    At step ``k``: ``T`` warm-started inner steps ``y ← y − α ∇_y ĝ(x_k, y)``; at ``(x_k, y_k)``
    the outer gradients ``∇_x f̂``, ``∇_y f̂``; ``M`` warm-started SGD steps on
    ``½ vᵀ ∇²_yy ĝ v − vᵀ ∇_y f̂``,

    .. math::

        v \\leftarrow v - \\beta\\, \\big(\\nabla^2_{yy} \\hat g(x_k, y_k)\\, v
                                        - \\nabla_y \\hat f(x_k, y_k)\\big),

    then ``ψ_k = ∇_x f̂ − ∇²_xy ĝ(x_k, y_k) v`` and ``x_{k+1} = x_k − γ ψ_k`` (their
    Algorithm 1; the warm start of ``v`` is the amortisation their analysis rests on). Each
    ``ĝ`` is a fresh lower batch when a sampler is given. ``v_residual`` is the norm of the last
    ``v``-step's direction ``‖∇²_yy ĝ v − ∇_y f̂‖``.

    Args:
        problem: a :class:`~implicitbilevel.BilevelProblem` or
            :class:`~implicitbilevel.stochastic.BilevelOracles`.
        upper: ``x`` by name (updated in place).
        lower: ``y`` by name (updated in place).
        lr_inner: ``α``.
        lr_outer: ``γ``.
        lr_v: ``β`` (default ``α``).
        inner_steps: ``T``.
        v_steps: ``M``.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> c = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> problem = ib.BilevelProblem(
        ...     lambda x, y, batch: 0.5 * ((y["w"] - c) ** 2).sum(),   # f(x, y)
        ...     lambda y, batch: 0.5 * (y["w"] ** 2).sum(),            # G = |y|^2/2 + |x - y|^2/2
        ...     lam=1.0, regularizer=ib.ProximalL2())                  # y*(x) = x/2, x* = 2c
        >>> x = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> y = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> method = ib.AmIGO(problem, x, y, lr_inner=0.5, lr_outer=0.5)
        >>> for _ in range(80):
        ...     info = method.step(None, None)                  # full batches here
        >>> [round(v, 3) for v in x["w"].tolist() + y["w"].tolist()]
        [2.0, 2.0, 1.0, 1.0]
    """

    name = "AmIGO"

    def __init__(self, problem: BilevelProblem | BilevelOracles, upper: Mapping[str, Tensor],
                 lower: Mapping[str, Tensor], *, lr_inner: StepSize, lr_outer: StepSize,
                 lr_v: StepSize | None = None, inner_steps: int = 10, v_steps: int = 10) -> None:
        super().__init__(problem, upper, lower, lr_inner=lr_inner, lr_outer=lr_outer, lr_v=lr_v)
        self.inner_steps = check_int(inner_steps, "inner_steps", 1)
        self.v_steps = check_int(v_steps, "v_steps", 1)

    def _step(self, upper_batch: Any, lower_batch: Any, t: int) -> StepInfo:
        alpha, gamma, beta = self.lr_inner(t), self.lr_outer(t), self.lr_v(t)
        grad_norm = inner_sgd(self, lower_batch, self.inner_steps, alpha, t)
        fx, fy = self.oracles.outer_grads(self.upper, self.lower, draw(upper_batch))
        products = _Products(self, lower_batch, t)
        v = self.v
        assert v is not None
        residual: Params = {}
        for _ in range(self.v_steps):
            residual = tree_sub(products.next().hvp(v), fy)
            axpy_(v, residual, -beta)
        d_x = tree_sub(fx, products.next().cross(v))
        axpy_(self.upper, d_x, -gamma)
        return StepInfo(t, grad_norm, norm(residual), norm(d_x), alpha, gamma)
