"""Is the given inner solution a stationary point? The premise of :func:`~implicitbilevel.argmin`.

The implicit function theorem gives ``dy*/dx`` only where ``∇_y g(y, x) = 0``. At a point that is
not stationary the formula still returns a number, off by any amount, so the argmin measures the
premise before using it, at the price of one gradient and one curvature product:

.. math::

    s = \\frac{\\|\\nabla_y g\\|^2}{|\\nabla_y g^\\top H \\nabla_y g|}\\, \\|\\nabla_y g\\|,
    \\qquad \\text{stationarity} = \\frac{s}{\\max(1, \\|y\\|)},

``s`` the length of the Cauchy step (the minimiser of the quadratic model of ``g`` along
``−∇_y g``, exact for a quadratic along that direction): an estimate of how far ``y`` is from the
stationary point, in the units of ``y``, stated relative to ``‖y‖`` (or to 1 for small ``y``).
A zero curvature along the gradient gives ``s = ∞``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .tree import Params, tree_dot, tree_norm

__all__ = ["Stationarity", "measure_stationarity"]


@dataclass(frozen=True)
class Stationarity:
    """How far the inner solution handed to :func:`~implicitbilevel.argmin` is from stationary.

    Attributes:
        grad_norm: ``‖∇_y g(y, x)‖``.
        step: the Cauchy step length ``s`` (module docstring), an estimate of ``‖y − y*‖``.
        relative: ``s / max(1, ‖y‖)``, the number compared with the tolerance.
    """

    grad_norm: float
    step: float
    relative: float


def measure_stationarity(grad: Mapping[str, Tensor], y: Mapping[str, Tensor],
                         curvature: Callable[[Params], Params]) -> Stationarity:
    """Measure :class:`Stationarity` from ``∇_y g`` and one product ``curvature(∇_y g)``."""
    grad = dict(grad)
    g_norm = float(tree_norm(grad))
    if g_norm == 0.0:
        return Stationarity(0.0, 0.0, 0.0)
    curv = abs(float(tree_dot(grad, curvature(grad))))
    step = math.inf if curv == 0.0 else g_norm ** 3 / curv
    scale = max(1.0, float(tree_norm(dict(y))))
    return Stationarity(g_norm, step, step / scale)


def inner_gradient(objective: Callable[..., Tensor], y: Params, x: Params, args: tuple) -> Params:
    """``∇_y g(y, x, *args)`` by one backward pass."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in y.items()}
    with torch.enable_grad():
        value = objective(leaves, x, *args)
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g
            for (n, t), g in zip(leaves.items(), grads)}
