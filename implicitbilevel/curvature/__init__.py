"""Products with the lower-level curvature at a point, over parameter dicts.

- :mod:`~implicitbilevel.curvature.hessian`: exact Hessian-vector products on ``torch.func``
  (forward-over-reverse, reverse-over-reverse, or a kept first-order graph reused across
  products), one tangent or ``k`` batched; :func:`~implicitbilevel.hvp` and
  :class:`~implicitbilevel.HessianOperator`.
- :mod:`~implicitbilevel.curvature.gauss_newton`: the generalised Gauss–Newton matrix
  ``Jᵀ∇²L J`` of a loss split into outputs and a convex output loss (positive semi-definite).
- :mod:`~implicitbilevel.curvature.base`: what both share: the :class:`CurvatureOperator` base
  (the point it is bound to, product counts, single and batched calls), batched tangents, RNG
  pinning, the loop fallback.

BatchNorm uses batch statistics and never updates its running statistics inside a product; a kept
operator is bound to the point and batch it was built at.
"""

from .base import CurvatureOperator
from .gauss_newton import GaussNewton, GaussNewtonOperator
from .hessian import HessianOperator, HVPMode, functional_module, hvp, in_hvp

__all__ = [
    "CurvatureOperator",
    "GaussNewton",
    "GaussNewtonOperator",
    "HVPMode",
    "HessianOperator",
    "functional_module",
    "hvp",
    "in_hvp",
]
