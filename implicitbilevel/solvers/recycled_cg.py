"""Deflated conjugate gradients recycling Ritz vectors across right-hand sides (Saad et al.
2000), with the balancing preconditioner (Mandel 1993; Tang, Nabben, Vuik & Erlangga 2009).

The method and references are in :mod:`implicitbilevel.solvers.recycled`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..tree import Params
from .base import MatVec, SolveInfo
from .cg import _cg
from .recycled_base import _Recycled
from .subspaces import Space, flat_of, ratio, tree_of

__all__ = ["RecycledCG"]


@dataclass
class RecycledCG(_Recycled):
    """Deflated conjugate gradients for ``A x = b``, ``A`` symmetric positive definite, recycling
    the Ritz vectors of the smallest eigenvalues across right-hand sides (Saad et al. 2000).

    The first solve on an operator is CG (:class:`~implicitbilevel.CG`, optionally
    preconditioned); its search directions ``d_j`` and products ``A d_j`` are recorded, and the
    ``recycle_dim`` Ritz vectors of ``A`` with the smallest positive Ritz values on their span
    are kept (updated in windows of ``window`` directions, as RMINRES updates its space, through
    ``3·recycle_dim`` candidates; memory ``2·n·(3·recycle_dim + window)`` numbers). Every later
    solve on the same operator starts from the Galerkin solution ``x0 = W(WᵀAW)⁻¹Wᵀb`` and runs
    CG preconditioned by the balancing deflation (:mod:`implicitbilevel.solvers.recycled`): its
    effective condition number is ``λ_max/λ_{k+1}`` when ``W`` spans the eigenvectors of the
    ``k`` smallest eigenvalues. With ``update`` the space is refreshed from ``[W, d_1, …]``
    after every solve.

    Settings as :class:`~implicitbilevel.CG` (``max_iter`` products per solve including the
    one for ``r0`` with ``x0``, ``tol``, ``atol``, ``warm_start``, ``preconditioner``; not
    ``blockwise``), and:

    Args:
        recycle_dim: ``k``, the dimension of the recycled space (0: plain CG). Default 16:
            on the pretrained small ResNet of ``benchmarks/recycled_ij.py`` a larger space keeps
            more of the 8 solves' Krylov spaces (MINRES at ``N_c = 20``, μ = 10.001: relative
            residual 0.36 without recycling, 0.33 / 0.30 / 0.26 with ``k`` = 8 / 16 / 32), at
            ``O(n k²)`` per window update and ``2·n·(3k + window)`` numbers of memory (136·n at
            the defaults; ``recycle_dim=8, window=10`` takes 68·n).
        window: directions recorded between two updates of the space.
        update: refresh the space after every solve (``False``: only from the first solve on an
            operator, or from ``deflation``).
        deflation: a :class:`~implicitbilevel.LanczosDeflation` to seed the space from
            eigenpairs of ``H`` before the first solve (refused when ``A`` is indefinite there).

    ``SolveInfo``: ``iterations`` counts products, ``residual_norm`` is CG's recursive residual
    (equal to ``‖b − A x‖`` in exact arithmetic), breakdowns as CG's (non-positive curvature of
    the deflated operator, non-finite values, a growing residual). ``last_stats``
    (:class:`RecycleStats`) and ``last_products_saved`` describe the last solve.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> M = torch.diag(torch.tensor([9.0, 3.0, 0, 0, 0], dtype=torch.float64))  # PSD, rank 2
        >>> H = ib.HessianOperator(lambda p: 0.5 * p["w"] @ M @ p["w"],
        ...                        {"w": torch.zeros(5).double()})
        >>> A = ib.IJSystem(H, mu=0.5, identity=["w"])                     # A = I + M / mu
        >>> b = {"w": torch.ones(5).double()}
        >>> solver = ib.RecycledCG(max_iter=3, recycle_dim=2)
        >>> _ = solver(A, b)                                 # 3 distinct eigenvalues: exact in 3
        >>> c = {"w": torch.arange(1.0, 6.0).double()}
        >>> x, info = solver(A, c)                          # the next right-hand side is deflated
        >>> torch.allclose(A(x)["w"], c["w"]), solver.last_stats.deflated, info.iterations
        (True, 2, 2)
    """

    _positive = True

    def _deflated(self, apply: MatVec, r: Tensor, space: Space | None, budget: int,
                  stop_at: float, precondition: Callable[[Params], Params] | None, like: Params,
                  ) -> tuple[Tensor, SolveInfo, float]:
        if space is None:
            x, info = _cg(apply, tree_of(r, like), None, budget, 0.0, stop_at, precondition)
            return flat_of(x, like, r.dtype), info, 1.0
        w, aw, theta = space
        c = (w @ r) / theta  # x0 = W E⁻¹ Wᵀ r, r0 = r − AW E⁻¹ Wᵀ r (Wᵀ r0 = 0)
        r0 = r - c @ aw

        def deflate(z: Params) -> Params:  # z ↦ (P_Dᵀ M⁻¹ P_D + W E⁻¹ Wᵀ) z, SPD
            zf = flat_of(z, like, r.dtype)
            coarse = (w @ zf) / theta
            y = tree_of(zf - coarse @ aw, like)
            yf = flat_of(y if precondition is None else precondition(y), like, r.dtype)
            return tree_of(yf + (coarse - (aw @ yf) / theta) @ w, like)

        x, info = _cg(apply, tree_of(r0, like), None, budget, 0.0, stop_at, deflate)
        return c @ w + flat_of(x, like, r.dtype), info, ratio(r0, r)
