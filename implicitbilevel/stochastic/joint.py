"""SOBA and SABA: ``y``, ``v`` and ``x`` move together along three directions (Dagréou, Ablin,
Vaiter & Moreau, NeurIPS 2022).

The hypergradient is ``∇h(x) = ∇_x f(x, y*) − ∇²_xy G(x, y*) · v*`` with
``∇²_yy G(x, y*) · v* = ∇_y f(x, y*)`` (their eq. (2)-(3), with ``v`` of the opposite sign here).
The framework (their Sec. 2) follows three directions at once,

.. math::

    D_y = \\nabla_y G(x, y), \\quad
    D_v = \\nabla^2_{yy} G(x, y)\\, v - \\nabla_y f(x, y), \\quad
    D_x = \\nabla_x f(x, y) - \\nabla^2_{xy} G(x, y)\\, v,

    y \\leftarrow y - \\rho_t D_y, \\quad v \\leftarrow v - \\rho_t D_v, \\quad
    x \\leftarrow x - \\gamma_t D_x,

every direction evaluated at the same ``(x, y, v)`` before any of them moves. Each direction is a
sum over samples, so a minibatch gives an unbiased estimate (SOBA, their Sec. 3.1) and SAGA's
memory a variance-reduced one (SABA, Sec. 3.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._checks import check_int
from ..problem import BilevelProblem
from ..tree import Params, tree_add, tree_sub
from .base import PolynomialDecay, StepInfo, StepSize, StochasticBilevel, axpy_, draw, norm
from .memory import SampleMemory, check_indices
from .oracles import BilevelOracles

__all__ = ["SABA", "SOBA"]


class SOBA(StochasticBilevel):
    """SOBA: one minibatch estimate of each direction per step (Dagréou et al. 2022, Sec. 3.1).

    On a lower batch ``i`` and an upper batch ``j`` at ``(x_t, y_t, v_t)``:

    .. math::

        y_{t+1} = y_t - \\rho_t \\nabla_y G_i, \\quad
        v_{t+1} = v_t - \\rho_t \\big(\\nabla^2_{yy} G_i\\, v_t - \\nabla_y f_j\\big), \\quad
        x_{t+1} = x_t - \\gamma_t \\big(\\nabla_x f_j - \\nabla^2_{xy} G_i\\, v_t\\big)

    (their eq. (4)-(5) with the SOBA estimates). Their Theorem 1 takes
    ``ρ_t = ρ̄ t^(−2/5)`` and ``γ_t = γ̄ t^(−3/5)``: :meth:`paper_step_sizes`.

    Cost per step: one ``∇_y G``, one ``∇²_yy G · v`` and one ``∇²_xy G · v`` on the lower batch
    (one kept graph), one ``(∇_x f, ∇_y f)`` on the upper batch. ``v_residual`` is ``‖D_v‖``.

    Args:
        problem: a :class:`~implicitbilevel.BilevelProblem` or
            :class:`~implicitbilevel.stochastic.BilevelOracles`.
        upper: ``x`` by name (updated in place).
        lower: ``y`` by name (updated in place).
        lr_inner: ``ρ_t`` (a number, a :class:`~implicitbilevel.stochastic.PolynomialDecay` or
            ``t -> float``).
        lr_outer: ``γ_t``.
        lr_v: the step of ``v`` when it differs from ``ρ_t``.

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
        >>> method = ib.SOBA(problem, x, y, lr_inner=0.5, lr_outer=0.5)
        >>> for _ in range(100):
        ...     info = method.step(None, None)                  # full batches here
        >>> [round(v, 3) for v in x["w"].tolist() + y["w"].tolist()]
        [2.0, 2.0, 1.0, 1.0]
    """

    name = "SOBA"

    @staticmethod
    def paper_step_sizes(rho: float, gamma: float) -> dict[str, PolynomialDecay]:
        """``lr_inner = ρ̄ (t+1)^(−2/5)``, ``lr_outer = γ̄ (t+1)^(−3/5)`` (their Theorem 1)."""
        return {"lr_inner": PolynomialDecay(rho, 0.4), "lr_outer": PolynomialDecay(gamma, 0.6)}

    def _step(self, upper_batch: Any, lower_batch: Any, t: int) -> StepInfo:
        x, y, v = self.upper, self.lower, self.v
        assert v is not None
        grad, hvp, cross = self.oracles.second_order(x, y, v, draw(lower_batch), t)
        fx, fy = self.oracles.outer_grads(x, y, draw(upper_batch))
        return _joint_update(self, t, grad, tree_sub(hvp, fy), tree_sub(fx, cross))


def _joint_update(method: StochasticBilevel, t: int, d_y: Params, d_v: Params, d_x: Params
                  ) -> StepInfo:
    """``y −= ρ D_y``, ``v −= ρ_v D_v``, ``x −= γ D_x`` (all computed before any move)."""
    rho, gamma = method.lr_inner(t), method.lr_outer(t)
    axpy_(method.lower, d_y, -rho)
    assert method.v is not None
    axpy_(method.v, d_v, -method.lr_v(t))
    axpy_(method.upper, d_x, -gamma)
    return StepInfo(t, norm(d_y), norm(d_v), norm(d_x), rho, gamma)


class SABA(SOBA):
    """SABA: SOBA's directions with SAGA's memory on every sampled term (Dagréou et al. 2022,
    Sec. 3.2, Algorithm 2).

    With ``w`` the memory of each sampled term (:mod:`implicitbilevel.stochastic.memory`) and
    ``B``, ``B'`` the lower and upper batches,

    .. math::

        D^t = \\frac{1}{|B|} \\sum_{i \\in B} \\big(\\varphi_i(x_t, y_t, v_t) - w_i^t\\big)
              + \\frac1n \\sum_{i'=1}^n w_{i'}^t

    for each of ``φ_i ∈ {∇_y G_i, ∇²_yy G_i v, ∇²_xy G_i v}`` over the ``n_inner`` lower samples
    and ``{∇_x f_j, ∇_y f_j}`` over the ``n_outer`` upper ones; the directions are then SOBA's,
    ``D_y = D^t[∇_y G]``, ``D_v = D^t[∇²_yy G v] − D^t[∇_y f]``,
    ``D_x = D^t[∇_x f] − D^t[∇²_xy G v]``, with constant steps ``ρ``, ``γ`` (their Theorem 2;
    linear convergence under the Polyak–Łojasiewicz condition, Theorem 3). Terms that read no
    batch (a :class:`~implicitbilevel.ProximalL2` regulariser of a
    :class:`~implicitbilevel.BilevelProblem`) are added exactly instead of memorised.

    Batches follow the sampler contract of :mod:`implicitbilevel.stochastic.memory`: dicts with
    an ``"index"`` entry of distinct sample indices, and losses that are means over the rows.
    The memory is per sample index (``n × size`` numbers per term), starts at zero, and is part
    of :meth:`~implicitbilevel.stochastic.StochasticBilevel.state_dict`, so a run killed and
    resumed continues exactly. Per-row values come from one vectorised call per batch
    (:meth:`BilevelOracles.per_sample`).

    Args:
        problem: a :class:`~implicitbilevel.BilevelProblem` or
            :class:`~implicitbilevel.stochastic.BilevelOracles`.
        upper: ``x`` by name (updated in place).
        lower: ``y`` by name (updated in place).
        n_inner: the number of lower samples (indices lie in ``[0, n_inner)``).
        n_outer: the number of upper samples.
        lr_inner: ``ρ``.
        lr_outer: ``γ``.
        lr_v: the step of ``v`` when it differs from ``ρ``.
        check_finite_sum: on the first step, compare the mean of the per-row values with the
            batch's own gradients (one extra call each) and refuse losses that are not means
            over their rows.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]],
        ...                  dtype=torch.float64)
        >>> def lower_loss(y, batch):                # a finite sum over the rows (mean of a: 0)
        ...     return 0.5 * ((y["w"] - batch["a"]) ** 2).sum(-1).mean()
        >>> def upper_loss(x, y, batch):
        ...     return 0.5 * ((y["w"] - batch["a"] - 1.0) ** 2).sum(-1).mean()
        >>> problem = ib.BilevelProblem(upper_loss, lower_loss, lam=1.0,
        ...                             regularizer=ib.ProximalL2())
        >>> batch = {"index": torch.arange(4), "a": a}      # every sample: "index" names the rows
        >>> x = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> y = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> method = ib.SABA(problem, x, y, n_inner=4, n_outer=4, lr_inner=0.5, lr_outer=0.5)
        >>> for _ in range(50):
        ...     _ = method.step(batch, batch)
        >>> [round(v, 3) for v in x["w"].tolist()]          # y*(x) = x/2 = [1, 1] at x* = [2, 2]
        [2.0, 2.0]
    """

    name = "SABA"

    def __init__(self, problem: BilevelProblem | BilevelOracles, upper: Mapping[str, Tensor],
                 lower: Mapping[str, Tensor], *, n_inner: int, n_outer: int,
                 lr_inner: StepSize, lr_outer: StepSize, lr_v: StepSize | None = None,
                 check_finite_sum: bool = True) -> None:
        super().__init__(problem, upper, lower, lr_inner=lr_inner, lr_outer=lr_outer, lr_v=lr_v)
        self.n_inner = check_int(n_inner, "n_inner", 1)
        self.n_outer = check_int(n_outer, "n_outer", 1)
        self.check_finite_sum = bool(check_finite_sum)
        like_y = {n: p.detach() for n, p in self.lower.items()}
        like_x = {n: p.detach() for n, p in self.upper.items()}
        self.memory = {"grad": SampleMemory(self.n_inner, like_y),
                       "hvp": SampleMemory(self.n_inner, like_y),
                       "fx": SampleMemory(self.n_outer, like_x),
                       "fy": SampleMemory(self.n_outer, like_y)}
        if self.oracles.stochastic_coupling:
            self.memory["cross"] = SampleMemory(self.n_inner, like_x)

    def _step(self, upper_batch: Any, lower_batch: Any, t: int) -> StepInfo:
        x, y, v = self.upper, self.lower, self.v
        assert v is not None
        lb, ub = draw(lower_batch), draw(upper_batch)
        i_in = check_indices(lb, self.n_inner, "inner")
        i_out = check_indices(ub, self.n_outer, "outer")
        rows = self.oracles.per_sample(x, y, v, lb, ub, t)
        grad0, hvp0, cross0 = self.oracles.deterministic_terms(x, y, v, t)
        if self.check_finite_sum and t == 0:
            self._check_finite_sum(rows, grad0, lb, ub)
        d = {k: self.memory[k].direction(i_in if k in ("grad", "hvp", "cross") else i_out,
                                         rows[k]) for k in rows}
        cross = d["cross"] if cross0 is None else cross0
        return _joint_update(self, t, tree_add(d["grad"], grad0),
                             tree_sub(tree_add(d["hvp"], hvp0), d["fy"]),
                             tree_sub(d["fx"], cross))

    def _check_finite_sum(self, rows: dict[str, Params], grad0: Params, lb: Any, ub: Any
                          ) -> None:
        """Refuse losses whose batch gradient is not the mean of the rows' (first step)."""
        grad = self.oracles.inner_grad(self.upper, self.lower, lb, 0)
        fx, fy = self.oracles.outer_grads(self.upper, self.lower, ub)
        for what, batch_value, row_mean in (
                ("lower", grad, tree_add({n: r.mean(0) for n, r in rows["grad"].items()}, grad0)),
                ("upper", {**fx, **{("y", n): g for n, g in fy.items()}},
                 {**{n: r.mean(0) for n, r in rows["fx"].items()},
                  **{("y", n): r.mean(0) for n, r in rows["fy"].items()}})):
            for name, value in batch_value.items():
                scale = 1e-6 * (1.0 + float(value.abs().max()))
                if not torch.allclose(row_mean[name], value, rtol=1e-4, atol=scale):
                    raise ValueError(
                        f"SABA: the {what} loss of a batch is not the mean of its rows' losses "
                        f"(the gradient for {name!r} differs from the mean of the per-row "
                        "gradients). SAGA's memory is per sample: make the loss a mean over "
                        "the rows, each row read alone (see implicitbilevel.stochastic.memory)")

    def _extra_state(self) -> dict[str, Any]:
        return {"memory": {k: m.state_dict() for k, m in self.memory.items()}}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        if set(state["memory"]) != set(self.memory):
            raise ValueError(f"the saved SABA memory holds {sorted(state['memory'])}, this one "
                             f"{sorted(self.memory)}")
        for k, m in self.memory.items():
            m.load_state_dict(state["memory"][k])
