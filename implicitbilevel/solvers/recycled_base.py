"""The shared base of the recycled Krylov solvers: the recycle space ``W`` (with ``AW``), its
per-operator key, and the solve that records products, deflates by ``W`` and refreshes it.

:class:`RecycledCG <implicitbilevel.RecycledCG>` and
:class:`RecycledMINRES <implicitbilevel.RecycledMINRES>` differ only in how a solve is deflated
and which space is kept; the method is described in :mod:`implicitbilevel.solvers.recycled`.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._checks import check_bool, check_int
from ..tree import Params, tree_clone, tree_norm, tree_sub, tree_unflatten
from .base import KrylovSolver, MatVec, SolveInfo, dtype_of, threshold
from .lanczos import LanczosDeflation
from .subspaces import (
    Harvest,
    Key,
    Space,
    flat_of,
    harmonic_nearest_zero,
    operator_key,
    ritz_smallest,
    same_operator,
)

__all__ = ["RecycleStats"]


@dataclass(frozen=True)
class RecycleStats:
    """What the last solve of a recycled solver did (``solver.last_stats``).

    Attributes:
        products: products spent (as ``SolveInfo.iterations``).
        deflated: the dimension of the space ``W`` the solve was deflated by (0: a plain solve).
        galerkin_residual: the part of the initial residual left after the Galerkin projection
            onto ``W`` (``‖P_D r0‖/‖r0‖`` for CG, ``‖(I − CCᵀ) r0‖/‖r0‖`` for MINRES; 1 without
            deflation).
        ritz_values: ``θ``, the eigenvalues of ``WᵀAW`` (Ritz values of ``A`` on ``W``).
        solve_index: the solves on this operator before this one (0: the first).
        products_saved: the first solve's products on this operator minus this solve's
            (``None`` for the first solve): an estimate of the products deflation saved, exact in
            meaning when both solves run to the same tolerance on similar right-hand sides.
        recycled_dim: the dimension of the space kept for the next solve.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> M = torch.diag(torch.tensor([9.0, 3.0, 0, 0, 0], dtype=torch.float64))  # PSD, rank 2
        >>> H = ib.HessianOperator(lambda p: 0.5 * p["w"] @ M @ p["w"],
        ...                        {"w": torch.zeros(5).double()})
        >>> A = ib.IJSystem(H, mu=0.5, identity=["w"])                     # A = I + M / mu
        >>> b = {"w": torch.ones(5).double()}
        >>> solver = ib.RecycledCG(max_iter=3, recycle_dim=2)
        >>> _ = solver(A, b)
        >>> _ = solver(A, {"w": torch.arange(1.0, 6.0).double()})
        >>> solver.last_stats.solve_index, solver.last_stats.products_saved   # the second solve
        (1, 1)
    """

    products: int
    deflated: int
    galerkin_residual: float
    ritz_values: tuple[float, ...]
    solve_index: int
    products_saved: int | None
    recycled_dim: int


@dataclass
class _Recycled(KrylovSolver):
    """The recycle space, its per-operator key and the deflated solve CG and MINRES share."""

    recycle_dim: int = 16
    window: int = 20
    update: bool = True
    deflation: LanczosDeflation | None = None
    last_stats: RecycleStats | None = field(default=None, init=False, repr=False, compare=False)
    _space: Space | None = field(default=None, init=False, repr=False, compare=False)
    _key: Key | None = field(default=None, init=False, repr=False, compare=False)
    _solves: int = field(default=0, init=False, repr=False, compare=False)
    _first_products: int | None = field(default=None, init=False, repr=False, compare=False)

    _positive = False  # CG keeps positive Ritz values only

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.recycle_dim, "recycle_dim", 0)
        check_int(self.window, "window", 1)
        check_bool(self.update, "update")
        if self.deflation is not None and not isinstance(self.deflation, LanczosDeflation):
            raise TypeError(f"deflation must be None or a LanczosDeflation, got "
                            f"{type(self.deflation).__name__}")

    @property
    def last_products_saved(self) -> int | None:
        """``last_stats.products_saved`` (``None`` before a deflated solve)."""
        return None if self.last_stats is None else self.last_stats.products_saved

    @property
    def recycled_dim(self) -> int:
        """The dimension of the space held for the next solve, 0 when there is none."""
        return 0 if self._space is None else int(self._space[0].shape[0])

    def reset(self) -> None:
        """Forget the recycle space (needed only for a plain callable whose matrix changed)."""
        self._space, self._key, self._solves, self._first_products = None, None, 0, None

    def prepare(self, matvec: MatVec) -> float:
        """Drop the recycle space when ``matvec`` is another operator (seed it from
        ``deflation`` if given) and prepare the preconditioner; the seconds spent."""
        seconds = super().prepare(matvec)
        if self._key is not None and same_operator(self._key, operator_key(matvec)):
            return seconds
        start = time.perf_counter()
        self.reset()
        self._key = operator_key(matvec)
        if self.deflation is not None:
            space = self.deflation.space(matvec, self._positive)
            self._space = space if space[0].shape[0] else None
        return seconds + time.perf_counter() - start

    def solve(
        self, matvec: MatVec, b: Params, x0: Mapping[str, Tensor] | None,
        precondition: Callable[[Params], Params] | None,
    ) -> tuple[Params, SolveInfo]:
        """One deflated solve from ``x0``; the recycle space is refreshed from its products."""
        keys = list(b)
        if not keys:
            return {}, SolveInfo(0, 0.0, 0.0, True)
        b = {k: b[k].detach() for k in keys}
        dtype = dtype_of(b)
        work = torch.promote_types(dtype, torch.float32)
        rhs_norm = float(tree_norm(b))
        if not math.isfinite(rhs_norm):
            return tree_clone(b), SolveInfo(0, math.inf, rhs_norm, False,
                                            "non-finite right-hand side b")
        stop_at = threshold(self.tol, self.atol, rhs_norm, dtype)
        used = 0
        if x0 is None:
            x, r = None, b
        else:
            x = tree_clone({k: x0[k] for k in keys})
            if self.max_iter == 0:
                return x, SolveInfo(0, math.nan, rhs_norm, False)
            r, used = tree_sub(b, matvec(x)), 1
        space = self._space
        r_flat = flat_of(r, b, work)
        harvest = None
        if self.recycle_dim > 0 and (space is None or self.update):
            harvest = Harvest(self.recycle_dim, self.window, space, self._extract)

        def recorded(v: Params) -> Params:  # A v, recording (v, A v) for the harvest
            av = matvec(v)
            if harvest is not None:
                harvest.add(flat_of(v, b, work), flat_of(av, b, work))
            return av

        step_flat, info, galerkin = self._deflated(
            recorded, r_flat, space, max(self.max_iter - used, 0), stop_at, precondition, b)
        step = tree_unflatten(step_flat.to(dtype), b)
        x = step if x is None else {k: x[k] + step[k] for k in keys}
        products = used + info.iterations
        residual = info.residual_norm
        solve_info = SolveInfo(products, residual, rhs_norm, residual <= stop_at, info.breakdown)
        if harvest is not None and math.isfinite(residual):
            new = harvest.result()
            if new is not None:
                self._space = new
        if self._solves == 0:
            self._first_products = products
        self.last_stats = RecycleStats(
            products=products, deflated=0 if space is None else int(space[0].shape[0]),
            galerkin_residual=galerkin,
            ritz_values=() if space is None else tuple(space[2].tolist()),
            solve_index=self._solves,
            products_saved=None if self._solves == 0 or self._first_products is None
            else self._first_products - products,
            recycled_dim=self.recycled_dim)
        self._solves += 1
        return x, solve_info

    @abc.abstractmethod
    def _deflated(self, apply: MatVec, r: Tensor, space: Space | None, budget: int,
                  stop_at: float, precondition: Callable[[Params], Params] | None, like: Params,
                  ) -> tuple[Tensor, SolveInfo, float]:
        """``A s = r`` deflated by ``space`` in at most ``budget`` products of ``apply``: the
        flat step ``s``, the solve's diagnostics and ``‖r'‖/‖r‖`` after the Galerkin part."""

    def _extract(self, z: Tensor, az: Tensor, k: int) -> Space | None:
        """The ``k``-dimensional space to keep from the rows of ``z`` and their products."""
        return ritz_smallest(z, az, k) if self._positive else harmonic_nearest_zero(z, az, k)
