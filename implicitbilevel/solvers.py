"""Linear solvers over parameter dicts: ``A x = b`` given only ``matvec(v) = A v``.

Every solver has the same shape, ``solver(matvec, b, x0=None) -> (x, SolveInfo)``, so swapping one
for another is changing one name. The matrix is never a type, only a callable; :class:`Dense`
materialises it column by column for small problems and reference checks.

In a bilevel problem the system is the implicit-Jacobian system of thesis eq. 4.8-4.9 (Algorithm 3):

.. math::
    \\Big(I + \\tfrac{1}{\\lambda + \\lambda_{damp}} \\nabla^2_\\theta \\mathcal{L}^P\\Big) u = v,

but nothing here depends on that; the solvers are generic.

Two attributes tell :class:`~implicitbilevel.BilevelProblem` *which* system a solver is meant for:
``include_uncoupled`` (solve over every lower-level variable, the concatenated-head system of
Sec. 5.3.4, instead of only the coupled ones, Prop. 4.2) and ``head_damping`` (a ridge added on the
uncoupled block, which is otherwise only ``H_φφ/(λ+λ_damp)`` and may be singular).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .tree import (
    Params,
    tree_axpy,
    tree_block_dots,
    tree_clone,
    tree_dot,
    tree_flatten,
    tree_norm,
    tree_sub,
    tree_unflatten,
    tree_zeros_like,
)

__all__ = [
    "CG",
    "ConcatenatedHeadCG",
    "Dense",
    "LinearSolver",
    "MatVec",
    "Neumann",
    "SolveInfo",
    "SolverBreakdownError",
]

MatVec = Callable[[Params], Params]
_RESIDUAL_GROWTH = 10.0


@dataclass
class SolveInfo:
    """Diagnostics of one linear solve.

    Attributes:
        iterations: matrix-vector products spent (for :class:`Dense`, the columns materialised).
        residual_norm: ``||b - A x||_2`` as the solver tracks it (CG: the recursive residual;
            Neumann: the residual of the series one term shorter, an upper bound when it
            contracts; Dense: exact).
        rhs_norm: ``||b||_2``.
        converged: whether ``residual_norm <= max(tol * rhs_norm, atol)``, where the threshold is
            never below ``10·eps·rhs_norm`` (the dtype's rounding floor).
        breakdown: ``None``, or why the solver stopped early (non-positive curvature, non-finite
            values, a diverging series, a singular matrix).
    """

    iterations: int
    residual_norm: float
    rhs_norm: float
    converged: bool
    breakdown: str | None = None

    @property
    def relative_residual(self) -> float:
        """``residual_norm / rhs_norm`` (0 when ``b = 0``)."""
        return self.residual_norm / self.rhs_norm if self.rhs_norm > 0 else 0.0


class SolverBreakdownError(RuntimeError):
    """A linear solve broke down; ``info`` holds its diagnostics."""

    def __init__(self, message: str, info: SolveInfo) -> None:
        super().__init__(message)
        self.info = info


def _threshold(tol: float, atol: float, rhs_norm: float, dtype: torch.dtype) -> float:
    # Never below the rounding floor: a residual at machine precision is as converged as it gets.
    return max(tol * rhs_norm, atol, 10 * torch.finfo(dtype).eps * rhs_norm)


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return tree_dot(dict(enumerate(a)), dict(enumerate(b)))  # type: ignore[arg-type]


def _dtype(tree: Mapping[str, Tensor]) -> torch.dtype:
    return next(iter(tree.values())).dtype if tree else torch.float32


def _validate(max_iter: int, tol: float, atol: float) -> None:
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if not (tol >= 0 and atol >= 0):  # also rejects NaN
        raise ValueError(f"tol and atol must be >= 0, got tol={tol}, atol={atol}")


@dataclass
class LinearSolver(abc.ABC):
    """Base of the solvers: the two attributes that choose the system, and the call protocol.

    Attributes:
        include_uncoupled: solve over all lower-level variables (the concatenated head of
            Sec. 5.3.4) rather than only the ones the regulariser couples to the upper level.
        head_damping: ridge ``ε`` added on the uncoupled block of the system (only used with
            ``include_uncoupled``), making ``H_φφ/(λ+λ_damp) + εI`` safer to invert.
    """

    include_uncoupled: bool = False
    head_damping: float = 0.0

    @abc.abstractmethod
    def __call__(
        self, matvec: MatVec, b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None = None
    ) -> tuple[Params, SolveInfo]:
        """Solve ``A x = b``; ``matvec(v) = A v``. Returns the solution and its diagnostics."""


@dataclass
class CG(LinearSolver):
    """Conjugate gradients for ``A x = b``, ``A`` symmetric positive definite (thesis Algorithm 1).

    Iterates ``α = rᵀr / dᵀAd``, ``x += α d``, ``r -= α A d``, ``β = r'ᵀr' / rᵀr``,
    ``d = r' + β d``.
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
    """

    max_iter: int = 5
    tol: float = 0.0
    atol: float = 0.0
    warm_start: bool = False
    blockwise: bool = False
    _previous: Params | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self.max_iter, self.tol, self.atol)

    def __call__(
        self, matvec: MatVec, b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None = None
    ) -> tuple[Params, SolveInfo]:
        """Solve ``A x = b``; ``matvec(v) = A v``. Returns the solution and its diagnostics."""
        b = dict(b)
        if self.blockwise:
            return _blockwise_cg(matvec, b, self.max_iter)
        if x0 is None and self.warm_start and self._previous is not None:
            if self._previous.keys() == b.keys():
                x0 = self._previous
        x, info = _cg(matvec, b, x0, self.max_iter, self.tol, self.atol)
        if self.warm_start:
            self._previous = tree_clone(x)
        return x, info


def _cg(
    matvec: MatVec, b: Params, x0: Mapping[str, Tensor] | None, max_iter: int, tol: float,
    atol: float,
) -> tuple[Params, SolveInfo]:
    rhs_norm = float(tree_norm(b))
    threshold = _threshold(tol, atol, rhs_norm, _dtype(b))
    if x0 is None:
        x = tree_zeros_like(b)
        r = tree_clone(b)
    else:
        x = tree_clone(x0)
        r = tree_sub(b, matvec(x))
    d = tree_clone(r)
    keys = list(b.keys())
    xs, rs_, ds = [x[k] for k in keys], [r[k] for k in keys], [d[k] for k in keys]
    # Scalars are Python floats: the breakdown and tolerance checks read them on the host every
    # iteration anyway, and float step sizes let every update run in place with one fused kernel.
    rs = float(_dot(rs_, rs_))
    breakdown = None
    iterations = 0
    for k in range(max_iter):
        if not math.isfinite(rs):
            breakdown = f"non-finite residual at iteration {k}"
            break
        if math.sqrt(rs) <= threshold:
            break
        ad = matvec(dict(zip(keys, ds)))
        ads = [ad[k] for k in keys]
        iterations += 1
        curvature = float(_dot(ds, ads))
        if not math.isfinite(curvature):
            breakdown = f"non-finite curvature dᵀAd at iteration {k}"
            break
        if curvature <= 0.0:
            rayleigh = curvature / max(float(_dot(ds, ds)), 1e-300)
            breakdown = (
                f"non-positive curvature at iteration {k}: dᵀAd/dᵀd = {rayleigh:.3g}, so the "
                "system matrix is not positive definite; increase the damping (λ_damp) or λ, "
                "start from a pretrained model, or use head_damping for the head block"
            )
            break
        alpha = rs / curvature
        torch._foreach_add_(xs, ds, alpha=alpha)
        torch._foreach_add_(rs_, ads, alpha=-alpha)
        rs_new = float(_dot(rs_, rs_))
        torch._foreach_mul_(ds, rs_new / rs)
        torch._foreach_add_(ds, rs_)
        rs = rs_new
    residual = math.sqrt(max(rs, 0.0)) if math.isfinite(rs) else math.inf
    if breakdown is None and x0 is None and residual > _RESIDUAL_GROWTH * rhs_norm:
        # From x0 = 0 the residual starts at ||b||. On a positive definite system it can grow by
        # at most sqrt(cond(A)); a tenfold growth means A is indefinite along directions whose
        # curvature happened to stay positive, or is too badly conditioned for N_c iterations.
        breakdown = (
            f"residual grew to {residual / max(rhs_norm, 1e-300):.3g}×||b||; the system matrix is "
            "indefinite or badly conditioned: increase the damping (λ_damp) or λ"
        )
    info = SolveInfo(iterations, residual, rhs_norm, residual <= threshold, breakdown)
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


@dataclass
class ConcatenatedHeadCG(CG):
    """CG over all lower-level variables ``ω = (θ_P, φ_P)`` (thesis Sec. 5.3.4, Cor. 5.6).

    Solves ``A_ω z = [v; 0]`` with ``A_ω = diag(I_L, 0) + H_ω/(λ+λ_damp)`` and keeps the backbone
    block of ``z``. The head block of ``A_ω`` is only ``H_φφ/(λ+λ_damp)``, which away from a
    minimum can be singular or indefinite: CG then stops on non-positive curvature and reports it.
    ``head_damping = ε`` solves with ``A_ω + diag(0, εI)`` instead (a documented approximation).
    """

    include_uncoupled: bool = True


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
    """

    max_iter: int = 5
    alpha: float = 1.0
    tol: float = 0.0

    def __post_init__(self) -> None:
        _validate(self.max_iter, self.tol, 0.0)
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")

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
        converged = residual <= _threshold(self.tol, 0.0, rhs_norm, _dtype(b))
        return x, SolveInfo(iterations, residual, rhs_norm, converged, breakdown)


@dataclass
class Dense(LinearSolver):
    """Exact solve: materialise ``A`` with one product per unknown, then ``torch.linalg.solve``.

    For small problems and as the reference the iterative solvers are tested against
    (Theorem 3.2 evaluated literally).

    Args:
        max_dim: refuse systems with more unknowns than this (the matrix has ``n²`` entries and
            costs ``n`` products).
    """

    max_dim: int = 4096

    def __post_init__(self) -> None:
        if not (isinstance(self.max_dim, int) and self.max_dim >= 1):
            raise ValueError(f"max_dim must be an int >= 1, got {self.max_dim!r}")

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
