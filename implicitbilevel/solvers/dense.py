"""Exact solves by materialising the matrix (Theorem 3.2 evaluated literally)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_int
from ..tree import Params, tree_flatten, tree_unflatten, tree_zeros_like
from .base import LinearSolver, MatVec, SolveInfo

__all__ = ["Dense"]


@dataclass
class Dense(LinearSolver):
    """Exact solve: materialise ``A`` with one product per unknown, then ``torch.linalg.solve``.

    For small problems and as the reference the iterative solvers are tested against
    (Theorem 3.2 evaluated literally).

    Args:
        max_dim: refuse systems with more unknowns than this (the matrix has ``n²`` entries and
            costs ``n`` products).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> b = {"w": torch.tensor([1.0, -1.0], dtype=torch.float64)}
        >>> x, info = ib.Dense()(lambda v: {"w": Q @ v["w"]}, b)
        >>> torch.allclose(x["w"], torch.linalg.solve(Q, b["w"])), info.iterations
        (True, 2)
    """

    max_dim: int = 4096

    def __post_init__(self) -> None:
        check_int(self.max_dim, "max_dim", 1)

    def matrix(self, matvec: MatVec, like: Mapping[str, Tensor]) -> Tensor:
        """Return the dense ``n × n`` matrix of ``matvec`` over vectors shaped like ``like``."""
        flat = tree_flatten(like)
        n = flat.numel()
        if n > self.max_dim:
            raise ValueError(
                f"Dense solve over {n} unknowns exceeds max_dim={self.max_dim}; use CG or raise "
                "max_dim"
            )
        columns = []
        for i in range(n):
            e = torch.zeros_like(flat)
            e[i] = 1
            columns.append(tree_flatten(matvec(tree_unflatten(e, like))))
        return torch.stack(columns, dim=1)

    def __call__(
        self, matvec: MatVec, b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None = None
    ) -> tuple[Params, SolveInfo]:
        """Solve ``A x = b`` exactly (``x0`` is ignored)."""
        b = dict(b)
        a = self.matrix(matvec, b)
        rhs = tree_flatten(b)
        rhs_norm = float(rhs.norm())
        try:
            solution = torch.linalg.solve(a, rhs)
        except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
            info = SolveInfo(rhs.numel(), rhs_norm, rhs_norm, False, f"singular matrix: {err}")
            return tree_zeros_like(b), info
        residual = float((rhs - a @ solution).norm())
        breakdown = None if math.isfinite(residual) else "non-finite values in the dense solve"
        info = SolveInfo(rhs.numel(), residual, rhs_norm, breakdown is None, breakdown)
        return tree_unflatten(solution, b), info
