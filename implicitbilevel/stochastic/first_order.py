"""F2SA and BOME: bilevel methods with gradients only, no Hessian-vector or mixed product.

Both replace the constraint ``y = y*(x)`` by a penalty on the value-function gap
``q(x, y) = G(x, y) − min_z G(x, z) ≥ 0``. F2SA (Kwon, Kwon, Wright & Nowak, ICML 2023) follows
the Lagrangian ``f + λ_k q`` with a growing multiplier, tracking ``argmin_y f + λ_k G`` and
``argmin_z G`` with two inner iterates; its hypergradient estimate tends to the implicit one as
``λ_k → ∞``. BOME (Liu, Ye, Wright, Stone & Liu, NeurIPS 2022) takes, at each step, the
direction closest to ``∇f`` that decreases ``q`` at a rate ``η‖∇q‖²``, with ``min_z G``
approximated by ``T`` inner gradient steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .._checks import check_int
from ..problem import BilevelProblem
from ..tree import Params, tree_axpy, tree_clone, tree_dot, tree_sub
from .base import StepInfo, StepSize, StochasticBilevel, axpy_, copy_into, draw, norm
from .oracles import BilevelOracles

__all__ = ["BOME", "F2SA"]


class F2SA(StochasticBilevel):
    """F²SA, the fully first-order stochastic approximation (Kwon et al. 2023, Algorithm 1).

    ``lower`` is the inner iterate ``z ≈ argmin G(x, ·)``; the method also keeps the penalty
    iterate ``y ≈ argmin f(x, ·) + λ_k G(x, ·)`` (``penalty``, started at ``lower``) and the
    multiplier ``λ_k = min(λ_0 + δ k, λ_max)``. At step ``k``, ``T`` inner steps

    .. math::

        z \\leftarrow z - \\gamma_k \\nabla_y G(x_k, z), \\qquad
        y \\leftarrow y - \\alpha_k \\big(\\nabla_y f(x_k, y)
                                   + \\lambda_k \\nabla_y G(x_k, y)\\big),
        \\qquad \\alpha_k = \\gamma_k / \\lambda_k,

    then

    .. math::

        x_{k+1} = x_k - \\xi_k \\Big(\\nabla_x f(x_k, y)
                  + \\lambda_k \\big(\\nabla_x G(x_k, y) - \\nabla_x G(x_k, z)\\big)\\Big)

    (their Algorithm 1, eq. (8)-(10), with ``λ_k = γ_k/α_k`` as in their step-size design).
    Every gradient is on its own batch when a sampler is given. No product is ever formed; the
    implied linear-system variable ``λ_k (z − y) → [∇²_yy G]⁻¹ ∇_y f`` as ``λ_k`` grows
    (:attr:`implied_v`). ``extra`` reports ``lam``.

    Args:
        problem: a :class:`~implicitbilevel.BilevelProblem` or
            :class:`~implicitbilevel.stochastic.BilevelOracles`.
        upper: ``x`` by name (updated in place).
        lower: ``z`` by name (updated in place).
        lr_inner: ``γ_k``.
        lr_outer: ``ξ_k``.
        lam0: ``λ_0 > 0``.
        lam_increment: ``δ ≥ 0`` added to ``λ`` after every step.
        lam_max: the largest ``λ`` (``None``: no bound).
        inner_steps: ``T``.

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
        >>> method = ib.F2SA(problem, x, y, lr_inner=0.5, lr_outer=0.5, inner_steps=5)
        >>> for _ in range(150):
        ...     info = method.step(None, None)                  # full batches here
        >>> [round(v, 3) for v in x["w"].tolist() + y["w"].tolist()]
        [2.0, 2.0, 1.0, 1.0]
    """

    name = "F2SA"
    has_v = False

    def __init__(self, problem: BilevelProblem | BilevelOracles, upper: Mapping[str, Tensor],
                 lower: Mapping[str, Tensor], *, lr_inner: StepSize, lr_outer: StepSize,
                 lam0: float = 1.0, lam_increment: float = 0.1, lam_max: float | None = None,
                 inner_steps: int = 10) -> None:
        super().__init__(problem, upper, lower, lr_inner=lr_inner, lr_outer=lr_outer)
        if not lam0 > 0 or not lam_increment >= 0 or (lam_max is not None and lam_max < lam0):
            raise ValueError("F2SA needs lam0 > 0, lam_increment >= 0 and lam_max >= lam0")
        self.lam0, self.lam_increment, self.lam_max = float(lam0), float(lam_increment), lam_max
        self.inner_steps = check_int(inner_steps, "inner_steps", 1)
        self.penalty: Params = tree_clone(self.lower)

    def multiplier(self, t: int) -> float:
        """``λ_t = min(λ_0 + δ t, λ_max)``."""
        lam = self.lam0 + self.lam_increment * t
        return lam if self.lam_max is None else min(lam, float(self.lam_max))

    @property
    def implied_v(self) -> Params:
        """``λ (z − y)``, which tends to ``[∇²_yy G]⁻¹ ∇_y f`` as ``λ`` grows."""
        lam = self.multiplier(max(self.t - 1, 0))
        return {n: lam * (self.lower[n].detach() - self.penalty[n]) for n in self.lower}

    def _step(self, upper_batch: Any, lower_batch: Any, t: int) -> StepInfo:
        o, x, z, y = self.oracles, self.upper, self.lower, self.penalty
        lam, gamma, xi = self.multiplier(t), self.lr_inner(t), self.lr_outer(t)
        grad_norm = 0.0
        for _ in range(self.inner_steps):
            g_z = o.inner_grad(x, z, draw(lower_batch), t)
            _, f_y = o.outer_grads(x, y, draw(upper_batch))
            g_y = o.inner_grad(x, y, draw(lower_batch), t)
            axpy_(z, g_z, -gamma)
            axpy_(y, tree_axpy(lam, g_y, f_y), -gamma / lam)
            grad_norm = norm(g_z)
        f_x, _ = o.outer_grads(x, y, draw(upper_batch))
        gap = tree_sub(o.inner_grad_x(x, y, draw(lower_batch), t),
                       o.inner_grad_x(x, z, draw(lower_batch), t))
        d_x = tree_axpy(lam, gap, f_x)
        axpy_(x, d_x, -xi)
        return StepInfo(t, grad_norm, None, norm(d_x), gamma, xi, extra={"lam": lam})

    def _extra_state(self) -> dict[str, Any]:
        return {"penalty": tree_clone(self.penalty)}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        copy_into(self.penalty, state["penalty"], "state['penalty']")


class BOME(StochasticBilevel):
    """BOME, Bilevel Optimization Made Easy (Liu et al. 2022, Algorithm 1).

    At ``(x_k, y_k)``: ``T`` gradient steps ``θ ← θ − α ∇_y G(x_k, θ)`` from ``θ = y_k`` give
    ``θ_k ≈ y*(x_k)``; with ``q̂(x, y) = G(x, y) − G(x, θ_k)``,

    .. math::

        \\nabla \\hat q = \\big(\\nabla_x G(x_k, y_k) - \\nabla_x G(x_k, \\theta_k),\\;
                               \\nabla_y G(x_k, y_k)\\big), \\qquad
        \\lambda_k = \\max\\Big(\\frac{\\eta \\|\\nabla \\hat q\\|^2
                     - \\langle \\nabla f, \\nabla \\hat q \\rangle}{\\|\\nabla \\hat q\\|^2},
                     0\\Big),

        (x, y)_{k+1} = (x, y)_k - \\xi\\, (\\nabla f + \\lambda_k \\nabla \\hat q)

    (their eq. (5)-(7) with ``φ_k = η‖∇q̂‖²``): the inner steps take ``α = lr_inner``, the joint
    step of ``(x, y)`` takes ``ξ = lr_outer``. ``∇q̂`` is evaluated on one lower batch, each
    inner step on its own when a sampler is given. ``extra`` reports ``lam``.

    Args:
        problem: a :class:`~implicitbilevel.BilevelProblem` or
            :class:`~implicitbilevel.stochastic.BilevelOracles`.
        upper: ``x`` by name (updated in place).
        lower: ``y`` by name (updated in place).
        lr_inner: ``α``, the step of the inner gradient steps.
        lr_outer: ``ξ``, the step of ``(x, y)``.
        eta: ``η > 0``.
        inner_steps: ``T``.

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
        >>> method = ib.BOME(problem, x, y, lr_inner=0.5, lr_outer=0.5)
        >>> for _ in range(100):
        ...     info = method.step(None, None)                  # full batches here
        >>> [round(v, 3) for v in x["w"].tolist() + y["w"].tolist()]
        [2.0, 2.0, 1.0, 1.0]
    """

    name = "BOME"
    has_v = False

    def __init__(self, problem: BilevelProblem | BilevelOracles, upper: Mapping[str, Tensor],
                 lower: Mapping[str, Tensor], *, lr_inner: StepSize, lr_outer: StepSize,
                 eta: float = 0.5, inner_steps: int = 10) -> None:
        super().__init__(problem, upper, lower, lr_inner=lr_inner, lr_outer=lr_outer)
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta!r}")
        self.eta = float(eta)
        self.inner_steps = check_int(inner_steps, "inner_steps", 1)

    def _step(self, upper_batch: Any, lower_batch: Any, t: int) -> StepInfo:
        o, x, y = self.oracles, self.upper, self.lower
        alpha, xi = self.lr_inner(t), self.lr_outer(t)
        theta = tree_clone(y)
        for _ in range(self.inner_steps):
            theta = tree_axpy(-alpha, o.inner_grad(x, theta, draw(lower_batch), t), theta)
        batch = draw(lower_batch)
        q_y = o.inner_grad(x, y, batch, t)
        q_x = tree_sub(o.inner_grad_x(x, y, batch, t), o.inner_grad_x(x, theta, batch, t))
        f_x, f_y = o.outer_grads(x, y, draw(upper_batch))
        q_norm2 = float(tree_dot(q_x, q_x) + tree_dot(q_y, q_y))
        lam = 0.0
        if q_norm2 > 0:
            dot = float(tree_dot(f_x, q_x) + tree_dot(f_y, q_y))
            lam = max(self.eta * q_norm2 - dot, 0.0) / q_norm2
        d_y, d_x = tree_axpy(lam, q_y, f_y), tree_axpy(lam, q_x, f_x)
        axpy_(y, d_y, -xi)
        axpy_(x, d_x, -xi)
        return StepInfo(t, norm(q_y), None, norm(d_x), alpha, xi, extra={"lam": lam})
