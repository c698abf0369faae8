"""Conjugate gradients over parameter dicts (thesis Algorithm 1), optionally preconditioned.

Solves ``A x = b`` for symmetric positive definite ``A``. In BiSSL ``A = I + H/μ`` (eq. 4.8-4.9,
Algorithm 3), which is positive definite only where the curvature ``H`` is positive semi-definite
or small against ``μ``; CG stops and reports non-positive curvature instead of returning garbage
(use :class:`~implicitbilevel.MINRES` or Gauss–Newton curvature there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_bool
from ..tree import Params, tree_block_dots, tree_clone, tree_norm, tree_sub, tree_zeros_like
from .base import (
    KrylovSolver,
    MatVec,
    SolveInfo,
    dtype_of,
    list_dot,
    threshold,
)

__all__ = ["CG"]

_RESIDUAL_GROWTH = 10.0


@dataclass
class CG(KrylovSolver):
    """Conjugate gradients for ``A x = b``, ``A`` symmetric positive definite (thesis Algorithm 1).

    Iterates ``α = rᵀz / dᵀAd``, ``x += α d``, ``r -= α A d``, ``z' = M⁻¹r'``,
    ``β = r'ᵀz' / rᵀz``, ``d = z' + β d`` with ``M = I`` unless a preconditioner is given
    (then it is preconditioned CG; e.g. :class:`~implicitbilevel.NystromPreconditioner`, built from
    curvature reused across an alternation).
    Stops after ``max_iter`` products, when ``||r|| <= max(tol·||b||, atol)``, or on breakdown:
    a direction with ``dᵀAd <= 0`` (``A`` is not positive definite there, e.g. ``I + H/μ`` at a
    random initialisation with too small a damping) or a non-finite value. The iterate before the
    breaking step is returned with ``info.breakdown`` set; nothing is silently repaired. A solve
    from ``x0 = 0`` whose residual grows past ``10·||b||`` is reported as a breakdown too (on a
    positive definite system the growth is bounded by ``sqrt(cond(A))``).

    Args:
        max_iter: maximum matrix-vector products ``N_c`` (thesis: 5). Algorithm 1 writes its loop
            as ``t = 0, …, N_c``; like the original BiSSL code, ``N_c`` here counts products.
        tol: relative residual tolerance; ``0`` runs ``max_iter`` iterations (thesis) unless the
            residual reaches the rounding floor ``10·eps·||b||`` first.
        atol: absolute residual tolerance.
        warm_start: start from the previous call's solution when ``x0`` is not given (useful when
            consecutive systems are close, as over the upper-level steps of an alternation).
        blockwise: the variant of the original BiSSL code, for reproducing its numbers: ``α`` and
            ``β`` are computed separately for every parameter tensor while ``A`` couples all of
            them. A heuristic, not CG on the full system; it starts from ``x0 = 0``, runs exactly
            ``max_iter`` iterations and checks only for non-finite values (a block whose residual
            is exactly zero keeps a zero step).
        preconditioner: ``None``, or a :data:`~implicitbilevel.solvers.Preconditioner`: called
            with the system's ``matvec``, it returns ``r ↦ M⁻¹r`` for a symmetric positive
            definite ``M ≈ A``. The stopping test stays on the true residual ``||r||``.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> b = {"w": torch.tensor([1.0, -1.0], dtype=torch.float64)}
        >>> x, info = ib.CG(max_iter=10, tol=1e-10)(lambda v: {"w": Q @ v["w"]}, b)
        >>> torch.allclose(x["w"], torch.linalg.solve(Q, b["w"]))
        True
        >>> info.iterations, info.converged
        (2, True)
    """

    blockwise: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self.blockwise, "blockwise")

    def __call__(
        self, matvec: MatVec, b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None = None
    ) -> tuple[Params, SolveInfo]:
        """Solve ``A x = b``; ``matvec(v) = A v``. Returns the solution and its diagnostics."""
        if self.blockwise:
            if self.preconditioner is not None:
                raise ValueError("blockwise CG takes no preconditioner")
            return _blockwise_cg(matvec, dict(b), self.max_iter)
        return super().__call__(matvec, b, x0)

    def solve(
        self, matvec: MatVec, b: Params, x0: Mapping[str, Tensor] | None,
        precondition: Callable[[Params], Params] | None,
    ) -> tuple[Params, SolveInfo]:
        """One (preconditioned) CG solve from ``x0``."""
        return _cg(matvec, b, x0, self.max_iter, self.tol, self.atol, precondition)


def _cg(
    matvec: MatVec, b: Params, x0: Mapping[str, Tensor] | None, max_iter: int, tol: float,
    atol: float,
    precondition: Callable[[Params], Params] | None = None,
) -> tuple[Params, SolveInfo]:
    rhs_norm = float(tree_norm(b))
    stop_at = threshold(tol, atol, rhs_norm, dtype_of(b))
    if x0 is None:
        x = tree_zeros_like(b)
        r = tree_clone(b)
    else:
        x = tree_clone(x0)
        r = tree_sub(b, matvec(x))
    keys = list(b.keys())
    iterations = 0 if x0 is None else 1  # the product of the initial residual counts
    xs, rs_ = [x[k] for k in keys], [r[k] for k in keys]

    def preconditioned(residual: list[Tensor]) -> list[Tensor]:
        if precondition is None:
            return residual
        z = precondition(dict(zip(keys, residual)))
        return [z[k] for k in keys]

    zs = preconditioned(rs_)
    ds = torch._foreach_clone(zs)
    # Scalars are Python floats: the breakdown and tolerance checks read them on the host every
    # iteration anyway, and float step sizes let every update run in place with one fused kernel.
    rz = float(list_dot(rs_, zs))
    rs = rz if precondition is None else float(list_dot(rs_, rs_))
    breakdown = None
    for k in range(max_iter - iterations):
        if not (math.isfinite(rs) and math.isfinite(rz)):
            breakdown = f"non-finite residual at iteration {k}"
            break
        if math.sqrt(rs) <= stop_at:
            break
        if rz <= 0.0:
            breakdown = (f"the preconditioner is not positive definite (rᵀM⁻¹r = {rz:.3g} at "
                         f"iteration {k})")
            break
        ad = matvec(dict(zip(keys, ds)))
        ads = [ad[k] for k in keys]
        iterations += 1
        curvature = float(list_dot(ds, ads))
        if not math.isfinite(curvature):
            breakdown = f"non-finite curvature dᵀAd at iteration {k}"
            break
        if curvature <= 0.0:
            rayleigh = curvature / max(float(list_dot(ds, ds)), 1e-300)
            breakdown = (
                f"non-positive curvature at iteration {k}: dᵀAd/dᵀd = {rayleigh:.3g}, so the "
                "system matrix is not positive definite; use MINRES or Gauss-Newton curvature, "
                "increase the damping (λ_damp) or λ, or start from a pretrained model"
            )
            break
        alpha = rz / curvature
        torch._foreach_add_(xs, ds, alpha=alpha)
        torch._foreach_add_(rs_, ads, alpha=-alpha)
        zs = preconditioned(rs_)
        rz_new = float(list_dot(rs_, zs))
        rs = rz_new if precondition is None else float(list_dot(rs_, rs_))
        torch._foreach_mul_(ds, rz_new / rz)
        torch._foreach_add_(ds, zs)
        rz = rz_new
    residual = math.sqrt(max(rs, 0.0)) if math.isfinite(rs) else math.inf
    if breakdown is None and x0 is None and residual > _RESIDUAL_GROWTH * rhs_norm:
        # From x0 = 0 the residual starts at ||b||. On a positive definite system it can grow by
        # at most sqrt(cond(A)); a tenfold growth means A is indefinite along directions whose
        # curvature happened to stay positive, or is too badly conditioned for N_c iterations.
        breakdown = (
            f"residual grew to {residual / max(rhs_norm, 1e-300):.3g}×||b||; the system matrix is "
            "indefinite or badly conditioned: increase the damping (λ_damp) or λ"
        )
    info = SolveInfo(iterations, residual, rhs_norm, residual <= stop_at, breakdown)
    return x, info


def _blockwise_cg(matvec: MatVec, b: Params, max_iter: int) -> tuple[Params, SolveInfo]:
    rhs_norm = float(tree_norm(b))
    x = tree_zeros_like(b)
    r = tree_clone(b)
    d = tree_clone(r)
    keys = list(b.keys())
    rs = tree_block_dots(r, r)
    for _ in range(max_iter):
        ad = matvec(d)
        curvature = tree_block_dots(d, ad)
        alpha = torch.where(curvature != 0, rs / curvature, torch.zeros_like(rs))
        x = dict(zip(keys, torch._foreach_add(
            list(x.values()), torch._foreach_mul(list(d.values()), list(alpha.unbind())))))
        r = dict(zip(keys, torch._foreach_sub(
            list(r.values()), torch._foreach_mul([ad[k] for k in keys], list(alpha.unbind())))))
        rs_new = tree_block_dots(r, r)
        beta = torch.where(rs != 0, rs_new / rs, torch.zeros_like(rs))
        d = dict(zip(keys, torch._foreach_add(
            list(r.values()), torch._foreach_mul(list(d.values()), list(beta.unbind())))))
        rs = rs_new
    residual = float(rs.sum().sqrt())
    breakdown = None if math.isfinite(residual) else "non-finite values in block-wise CG"
    return x, SolveInfo(max_iter, residual, rhs_norm, False, breakdown)
