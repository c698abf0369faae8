"""Deflated MINRES in GCRO form recycling harmonic Ritz vectors across right-hand sides (Parks
et al. 2006; RMINRES, Wang, de Sturler & Paulino 2007).

The method and references are in :mod:`implicitbilevel.solvers.recycled`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..tree import Params
from .base import MatVec, SolveInfo
from .minres import _minres
from .recycled_base import _Recycled
from .subspaces import Space, Tridiagonal, flat_of, ratio, tree_of

__all__ = ["RecycledMINRES"]


@dataclass
class RecycledMINRES(_Recycled):
    """Deflated MINRES for ``A x = b``, ``A`` symmetric and possibly indefinite, recycling the
    harmonic Ritz vectors nearest zero across right-hand sides (in the spirit of RMINRES, Wang,
    de Sturler & Paulino 2007, and GCRO-DR, Parks et al. 2006).

    The first solve on an operator is MINRES (:class:`~implicitbilevel.MINRES`); its Lanczos
    vectors ``v_j`` and products ``A v_j`` are recorded, and the ``recycle_dim`` harmonic Ritz
    vectors with harmonic Ritz values nearest zero are kept: ``(AZ)ᵀ(AZ) y = θ (AZ)ᵀZ y`` over
    the recorded span ``Z`` (the eigenvalues of ``A`` nearest zero, of either sign, are those that
    slow MINRES down and that ordinary Ritz values approximate poorly for an indefinite ``A``).
    The space is updated in windows of ``window`` vectors, as RMINRES does (memory as
    :class:`RecycledCG`). Every later solve on the same operator is the Galerkin solution on
    ``W`` plus MINRES on ``A`` compressed to the complement of ``C = AW`` (GCRO form,
    :mod:`implicitbilevel.solvers.recycled`), so the residual is minimised over
    ``span(W) ⊕ K_m`` and is **non-increasing**; with ``update`` the space is refreshed from
    ``[W, v_1, …]`` after every solve.

    Settings as :class:`~implicitbilevel.MINRES` (``max_iter``, ``tol``, ``atol``,
    ``warm_start``, ``preconditioner``: SPD, applied as ``ΠM⁻¹Π + CCᵀ``; with one, the
    deflated solve spends its last product on ``A x̃``), and
    ``recycle_dim``, ``window``, ``update``, ``deflation`` as :class:`RecycledCG` (a
    :class:`~implicitbilevel.LanczosDeflation` here may have eigenvalues of both signs).

    ``SolveInfo`` as :class:`~implicitbilevel.MINRES`'s: ``iterations`` counts products,
    ``residual_norm`` is the recurrence's ``φ_k`` of the deflated system, equal to
    ``‖b − A x‖`` in exact arithmetic (with a preconditioner: ``‖Π(r0 − A x̃)‖``, measured by
    the last product); breakdowns as MINRES's. Harmonic Ritz values below ``eps^(2/3)·‖A‖``
    (a numerically singular ``A``) are not deflated.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> M = torch.diag(torch.tensor([9.0, -3.0, 0, 0, 0], dtype=torch.float64))  # indefinite
        >>> H = ib.HessianOperator(lambda p: 0.5 * p["w"] @ M @ p["w"],
        ...                        {"w": torch.zeros(5).double()})
        >>> A = ib.IJSystem(H, mu=4.0, identity=["w"])                     # A = I + M / mu
        >>> b = {"w": torch.ones(5).double()}
        >>> solver = ib.RecycledMINRES(max_iter=3, recycle_dim=2)
        >>> _ = solver(A, b)
        >>> c = {"w": torch.arange(1.0, 6.0).double()}
        >>> x, info = solver(A, c)                          # the recycled space saves a product
        >>> torch.allclose(A(x)["w"], c["w"]), info.iterations
        (True, 2)
    """

    def _deflated(self, apply: MatVec, r: Tensor, space: Space | None, budget: int,
                  stop_at: float, precondition: Callable[[Params], Params] | None, like: Params,
                  ) -> tuple[Tensor, SolveInfo, float]:
        if space is None:
            x, info = _minres(apply, tree_of(r, like), None, budget, 0.0, stop_at, precondition)
            return flat_of(x, like, r.dtype), info, 1.0
        # C = AU with orthonormal rows (AWᵀ = QR: C = R⁻ᵀ AW, U = R⁻ᵀ W), Π = I − CᵀC.
        w, aw = space[0], space[1]
        q, rr = torch.linalg.qr(aw.mT)
        c, u = q.mT, torch.linalg.solve_triangular(rr.mT, w, upper=False)

        def project(v: Tensor) -> Tensor:
            return v - (c @ v) @ c

        trace = Tridiagonal() if precondition is None else None
        # On C the operator is σI, σ the middle of A's Ritz values on W: the right-hand side has
        # no C part, and rounding errors there are neither amplified by the Lanczos recurrence
        # (as they would be at an eigenvalue 0 outside the rest of the spectrum) nor solved for.
        sigma = 0.5 * float(space[2].max() + space[2].min())

        def operator(v: Params) -> Params:  # v ↦ Π A Π v + σ CᵀC v
            vf = flat_of(v, like, r.dtype)
            side = c @ vf
            pv = vf - side @ c
            av = flat_of(apply(tree_of(pv, like)), like, r.dtype)
            coupling = c @ av
            out = av + (sigma * side - coupling) @ c
            if trace is not None:
                trace.add(vf, out, coupling)
            return tree_of(out, like)

        def projected(z: Params) -> Params:  # z ↦ (Π M⁻¹ Π + CᵀC) z, SPD
            zf = flat_of(z, like, r.dtype)
            side = c @ zf
            inner = precondition(tree_of(zf - side @ c, like))  # type: ignore[misc]
            return tree_of(project(flat_of(inner, like, r.dtype)) + side @ c, like)

        r0 = project(r)
        inner = budget if trace is not None else max(budget - 1, 0)  # the last: A x̃
        x, info = _minres(operator, tree_of(r0, like), None, inner, 0.0, stop_at,
                          None if precondition is None else projected)
        xt = project(flat_of(x, like, r.dtype))
        step = (c @ r) @ u + xt
        products, residual = info.iterations, info.residual_norm
        if products == 0 or not math.isfinite(residual):
            pass
        elif trace is not None:  # x̃ = V y: Cᵀ A x̃ = B y from the Lanczos tridiagonal
            step -= trace.coupling_of(products - (info.breakdown is not None), float(r0.norm())) @ u
        else:  # x = U Cᵀ r + x̃ − U Cᵀ A x̃ with one product, which gives Π (r0 − A x̃) too
            ax = flat_of(apply(tree_of(xt, like)), like, r.dtype)
            step -= (c @ ax) @ u
            products += 1
            residual = float(project(r0 - ax).norm())
        done = SolveInfo(products, residual, info.rhs_norm, residual <= stop_at, info.breakdown)
        return step, done, ratio(r0, r)
