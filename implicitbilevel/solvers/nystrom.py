"""Randomized Nyström approximation of the curvature, reused across a BiSSL alternation.

Within one alternation the lower point and the Hessian batch are fixed, so every upper step solves
``A x = b`` with the same ``A = I + H/μ`` (thesis eq. 4.8-4.9, Algorithm 3). A rank-``k``
approximation ``Ĥ = U diag(λ̂) Uᵀ ≈ H``, built once from ``k`` curvature products
(:func:`nystrom_approximation`, :mod:`implicitbilevel.solvers.randomized_nystrom`), then serves
every solve of the alternation:

- :class:`NystromPreconditioner` preconditions :class:`~implicitbilevel.CG` (one product per
  iteration, plus ``O(nk)`` to apply the preconditioner; Frangella, Tropp & Udell 2023);
- :class:`NystromSolver` replaces the iterative solve by the Woodbury inverse of ``I + Ĥ/μ``
  (``O(nk)``, no products per solve; the use of Nyström approximations for hypergradients is
  Hataya & Yamada 2023).

Both assume a positive semi-definite curvature (Gauss–Newton, or the Hessian near a minimum) and
the proximal system ``A = I + H/μ``
(:attr:`IJSystem.identity_plus_curvature <implicitbilevel.IJSystem.identity_plus_curvature>`). The
approximation is built by each one's :meth:`~implicitbilevel.LinearSolver.prepare` step, once
per curvature operator (so once per alternation), and kept by the solver until it meets another
operator.

References:
    Z. Frangella, J. A. Tropp, M. Udell. Randomized Nyström preconditioning. SIAM J. Matrix Anal.
    Appl. 44(2), 2023.
    J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher. Fixed-rank approximation of a positive-
    semidefinite matrix from streaming data. NeurIPS 2017.
    R. Hataya, M. Yamada. Nyström method for accurate and scalable implicit differentiation.
    AISTATS 2023.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .._checks import check_bool
from ..tree import Params
from .base import LinearSolver, MatVec, SolveInfo, check_real, direct_solve_info, per_operator
from .randomized_nystrom import LowRank, check_rank_and_seed, nystrom_approximation

__all__ = ["LowRank", "NystromPreconditioner", "NystromSolver", "nystrom_approximation"]


class _Sketched:
    """The prepare step the Nyström preconditioner and solver share: the rank-``rank``
    approximation of the system's curvature, built once per curvature operator and kept (with a
    weak reference to that operator) until another operator comes."""

    rank: int
    seed: int
    _sketch: tuple[Callable[[], Any], LowRank] | None

    def prepare(self, system: MatVec) -> float:
        """Build the approximation of ``system``'s curvature unless it is held already (``k``
        curvature products in one batched call); the seconds spent."""
        _check_system(system, type(self).__name__)
        curvature = system.curvature  # type: ignore[attr-defined]
        self._sketch, seconds = per_operator(self._sketch, curvature, lambda: nystrom_approximation(
            system.curvature_batched, curvature.params, self.rank,  # type: ignore[attr-defined]
            seed=self.seed))
        return seconds

    def low_rank(self, system: MatVec) -> tuple[LowRank, float]:
        """The approximation for ``system`` (prepared if needed) and its ``μ``."""
        self.prepare(system)
        assert self._sketch is not None
        return self._sketch[1], float(system.mu)  # type: ignore[attr-defined]


def _check_system(system: Any, who: str) -> None:
    if not getattr(system, "identity_plus_curvature", False):
        raise ValueError(
            f"{who} needs the implicit-Jacobian system A = I + H/μ over every solved name (an "
            "IJSystem with the proximal regulariser over the coupled names, without the "
            "concatenated head); got a matvec that is not of that form"
        )


@dataclass
class NystromPreconditioner(_Sketched):
    """``P⁻¹ = (λ̂_k + μ) U (Λ̂ + μI)⁻¹ Uᵀ + (I − UUᵀ)``: randomized Nyström preconditioning.

    The preconditioner of Frangella, Tropp & Udell (2023) for ``H + μI = μA``, a scaling that
    preconditioned CG ignores. Symmetric positive definite by construction: its eigenvalues are
    ``(λ̂_k + μ)/(λ̂_i + μ) ∈ (0, 1]`` on the span of ``U`` and ``1`` on its complement. When
    ``λ̂_k`` is small against ``μ`` (``k`` at least the effective dimension of ``H`` at level
    ``μ``), the preconditioned system has a condition number of order one and CG needs few
    iterations.

    Assumes a positive semi-definite curvature and ``A = I + H/μ``
    (:attr:`~implicitbilevel.IJSystem.identity_plus_curvature`: the proximal regulariser
    over the coupled names, without the concatenated head). The system passed as ``matvec`` must
    be an :class:`~implicitbilevel.IJSystem`; the approximation is built by
    :meth:`~implicitbilevel.LinearSolver.prepare`, once per curvature operator.

    Cost: ``k`` curvature products once per alternation (shared by all upper steps); per CG
    iteration ``O(nk)`` on top of CG's one product. Memory: the ``n·k`` basis.

    Args:
        rank: ``k``, the rank of the approximation.
        seed: seed of the random test matrix.

    Raises:
        ValueError: at construction for a bad ``rank`` or ``seed`` (ints); when called with a
            system that is not ``I + H/μ``; when the curvature is indefinite (see
            :func:`nystrom_approximation`).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> g = torch.Generator().manual_seed(0)
        >>> B = torch.randn(2, 6, generator=g, dtype=torch.float64)
        >>> H = ib.HessianOperator(lambda p: 0.5 * ((B @ p["w"]) ** 2).sum(),   # H = B^T B, rank 2
        ...                        {"w": torch.zeros(6, dtype=torch.float64)})
        >>> A = ib.IJSystem(H, mu=0.5, identity=["w"])                          # A = I + H / 0.5
        >>> dense = torch.eye(6, dtype=torch.float64) + B.T @ B / 0.5
        >>> b = {"w": torch.ones(6, dtype=torch.float64)}
        >>> pcg = ib.CG(max_iter=3, tol=1e-10, preconditioner=ib.NystromPreconditioner(rank=2))
        >>> x, info = pcg(A, b)                                # P^-1 A: two distinct eigenvalues
        >>> torch.allclose(x["w"], torch.linalg.solve(dense, b["w"])), info.iterations
        (True, 2)
    """

    rank: int = 20
    seed: int = 0
    _sketch: tuple[Callable[[], Any], LowRank] | None = field(default=None, init=False,
                                                              repr=False, compare=False)

    def __post_init__(self) -> None:
        check_rank_and_seed(self.rank, self.seed)

    def __call__(self, system: MatVec) -> Callable[[Params], Params]:
        """Return ``r ↦ P⁻¹ r`` for the system ``A = I + H/μ``."""
        lr, mu = self.low_rank(system)
        lam = lr.eigenvalues
        # P⁻¹ r = r + U [((λ̂_k + μ)/(λ̂ + μ) − 1) ⊙ Uᵀr]
        scale = (lam[-1] + mu) / (lam + mu) - 1.0

        def apply(r: Params) -> Params:
            correction = lr.expand(scale * lr.project(r))
            return {name: r[name] + correction[name] for name in r}

        return apply


@dataclass
class NystromSolver(_Sketched, LinearSolver):
    """``x = (I + Ĥ/μ)⁻¹ b = b − U diag(λ̂/(λ̂ + μ)) Uᵀ b``: a direct Nyström–Woodbury solve.

    Solves ``A x = b`` for ``A = I + H/μ`` with ``H`` replaced by its rank-``k`` Nyström
    approximation ``Ĥ`` (Hataya & Yamada 2023; the approximation of Tropp et al. 2017, Frangella,
    Tropp & Udell 2023). Exact when ``rank(H) <= k``; otherwise, since ``0 ⪯ Ĥ ⪯ H``, ``x``
    solves ``I + Ĥ/μ`` exactly, and the error shrinks with ``k`` as ``H − Ĥ`` does.

    Assumes a positive semi-definite curvature and ``A = I + H/μ``
    (:attr:`~implicitbilevel.IJSystem.identity_plus_curvature`) with no head ridge. The
    system passed as ``matvec`` must be an :class:`~implicitbilevel.IJSystem`; the approximation
    is built by :meth:`~implicitbilevel.LinearSolver.prepare`, once per curvature operator.

    Cost: ``k`` curvature products once per alternation; per solve ``O(nk)`` and no products.
    Memory: the ``n·k`` basis. ``x0`` is ignored (the solve is direct).

    Diagnostics: the solve does not measure its residual: ``SolveInfo(iterations=0,
    residual_norm=nan, rhs_norm=||b||, converged=False)`` (the trainer can measure the true
    residual with one extra product). With ``measure_residual=True`` one product ``matvec(x)`` is
    spent: ``iterations=1``, ``residual_norm = ||b − A x||`` with the true ``A``, and
    ``converged`` against ``tol`` (never below the rounding floor ``10·eps·||b||``).

    Args:
        rank: ``k``, the rank of the approximation.
        seed: seed of the random test matrix.
        measure_residual: spend one product to measure the true residual.
        tol: relative residual tolerance for ``converged`` when the residual is measured.

    Raises:
        ValueError: at construction for a bad ``rank``, ``seed`` or ``tol``; when called with a
            system that is not ``I + H/μ`` (or carries a head ridge); when the curvature is
            indefinite (see :func:`nystrom_approximation`).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> g = torch.Generator().manual_seed(0)
        >>> B = torch.randn(2, 6, generator=g, dtype=torch.float64)
        >>> H = ib.HessianOperator(lambda p: 0.5 * ((B @ p["w"]) ** 2).sum(),   # H = B^T B, rank 2
        ...                        {"w": torch.zeros(6, dtype=torch.float64)})
        >>> A = ib.IJSystem(H, mu=0.5, identity=["w"])                          # A = I + H / 0.5
        >>> dense = torch.eye(6, dtype=torch.float64) + B.T @ B / 0.5
        >>> b = {"w": torch.ones(6, dtype=torch.float64)}
        >>> x, info = ib.NystromSolver(rank=2)(A, b)          # exact: H has rank 2
        >>> torch.allclose(x["w"], torch.linalg.solve(dense, b["w"]))
        True
    """

    rank: int = 20
    seed: int = 0
    measure_residual: bool = False
    tol: float = 1e-6
    _sketch: tuple[Callable[[], Any], LowRank] | None = field(default=None, init=False,
                                                              repr=False, compare=False)

    def __post_init__(self) -> None:
        check_rank_and_seed(self.rank, self.seed)
        check_bool(self.measure_residual, "measure_residual")
        check_real(self.tol, "tol")

    def __call__(
        self, matvec: MatVec, b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None = None
    ) -> tuple[Params, SolveInfo]:
        """Solve ``(I + Ĥ/μ) x = b`` with the Woodbury identity (``x0`` is ignored)."""
        if getattr(matvec, "ridge_names", None):
            raise ValueError("NystromSolver solves A = I + H/μ; the system carries a head ridge")
        lr, mu = self.low_rank(matvec)
        b = dict(b)
        if set(b) != set(lr.basis):
            raise ValueError(
                f"the right-hand side has names {sorted(b)}, the curvature {sorted(lr.basis)}"
            )
        lam = lr.eigenvalues
        correction = lr.expand((lam / (lam + mu)) * lr.project(b))
        x = {name: b[name] - correction[name] for name in b}
        return x, direct_solve_info(matvec, b, x, self.tol, self.measure_residual)
