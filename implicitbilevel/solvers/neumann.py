"""Truncated Neumann series for the implicit-Jacobian system (thesis Sec. 9.1)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from ..tree import Params, tree_axpy, tree_clone, tree_norm
from .base import LinearSolver, MatVec, SolveInfo, check_real, dtype_of, threshold, validate

__all__ = ["Neumann"]


@dataclass
class Neumann(LinearSolver):
    """Truncated Neumann series ``x = α Σ_{k=0}^{K} (I − αA)^k b`` (thesis Sec. 9.1).

    Converges to ``A⁻¹ b`` when the spectral radius of ``I − αA`` is below one, i.e. for symmetric
    ``A`` with eigenvalues in ``(0, 2/α)``. Uses exactly ``K = max_iter`` matrix-vector products
    (fewer when ``tol`` is met). With ``p_k = (I − αA)^k b``, the residual of the series truncated
    after ``k`` terms is ``p_k``; ``info.residual_norm`` is ``||p_K||``, the residual of the series
    one term shorter than the returned one. A series whose terms grow past ``||b||`` cannot converge
    and is reported as a breakdown.

    Args:
        max_iter: ``K``, the number of matrix-vector products.
        alpha: the step ``α`` (``1`` suits ``A = I + H/μ`` when ``||H/μ|| < 1``).
        tol: stop once ``||p_k|| <= tol·||b||`` (``0``: always ``K`` products).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> A = torch.eye(2, dtype=torch.float64) + Q / 4          # spectral radius of I - A/2 < 1
        >>> b = {"w": torch.tensor([1.0, -1.0], dtype=torch.float64)}
        >>> x, info = ib.Neumann(max_iter=60, alpha=0.5)(lambda v: {"w": A @ v["w"]}, b)
        >>> torch.allclose(x["w"], torch.linalg.solve(A, b["w"]))
        True
    """

    max_iter: int = 5
    alpha: float = 1.0
    tol: float = 0.0

    def __post_init__(self) -> None:
        validate(self.max_iter, self.tol, 0.0)
        check_real(self.alpha, "alpha", positive=True)

    def __call__(
        self, matvec: MatVec, b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None = None
    ) -> tuple[Params, SolveInfo]:
        """Sum the series for ``A x = b`` (``x0`` is ignored: the series starts at 0)."""
        b = dict(b)
        rhs_norm = float(tree_norm(b))
        term = tree_clone(b)
        total = tree_clone(b)
        iterations = 0
        for _ in range(self.max_iter):
            if self.tol > 0 and float(tree_norm(term)) <= self.tol * rhs_norm:
                break
            term = tree_axpy(-self.alpha, matvec(term), term)
            total = tree_axpy(1.0, term, total)
            iterations += 1
        residual = float(tree_norm(term))
        breakdown = None
        if not math.isfinite(residual):
            breakdown = "non-finite values in the Neumann series"
        elif residual > rhs_norm * (1 + 1e-6) and iterations > 0:
            breakdown = (
                f"the Neumann series diverges (||(I - αA)^K b|| = {residual:.3g} > ||b|| = "
                f"{rhs_norm:.3g}); decrease alpha or increase the damping"
            )
        x = {k: t * self.alpha for k, t in total.items()}
        converged = residual <= threshold(self.tol, 0.0, rhs_norm, dtype_of(b))
        return x, SolveInfo(iterations, residual, rhs_norm, converged, breakdown)
