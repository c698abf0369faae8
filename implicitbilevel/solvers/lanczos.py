"""Lanczos eigenpairs of the curvature, of both signs, reused across a BiSSL alternation.

Within one alternation every upper step solves ``A x = b`` with the same ``A = D + H/μ`` (thesis
eq. 4.8-4.9, Algorithm 3; ``D = I`` over the coupled names). The ``k`` eigenpairs
``H ≈ V Λ Vᵀ`` of largest magnitude, **positive or negative**, are found once per curvature
operator by block Lanczos with full reorthogonalisation (a few ``k`` products, in batched calls;
:func:`lanczos_eigenpairs`, :mod:`implicitbilevel.solvers.block_lanczos`) and then serve every
solve of the alternation:

- :class:`LanczosPreconditioner`: ``M = D + V Λ₊ Vᵀ/μ``, ``Λ₊ = max(Λ, 0)``, symmetric positive
  definite by construction, for :class:`~implicitbilevel.MINRES` or :class:`~implicitbilevel.CG`;
- :class:`LanczosSolver`: the Woodbury solve ``x = (I + V Λ Vᵀ/μ)⁻¹ b``, refused unless every
  pivot ``1 + λ/μ`` (down to the smallest eigenvalue found) exceeds ``min_pivot``;
- :class:`LanczosDeflation`: ``V`` as the deflation space of
  :class:`~implicitbilevel.RecycledCG` / :class:`~implicitbilevel.RecycledMINRES` from the first
  solve on (``AV = DV + HV/μ`` from the products Lanczos kept: no further products).

Unlike the Nyström approximation (:mod:`implicitbilevel.solvers.nystrom`), which assumes
``H ⪰ 0`` and refuses the exact Hessian away from a minimum, Lanczos needs only symmetry: the
extreme eigenvalues of both signs converge first (Kaniel–Paige theory), so the most negative
curvature is found, reported, and either used (deflation) or the cause of a clear refusal.

References:
    C. Lanczos. An iteration method for the solution of the eigenvalue problem of linear
    differential and integral operators. J. Res. Nat. Bur. Standards 45, 1950.
    G. H. Golub, R. Underwood. The block Lanczos method for computing eigenvalues. In
    Mathematical Software III, 361-377, 1977.
    B. N. Parlett. The Symmetric Eigenvalue Problem, SIAM, 1998 (full reorthogonalisation,
    Rayleigh–Ritz).
    W. W. Hager. Updating the inverse of a matrix. SIAM Review 31(2), 221-239, 1989 (Woodbury).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import check_bool, check_int
from ..tree import Params, tree_flatten, tree_unflatten
from .base import LinearSolver, MatVec, SolveInfo, check_real, direct_solve_info, per_operator
from .block_lanczos import Eigenpairs, lanczos_eigenpairs
from .subspaces import diagonal_of, rayleigh_ritz, rows_of

__all__ = ["Eigenpairs", "LanczosDeflation", "LanczosPreconditioner", "LanczosSolver",
           "lanczos_eigenpairs"]


@dataclass
class _Spectral:
    """The settings and prepare step the Lanczos classes share: the eigenpairs of the system's
    curvature, built once per curvature operator and kept (with a weak reference to it) until
    another comes."""

    rank: int = 20
    products: int | None = None
    block: int | None = None
    seed: int = 0
    _built: tuple[Callable[[], Any], Eigenpairs] | None = field(default=None, init=False,
                                                                repr=False, compare=False)

    def __post_init__(self) -> None:
        check_int(self.rank, "rank", 1)
        check_int(self.seed, "seed")
        if self.products is not None:
            check_int(self.products, "products", self.rank)
        if self.block is not None:
            check_int(self.block, "block", 1)

    def prepare(self, system: MatVec) -> float:
        """Find the eigenpairs of ``system``'s curvature unless held already; the seconds spent."""
        curvature = getattr(system, "curvature", None)
        if curvature is None or not hasattr(system, "curvature_batched"):
            raise ValueError(f"{type(self).__name__} needs an IJSystem (a matvec with a curvature "
                             "operator), got a plain matvec")
        self._built, seconds = per_operator(self._built, curvature, lambda: lanczos_eigenpairs(
            system.curvature_batched, curvature.params, self.rank,  # type: ignore[attr-defined]
            products=self.products, block=self.block, seed=self.seed))
        return seconds

    def eigenpairs(self, system: MatVec) -> Eigenpairs:
        """The eigenpairs of ``system``'s curvature (found if needed)."""
        self.prepare(system)
        assert self._built is not None
        return self._built[1]


def _refusal(who: str, pairs: Eigenpairs, mu: float, why: str) -> ValueError:
    return ValueError(
        f"{who} cannot help here: {why} (smallest eigenvalue of H found λ_min = "
        f"{pairs.smallest:.4g}, so 1 + λ_min/μ = {1 + pairs.smallest / mu:.4g} at μ = {mu:g}; "
        f"largest {pairs.largest:.4g}). Use MINRES or RecycledMINRES (no preconditioner), "
        "Gauss-Newton curvature, or a larger damping"
    )


@dataclass
class LanczosPreconditioner(_Spectral):
    """``M⁻¹`` for ``M = D + V Λ₊ Vᵀ/μ``, ``Λ₊ = max(Λ, 0)``: Lanczos preconditioning of ``Ax = b``.

    ``A = D + H/μ`` with ``D`` one positive scalar per name; ``V Λ Vᵀ`` the ``rank`` eigenpairs
    of ``H`` of largest magnitude (:func:`lanczos_eigenpairs`). Only the positive eigenvalues
    enter, so ``M ⪰ D ≻ 0`` is symmetric positive definite whatever the sign of the curvature:
    it removes the large positive eigenvalues of ``A`` (which set MINRES's and CG's condition
    number) and leaves the negative ones to the Krylov method (MINRES is indifferent to the sign
    of ``M ≈ |A|`` on them). Applied by the Woodbury identity,
    ``M⁻¹ = D⁻¹ − D⁻¹V₊(μΛ₊⁻¹ + V₊ᵀD⁻¹V₊)⁻¹V₊ᵀD⁻¹`` (Hager 1989), in ``O(nk)``.

    Cost: ``products`` curvature products once per operator (prepare); ``O(nk)`` per application.

    Args:
        rank: ``k``, the eigenpairs found.
        products: products of the Lanczos build (default ``max(3k, k + 20)``).
        block: products per batched call (default ``min(k, 8)``).
        seed: seed of the starting block.

    Raises:
        ValueError: for bad settings; with a system whose ``D`` is not a positive per-name
            diagonal; when no positive eigenvalue is found (``M = D`` would not precondition:
            the message names the smallest eigenvalue found).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> M = torch.diag(torch.tensor([9.0, -3.0, 0, 0, 0], dtype=torch.float64))  # indefinite
        >>> H = ib.HessianOperator(lambda p: 0.5 * p["w"] @ M @ p["w"],
        ...                        {"w": torch.zeros(5).double()})
        >>> A = ib.IJSystem(H, mu=4.0, identity=["w"])                     # A = I + M / mu
        >>> b = {"w": torch.ones(5).double()}
        >>> exact = torch.linalg.solve(torch.eye(5).double() + M / 4.0, b["w"])
        >>> x, info = ib.MINRES(max_iter=6, tol=1e-10,
        ...                     preconditioner=ib.LanczosPreconditioner(rank=2))(A, b)
        >>> torch.allclose(x["w"], exact), info.iterations
        (True, 2)
    """

    def __call__(self, system: MatVec) -> Callable[[Params], Params]:
        """Return ``r ↦ M⁻¹ r`` for ``system``."""
        pairs = self.eigenpairs(system)
        mu = float(system.mu)  # type: ignore[attr-defined]
        like = pairs.basis
        d = diagonal_of(system, {n: t[0] for n, t in like.items()}, "LanczosPreconditioner")
        if float(d.min()) <= 0.0:
            raise ValueError("LanczosPreconditioner needs D > 0 on every solved name (M = D + "
                             "VΛ₊Vᵀ/μ would be singular); the system has D = 0 on some names "
                             "(e.g. the head block without head_damping)")
        positive = pairs.eigenvalues > 0
        if not bool(positive.any()):
            raise _refusal("LanczosPreconditioner", pairs, mu, "no positive eigenvalue found")
        names = list(like)
        work = torch.promote_types(d.dtype, torch.float32)
        v = rows_of(pairs.basis, names)[positive].to(work)
        d_inv = 1.0 / d.to(work)
        core = torch.diag(mu / pairs.eigenvalues[positive].to(work)) + (v * d_inv) @ v.mT
        chol = torch.linalg.cholesky(0.5 * (core + core.mT))

        def apply(r: Params) -> Params:
            s = tree_flatten({n: r[n] for n in names}).to(work) * d_inv
            y = torch.cholesky_solve((v @ s)[:, None], chol)[:, 0]
            out = s - (y @ v) * d_inv
            return tree_unflatten(out.to(d.dtype), {n: r[n] for n in names})

        return apply


@dataclass
class LanczosSolver(_Spectral, LinearSolver):
    """``x = (I + VΛVᵀ/μ)⁻¹ b = b − V diag(λ/(λ + μ)) Vᵀ b``: a direct Lanczos–Woodbury solve.

    Solves ``A x = b`` for ``A = I + H/μ`` with ``H`` replaced by its ``rank`` eigenpairs of
    largest magnitude (:func:`lanczos_eigenpairs`, either sign). Exact when ``rank(H) <= k`` and
    the eigenpairs converged. The approximate matrix has eigenvalues ``1 + λ_i/μ`` on ``V`` and
    ``1`` elsewhere; the solve is **refused** unless ``1 + λ_min/μ > min_pivot``, ``λ_min`` the
    smallest eigenvalue found (kept or not): below it ``A`` is indefinite or nearly singular and
    a low-rank inverse amplifies its errors by ``1/(1 + λ_min/μ)``.

    Requires ``A = I + H/μ`` over every solved name (no head ridge), like
    :class:`~implicitbilevel.NystromSolver`. Cost: ``products`` curvature products once per
    operator; ``O(nk)`` and no products per solve (``x0`` is ignored). Diagnostics as
    :class:`~implicitbilevel.NystromSolver`: with ``measure_residual`` one product measures
    ``‖b − A x‖``.

    Args:
        rank: ``k``; products, block, seed: as :class:`LanczosPreconditioner`.
        min_pivot: the smallest ``1 + λ/μ`` accepted (default ``0.01``: at most a hundredfold
            amplification).
        measure_residual: spend one product to measure the true residual.
        tol: relative residual tolerance for ``converged`` when the residual is measured.

    Raises:
        ValueError: for bad settings, a system that is not ``I + H/μ``, or a pivot
            ``1 + λ_min/μ <= min_pivot`` (the message names ``λ_min``).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> M = torch.diag(torch.tensor([9.0, -3.0, 0, 0, 0], dtype=torch.float64))  # indefinite
        >>> H = ib.HessianOperator(lambda p: 0.5 * p["w"] @ M @ p["w"],
        ...                        {"w": torch.zeros(5).double()})
        >>> A = ib.IJSystem(H, mu=4.0, identity=["w"])                     # A = I + M / mu
        >>> b = {"w": torch.ones(5).double()}
        >>> exact = torch.linalg.solve(torch.eye(5).double() + M / 4.0, b["w"])
        >>> x, info = ib.LanczosSolver(rank=2)(A, b)        # exact: M has rank 2
        >>> torch.allclose(x["w"], exact)
        True
    """

    min_pivot: float = 0.01
    measure_residual: bool = False
    tol: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real(self.min_pivot, "min_pivot")
        check_bool(self.measure_residual, "measure_residual")
        check_real(self.tol, "tol")

    def __call__(
        self, matvec: MatVec, b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None = None
    ) -> tuple[Params, SolveInfo]:
        """Solve ``(I + VΛVᵀ/μ) x = b`` by the Woodbury identity (``x0`` is ignored)."""
        if not getattr(matvec, "identity_plus_curvature", False) or getattr(
                matvec, "ridge_names", None):
            raise ValueError("LanczosSolver needs A = I + H/μ over every solved name (the "
                             "proximal regulariser over the coupled names, no head ridge)")
        pairs = self.eigenpairs(matvec)
        mu = float(matvec.mu)  # type: ignore[attr-defined]
        if 1.0 + pairs.smallest / mu <= self.min_pivot:
            raise _refusal("LanczosSolver", pairs, mu,
                           f"the pivot 1 + λ_min/μ is not above min_pivot = {self.min_pivot:g}")
        b = {n: b[n] for n in pairs.basis}
        names = list(b)
        v = rows_of(pairs.basis, names)
        lam = pairs.eigenvalues
        flat = tree_flatten(b)
        x = flat - ((lam / (lam + mu)) * (v @ flat)) @ v
        x_tree = tree_unflatten(x, b)
        return x_tree, direct_solve_info(matvec, b, x_tree, self.tol, self.measure_residual)


@dataclass
class LanczosDeflation(_Spectral):
    """The deflation space ``W = V`` of :class:`~implicitbilevel.RecycledCG` and
    :class:`~implicitbilevel.RecycledMINRES`, from the ``rank`` eigenpairs of ``H`` of largest
    magnitude, so that even the first solve on an operator is deflated.

    Deflation solves ``A x = b`` as ``x = W E⁻¹ Wᵀ b + P_Dᵀ x̃`` with ``E = WᵀAW`` and the
    Krylov method on ``P_D A x̃ = P_D b``, ``P_D = I − AW E⁻¹ Wᵀ`` (Frank & Vuik 2001; see
    :mod:`implicitbilevel.solvers.recycled`). ``AW = DW + HW/μ`` comes from the products Lanczos
    kept (``D`` one scalar per name), so no product is spent beyond the build.

    Args:
        rank, products, block, seed: as :class:`LanczosPreconditioner`.

    Raises:
        ValueError: for bad settings; for :class:`~implicitbilevel.RecycledCG` when ``A`` is
            found indefinite on ``V`` (some ``vᵢᵀAvᵢ <= 0``; the message names the smallest
            eigenvalue found: use :class:`~implicitbilevel.RecycledMINRES`).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> M = torch.diag(torch.tensor([9.0, 3.0, 0, 0, 0], dtype=torch.float64))  # PSD, rank 2
        >>> H = ib.HessianOperator(lambda p: 0.5 * p["w"] @ M @ p["w"],
        ...                        {"w": torch.zeros(5).double()})
        >>> A = ib.IJSystem(H, mu=0.5, identity=["w"])                     # A = I + M / mu
        >>> b = {"w": torch.ones(5).double()}
        >>> exact = torch.linalg.solve(torch.eye(5).double() + M / 0.5, b["w"])
        >>> solver = ib.RecycledCG(max_iter=1, deflation=ib.LanczosDeflation(rank=2))
        >>> x, info = solver(A, b)                          # deflated from the first solve on
        >>> torch.allclose(x["w"], exact), info.iterations
        (True, 1)
    """

    rank: int = 8

    def space(self, system: MatVec, positive: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(W, AW, θ)``: orthonormal rows spanning ``V``, their products with ``A`` and
        ``θ = diag(WᵀAW)`` (rotated so that ``WᵀAW`` is diagonal); ``positive`` refuses an
        indefinite ``A`` on ``V`` (for CG)."""
        pairs = self.eigenpairs(system)
        mu = float(system.mu)  # type: ignore[attr-defined]
        names = list(pairs.basis)
        like = {n: t[0] for n, t in pairs.basis.items()}
        work = torch.promote_types(pairs.eigenvalues.dtype, torch.float32)
        w = rows_of(pairs.basis, names).to(work)
        aw = diagonal_of(system, like, "LanczosDeflation").to(work) * w
        aw += rows_of(pairs.images, names).to(work) / mu
        rayleigh = (w * aw).sum(dim=1)
        if positive and bool((rayleigh <= 0).any()):
            raise _refusal("LanczosDeflation for RecycledCG", pairs, mu,
                           f"A is indefinite (vᵀAv = {float(rayleigh.min()):.4g} on an "
                           "eigenvector of H)")
        return rayleigh_ritz(w, aw, positive)
