"""The solver protocol: ``solver(matvec, b, x0=None) -> (x, SolveInfo)`` over parameter dicts.

A solver only solves ``A x = b`` given ``matvec(v) = A v``; which system is solved (over the coupled
lower variables or all of them, with or without a ridge on the head block) is decided by
:class:`~implicitbilevel.BilevelProblem`, as a ridge is a matvec wrapper in JAXopt.

Besides the call, every :class:`LinearSolver` has a small protocol with no-op defaults, so code
that drives a solver (the implicit step, the BiSSL trainer) never asks which one it holds:

- :meth:`~LinearSolver.prepare` does the work that depends only on the matrix, once per operator
  (a Nyström sketch of the curvature, an M-FAC factorisation), as Lineax's ``init`` does; each
  call then solves one right-hand side;
- :meth:`~LinearSolver.observe` receives the lower-level gradients of a training loop (used by
  :class:`~implicitbilevel.MFAC`; :attr:`~LinearSolver.observes_gradients` says whether to send
  them);
- :meth:`~LinearSolver.state_dict` / :meth:`~LinearSolver.load_state_dict` checkpoint what the
  solver carries between alternations.
"""

from __future__ import annotations

import abc
import math
import numbers
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import check_bool, check_int
from ..errors import SolverBreakdownError
from ..tree import Params, tree_clone, tree_dot, tree_norm, tree_sub

__all__ = [
    "KrylovSolver",
    "LinearSolver",
    "MatVec",
    "Preconditioner",
    "SolveInfo",
    "SolverBreakdownError",
]

MatVec = Callable[[Params], Params]
"""``v ↦ A v`` over parameter dicts."""

Preconditioner = Callable[[MatVec], Callable[[Params], Params]]
"""Given the system's ``matvec``, return ``r ↦ M⁻¹ r`` for a symmetric positive definite ``M``."""


@dataclass
class SolveInfo:
    """Diagnostics of one linear solve.

    Attributes:
        iterations: matrix-vector products spent (for :class:`Dense`, the columns materialised;
            for solvers that reuse curvature, the products of the solve itself, not of building it).
        residual_norm: ``||b - A x||_2`` as the solver tracks it (CG: the recursive residual;
            MINRES: its residual recurrence; Neumann: the residual of the series one term shorter,
            an upper bound when it contracts; Dense: exact; Nyström-Woodbury: not tracked, ``nan``
            unless measured).
        rhs_norm: ``||b||_2``.
        converged: whether ``residual_norm <= max(tol * rhs_norm, atol)``, where the threshold is
            never below ``10·eps·rhs_norm`` (the dtype's rounding floor).
        breakdown: ``None``, or why the solver stopped early (non-positive curvature, non-finite
            values, a diverging series, a singular matrix).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> b = {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}
        >>> _, info = ib.CG(max_iter=1)(lambda v: {"w": Q @ v["w"]}, b)
        >>> info.rhs_norm, info.iterations
        (5.0, 1)
        >>> info.relative_residual == info.residual_norm / info.rhs_norm
        True
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


class LinearSolver(abc.ABC):
    """Base of the solvers: ``solver(matvec, b, x0=None) -> (x, SolveInfo)``.

    Attributes:
        observes_gradients: whether :meth:`observe` uses the gradients it is given (a training
            loop computes and sends them only then).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> class Jacobi(ib.LinearSolver):                        # x = b / diag(A), one product
        ...     def __call__(self, matvec, b, x0=None):
        ...         d = matvec({n: torch.ones_like(t) for n, t in b.items()})  # A is diagonal
        ...         x = {n: b[n] / d[n] for n in b}
        ...         return x, ib.SolveInfo(1, 0.0, float(torch.linalg.vector_norm(b["w"])), True)
        >>> A = torch.tensor([2.0, 4.0], dtype=torch.float64)
        >>> x, info = Jacobi()(lambda v: {"w": A * v["w"]}, {"w": torch.tensor([1.0, 1.0],
        ...                    dtype=torch.float64)})
        >>> x["w"].tolist()
        [0.5, 0.25]
    """

    observes_gradients: ClassVar[bool] = False

    def prepare(self, matvec: MatVec) -> float:
        """Do the work that depends only on the matrix, once per operator.

        Called before each solve by the implicit step; a solver prepared for this operator
        already returns at once. The default does nothing.

        Returns:
            the seconds spent (0 when nothing was done).
        """
        return 0.0

    def observe(self, grads: Mapping[str, Tensor]) -> None:
        """Receive a lower-level gradient of a training loop (default: ignored)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What the solver carries across alternations, for checkpoints (default: nothing)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (default: nothing to restore)."""
        return None

    @abc.abstractmethod
    def __call__(
        self, matvec: MatVec, b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None = None
    ) -> tuple[Params, SolveInfo]:
        """Solve ``A x = b``; ``matvec(v) = A v``. Returns the solution and its diagnostics."""


@dataclass
class KrylovSolver(LinearSolver):
    """The settings and call protocol CG and MINRES share: products, tolerances, warm starts and
    an optional preconditioner. Subclasses implement :meth:`solve` for one system.

    Attributes:
        max_iter: maximum matrix-vector products.
        tol: relative residual tolerance (``0``: run ``max_iter`` products unless the residual
            reaches the rounding floor ``10·eps·||b||`` first).
        atol: absolute residual tolerance.
        warm_start: start from the previous call's solution when ``x0`` is not given and the names
            match (useful when consecutive systems are close, as over the upper-level steps of an
            alternation). A warm-started solve spends one of its ``max_iter`` products on the
            starting residual ``b − A x0``, so it needs ``max_iter ≥ 2`` to improve on ``x0``.
        preconditioner: ``None``, or a :data:`Preconditioner`: called with the system's
            ``matvec``, it returns ``r ↦ M⁻¹r`` for a symmetric positive definite ``M ≈ A``.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> from implicitbilevel.solvers.base import KrylovSolver
        >>> A = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]],
        ...                  dtype=torch.float64)
        >>> solver = ib.CG(max_iter=2, warm_start=True)      # each call starts from the last x
        >>> isinstance(solver, KrylovSolver)
        True
        >>> b = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
        >>> _, first = solver(lambda v: {"w": A @ v["w"]}, b)
        >>> _, second = solver(lambda v: {"w": A @ v["w"]}, b)
        >>> second.residual_norm < first.residual_norm
        True
    """

    max_iter: int = 5
    tol: float = 0.0
    atol: float = 0.0
    warm_start: bool = False
    preconditioner: Preconditioner | None = None
    _previous: Params | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate(self.max_iter, self.tol, self.atol)
        check_bool(self.warm_start, "warm_start")
        if self.preconditioner is not None and not callable(self.preconditioner):
            raise TypeError("preconditioner must be None or callable (e.g. "
                            f"NystromPreconditioner(rank=20)), got {self.preconditioner!r}")

    def __call__(
        self, matvec: MatVec, b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None = None
    ) -> tuple[Params, SolveInfo]:
        """Solve ``A x = b``; ``matvec(v) = A v``. Returns the solution and its diagnostics."""
        b = dict(b)
        if x0 is None and self.warm_start and self._previous is not None:
            if self._previous.keys() == b.keys():
                x0 = self._previous
        self.prepare(matvec)
        apply = None if self.preconditioner is None else self.preconditioner(matvec)
        x, info = self.solve(matvec, b, x0, apply)
        if self.warm_start:
            self._previous = tree_clone(x)
        return x, info

    def prepare(self, matvec: MatVec) -> float:
        """Prepare the preconditioner for this operator (the seconds spent; see
        :meth:`LinearSolver.prepare`)."""
        prepare = getattr(self.preconditioner, "prepare", None)
        return 0.0 if prepare is None else float(prepare(matvec))

    @abc.abstractmethod
    def solve(
        self, matvec: MatVec, b: Params, x0: Mapping[str, Tensor] | None,
        precondition: Callable[[Params], Params] | None,
    ) -> tuple[Params, SolveInfo]:
        """One solve from ``x0`` (``None``: zero) with ``r ↦ M⁻¹r`` (``None``: ``M = I``)."""


def threshold(tol: float, atol: float, rhs_norm: float, dtype: torch.dtype) -> float:
    """The convergence threshold, never below the rounding floor ``10·eps·||b||``."""
    return max(tol * rhs_norm, atol, 10 * torch.finfo(dtype).eps * rhs_norm)


def direct_solve_info(matvec: MatVec, b: Params, x: Params, tol: float,
                      measure_residual: bool) -> SolveInfo:
    """The :class:`SolveInfo` of a direct (non-iterative) solve ``x ≈ A⁻¹ b``: one iteration, and
    the true residual ``‖b − A x‖`` from one more product when ``measure_residual`` (else NaN,
    not converged); non-finite ``b`` or residual is a breakdown."""
    rhs_norm = float(tree_norm(b))
    breakdown = None if math.isfinite(rhs_norm) else "non-finite right-hand side"
    if not measure_residual:
        return SolveInfo(0, math.nan, rhs_norm, False, breakdown)
    residual = float(tree_norm(tree_sub(b, matvec(x))))
    if breakdown is None and not math.isfinite(residual):
        breakdown = "non-finite residual"
    converged = residual <= threshold(tol, 0.0, rhs_norm, dtype_of(b))
    return SolveInfo(1, residual, rhs_norm, converged, breakdown)


def list_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """``⟨a, b⟩`` of two tensor lists in the same order."""
    return tree_dot(dict(enumerate(a)), dict(enumerate(b)))  # type: ignore[arg-type]


def dtype_of(tree: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype of the first tensor (float32 for an empty dict)."""
    return next(iter(tree.values())).dtype if tree else torch.float32


def validate(max_iter: int, tol: float, atol: float) -> None:
    """Reject a non-integer or negative ``max_iter`` and negative or non-finite tolerances."""
    check_int(max_iter, "max_iter", 0)
    for name, value in (("tol", tol), ("atol", atol)):
        check_real(value, name)


def check_real(value: float, name: str, *, positive: bool = False) -> None:
    """Reject anything but a finite real number ``>= 0`` (``> 0`` with ``positive``)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value < 0 or (positive and value == 0)):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, "
                         f"got {value!r}")


def per_operator(held: tuple[Callable[[], Any], Any] | None, curvature: Any,
                 build: Callable[[], Any]) -> tuple[tuple[Callable[[], Any], Any], float]:
    """``held`` when it was built for ``curvature`` (held by weak reference), else ``build()``
    with a weak reference to ``curvature``; and the seconds spent building (0 when held)."""
    if held is not None and held[0]() is curvature:
        return held, 0.0
    start = time.perf_counter()
    value = build()
    try:
        ref: Callable[[], Any] = weakref.ref(curvature)
    except TypeError:  # an operator that takes no weak references is held
        ref = lambda: curvature  # noqa: E731
    return (ref, value), time.perf_counter() - start
