"""The curvature products of the inner objective at one point and one batch.

With ``G(x, y) = ℓ(y) + λ r(x, y)`` (thesis eq. 4.2-4.3), :class:`Curvature` multiplies by

.. math::

    \\nabla^2_{yy} G \\cdot v = \\nabla^2 \\ell \\cdot v + \\lambda \\nabla^2_{yy} r \\cdot v,
    \\qquad
    \\nabla^2_{xy} G \\cdot v = \\lambda \\nabla_x \\langle \\nabla_y r, v \\rangle,

the first from one :class:`~implicitbilevel.HessianOperator` (one kept first-order graph, so
several products at the same point and batch cost one backward pass each) plus the regulariser's
``lower_hvp``, the second from the regulariser's ``mixed_vjp`` (closed form for
:class:`~implicitbilevel.ProximalL2`). It is built by :meth:`BilevelOracles.curvature
<implicitbilevel.BilevelOracles.curvature>` and counts each product in the oracles'
:class:`~implicitbilevel.stochastic.OracleCounts`. The small helpers below complete, detach and
add parameter dicts for it and for the oracles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..curvature.hessian import HessianOperator
from ..tree import Params

__all__ = ["Curvature"]


def zeros_over(names: Mapping[str, Tensor], part: Mapping[str, Tensor]) -> Params:
    """``part`` completed with zeros to the names of ``names``."""
    return {n: part[n] if n in part else torch.zeros_like(t) for n, t in names.items()}


class Curvature:
    """``v ↦ ∇²_yy G · v`` and ``v ↦ ∇²_xy G · v`` at one point and batch
    (:meth:`BilevelOracles.curvature`); each product counts one oracle call.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> oracles = ib.BilevelOracles(lambda x, y, b: 0.5 * (y["w"] ** 2).sum(),  # f
        ...                             lambda y, b: 0.5 * (y["w"] ** 2).sum(),     # G = l + r
        ...                             regularizer=ib.ProximalL2())                # r = |x-y|^2/2
        >>> x, y = ({"w": torch.zeros(2, dtype=torch.float64)} for _ in range(2))
        >>> curv = oracles.curvature(x, y, None)             # products at one point and batch
        >>> v = {"w": torch.tensor([1.0, -1.0], dtype=torch.float64)}
        >>> curv.hvp(v)["w"].tolist(), curv.cross(v)["w"].tolist()   # (I + I) v and -I v
        ([2.0, -2.0], [-1.0, 1.0])
    """

    def __init__(self, oracles: Any, x: Params, y: Params, batch: Any, t: int) -> None:
        # oracles: the BilevelOracles (not imported here: it imports this module)
        self._oracles = oracles
        self.x, self.y = detached(x), detached(y)
        self.lam = oracles.lam_at(t)
        self._reg = None if oracles._reg is None else oracles._reg.bind(batch)
        self._coupling = oracles._coupling.bind(batch)
        loss = oracles._loss
        self._operator = HessianOperator(lambda yy, xx, bb: loss(yy, xx, bb), self.y, self.x,
                                         batch)

    def hvp(self, v: Params) -> Params:
        """``∇²_yy G · v``."""
        self._oracles.counts.hvp += 1
        out = self._operator(v)
        if self._reg is not None:
            out = add_scaled(out, self._reg.lower_hvp(self.x, self.y, v), self.lam)
        return out

    def cross(self, v: Params) -> Params:
        """``∇²_xy G · v = ∇_x ⟨∇_y G, v⟩`` (zero for upper names ``G`` does not read)."""
        self._oracles.counts.cross += 1
        mixed = self._coupling.mixed_vjp(self.x, self.y, v)
        return {n: self.lam * g for n, g in zeros_over(self.x, mixed).items()}


def detached(p: Mapping[str, Tensor]) -> Params:
    """``p`` with every tensor detached from its graph."""
    return {n: t.detach() for n, t in p.items()}


def add_scaled(base: Params, part: Mapping[str, Tensor], scale: float) -> Params:
    """``base + scale · part`` on the names of ``part`` (``base`` unchanged elsewhere)."""
    out = dict(base)
    for n, t in part.items():
        out[n] = out[n] + scale * t
    return out
