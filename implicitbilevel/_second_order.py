"""The differentiable backward pass of :func:`~implicitbilevel.argmin` (``create_graph=True``).

The first-order backward pass returns ``G(x) = −∂_x ⟨∇_y g(y*, x), u⟩`` with
``(∇²_yy g + δI) u = w`` and ``w = dL/dy*``. To differentiate ``G`` again, every dependence on
``x`` must stay in the graph:

- the explicit ``x`` in ``∂_x ∇_y g`` (taken through an alias of ``x``, so the partial derivative
  stays partial while its value remains a function of ``x``);
- ``y*(x)``, by a fresh :func:`~implicitbilevel.argmin` node (whose backward is again the implicit
  function theorem);
- ``u(y*, x, w)``, by :class:`_Solve`: its forward solves ``A u = w`` with the configured solver,
  its backward solves ``A λ = ū`` (``A`` symmetric) and returns ``w̄ = λ`` and
  ``(ȳ, x̄) = −∂_{(y, x)} ⟨λ, A(y, x) u⟩``, the derivative of a linear solve
  ``d(A⁻¹w) = A⁻¹(dw − dA u)``.

This is exact second-order implicit differentiation for the exact Hessian (third derivatives of
``g`` by autograd); differentiating a third time raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._autograd import leaves
from .curvature.hessian import _hvp_context
from .implicit_jacobian import IJSystem, curvature_operator, handle_breakdown
from .tree import Params, tree_scale

__all__ = ["second_order_backward"]


def _system(spec: Any, x: Params, y: Params) -> tuple[IJSystem, float]:
    """``A = ∇²_yy g`` or ``I + ∇²_yy g/δ`` at ``(y, x)`` and the scale of its right-hand side."""
    ij = spec.ij
    operator = curvature_operator(spec.objective, ij.curvature, y, (x, *spec.args),
                                  embed=lambda s: s, mode=ij.hvp_mode, reuse=ij.reuse_graph)
    if ij.damping > 0:
        return IJSystem(operator, ij.damping, identity=spec.y_names), 1.0 / ij.damping
    return IJSystem(operator, 1.0, identity=[]), 1.0


def _solve(spec: Any, x: Params, y: Params, rhs: Params, where: str) -> Params:
    """``(∇²_yy g + δI)⁻¹ rhs`` at ``(y, x)`` with the configured solver."""
    system, scale = _system(spec, x, y)
    spec.solver.prepare(system)
    u, info = spec.solver(system, tree_scale(rhs, scale) if scale != 1.0 else dict(rhs))
    handle_breakdown(info, spec.ij.on_breakdown, where)
    return u


class _Solve(torch.autograd.Function):
    """``u = A(y, x)⁻¹ w`` as a differentiable function of ``w``, ``y`` and ``x``."""

    @staticmethod
    def forward(ctx: Any, spec: Any, names: tuple[list[str], list[str]],  # type: ignore[override]
                *tensors: Tensor) -> tuple[Tensor, ...]:
        y_names, x_names = names
        k = len(y_names)
        w = dict(zip(y_names, (t.detach() for t in tensors[:k])))
        y = dict(zip(y_names, (t.detach() for t in tensors[k:2 * k])))
        x = dict(zip(x_names, (t.detach() for t in tensors[2 * k:])))
        u = _solve(spec, x, y, w, "argmin second-order solve")
        ctx.spec, ctx.names = spec, names
        ctx.save_for_backward(*(u[n] for n in y_names), *y.values(), *x.values())
        return tuple(u[n] for n in y_names)

    @staticmethod
    def backward(ctx: Any, *u_bar: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError("argmin supports second derivatives (create_graph=True once); "
                               "differentiating a third time is not implemented")
        spec, (y_names, x_names) = ctx.spec, ctx.names
        k = len(y_names)
        saved = ctx.saved_tensors
        u = dict(zip(y_names, saved[:k]))
        y = dict(zip(y_names, saved[k:2 * k]))
        x = dict(zip(x_names, saved[2 * k:]))
        lam = _solve(spec, x, y, dict(zip(y_names, u_bar)), "argmin second-order adjoint solve")
        yl, xl = leaves(y), leaves(x)
        with torch.enable_grad(), _hvp_context():
            value = spec.objective(yl, xl, *spec.args)
            gy = torch.autograd.grad(value, list(yl.values()), create_graph=True)
            inner = sum((g * u[n]).sum() for n, g in zip(y_names, gy))
            hu = torch.autograd.grad(inner, list(yl.values()), create_graph=True,
                                     allow_unused=True)
            t = sum((h * lam[n]).sum() for n, h in zip(y_names, hu) if h is not None)
            wrt = [*yl.values(), *xl.values()]
            grads = torch.autograd.grad(t, wrt, allow_unused=True) if torch.is_tensor(t) else \
                [None] * len(wrt)
        neg = [None if g is None else -g for g in grads]
        return (None, None, *(lam[n] for n in y_names), *neg)


def second_order_backward(spec: Any, argmin_apply: Callable[..., tuple[Tensor, ...]],
                          x_saved: list[Tensor], y_saved: list[Tensor],
                          cotangents: tuple[Tensor, ...], wanted: list[str]) -> Params:
    """``−∂_x ⟨∇_y g(y*, x), u⟩`` over ``wanted`` as a differentiable function of ``x`` and the
    cotangent (the module docstring)."""
    if not (spec.ij.curvature == "hessian" and spec.reducer is dict):
        raise RuntimeError("argmin's second derivatives (create_graph=True) need the exact Hessian "
                           "and a single process (no reducer): the Gauss–Newton matrix is not "
                           "the curvature whose derivative the implicit function theorem takes")
    x_names, y_names = spec.x_names, spec.y_names
    # y*(x) again, as a node of the graph: its own backward is the implicit function theorem.
    y_star = dict(zip(y_names, argmin_apply(spec, *x_saved, *(t.detach() for t in y_saved))))
    x_alias = {n: t.view_as(t) for n, t in zip(x_names, x_saved)}  # the explicit x only
    w = [c.to(t.dtype) for c, t in zip(cotangents, y_saved)]
    u = dict(zip(y_names, _Solve.apply(spec, (y_names, x_names), *w, *y_star.values(),
                                       *x_saved)))
    with torch.enable_grad(), _hvp_context():
        y_alias = {n: t.view_as(t) for n, t in y_star.items()}
        value = spec.objective(y_alias, x_alias, *spec.args)
        gy = torch.autograd.grad(value, list(y_alias.values()), create_graph=True)
        inner = sum((g * u[n]).sum() for n, g in zip(y_names, gy))
        targets = [x_alias[n] for n in wanted]
        mixed = torch.autograd.grad(inner, targets, create_graph=True, allow_unused=True)
    return {n: (torch.zeros_like(x_alias[n]) if m is None else -m)
            for n, m in zip(wanted, mixed)}
