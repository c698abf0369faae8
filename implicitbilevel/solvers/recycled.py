"""Recycled Krylov solvers: one matrix, many right-hand sides.

Within one BiSSL alternation every upper step solves ``A x = b`` with the same
``A = D + H/μ`` (thesis eq. 4.8-4.9, Algorithm 3) and a new ``b``. A Krylov solve discovers the
eigenvectors of ``A`` that slow it down (the smallest eigenvalues for CG, those nearest zero for
MINRES) and then forgets them; these solvers keep them. Each solve records the vectors it
multiplied by ``A`` and their products, and extracts from them (and the space it already had) a
``k``-dimensional space ``W`` with ``AW`` known, by Rayleigh–Ritz (CG: the smallest Ritz values)
or harmonic Rayleigh–Ritz (MINRES: the harmonic Ritz values nearest zero; Paige, Parlett &
van der Vorst 1995). The next solve on the same operator is **deflated** by ``W``: the
Galerkin projection onto ``W`` is solved exactly, and the Krylov method (CG or MINRES, unchanged:
the same stopping rules and breakdown reports) only has to resolve what is left:

- **CG** (Saad et al. 2000): ``x = x0 + W E⁻¹ Wᵀ r0 + x̃``, ``E = WᵀAW``, and CG on
  ``A x̃ = P_D r0`` (``P_D = I − AW E⁻¹ Wᵀ``) preconditioned by the symmetric positive definite
  ``P_Dᵀ M⁻¹ P_D + W E⁻¹ Wᵀ`` (the balancing form, Mandel 1993, which Tang, Nabben, Vuik &
  Erlangga 2009 find the most robust to rounding and to an inexact ``W``): its iterates are
  A-orthogonal to ``W``, so CG runs as on ``A`` with the eigenvalues of ``W`` removed;
- **MINRES** (GCRO form, Parks et al. 2006; RMINRES, Wang, de Sturler & Paulino 2007): with
  ``C = AU`` orthonormal (``U = W R⁻¹``, ``AW = CR``) and ``Π = I − CCᵀ``,
  ``x = x0 + U Cᵀ r0 + x̃ − U Cᵀ A x̃`` and MINRES on ``(ΠAΠ + σCCᵀ) x̃ = Π r0``, symmetric and
  equal to ``A`` compressed to ``C⊥`` there, so the residual ``b − A x = Π r0 − ΠA x̃`` is
  minimised over ``span(U) ⊕ K_m`` and non-increasing. ``Cᵀ A x̃`` costs no product: it is
  ``B y`` for MINRES's coefficients ``y`` (from the Lanczos tridiagonal the operator records)
  and ``B = CᵀAV`` (computed for the projection anyway). ``σ`` keeps the ``C`` directions away
  from an eigenvalue 0, where the Lanczos recurrence would amplify their rounding errors.

Per product: ``O(nk)`` for the projections; ``AW`` comes from recorded products, so the Galerkin
start costs none (with a preconditioner, RecycledMINRES spends one product on ``A x̃``).

The space is rebuilt when the operator changes (the solvers' ``prepare`` compares the curvature
operator of an :class:`~implicitbilevel.IJSystem`, held by weak reference, and ``μ``,
``D``, the ridge; for a plain callable, the callable itself): it is per-operator state and is
**not** checkpointed (:meth:`~implicitbilevel.LinearSolver.state_dict` stays empty; after a
resume the first solve rebuilds it). The BiSSL trainer checkpoints between alternations, and
every alternation brings a new operator, so a resumed run repeats the uninterrupted one.
:class:`~implicitbilevel.LanczosDeflation` seeds it from eigenpairs of ``H`` so that the first
solve is deflated too.

References:
    Y. Saad, M. Yeung, J. Erhel, F. Guyomarc'h. A deflated version of the conjugate gradient
    algorithm. SIAM J. Sci. Comput. 21(5), 1909-1926, 2000.
    J. Frank, C. Vuik. On the construction of deflation-based preconditioners. SIAM J. Sci.
    Comput. 23(2), 442-462, 2001.
    J. M. Tang, R. Nabben, C. Vuik, Y. A. Erlangga. Comparison of two-level preconditioners
    derived from deflation, domain decomposition and multigrid methods. J. Sci. Comput. 39,
    340-370, 2009.
    M. L. Parks, E. de Sturler, G. Mackey, D. D. Johnson, S. Maiti. Recycling Krylov subspaces
    for sequences of linear systems. SIAM J. Sci. Comput. 28(5), 1651-1674, 2006.
    S. Wang, E. de Sturler, G. H. Paulino. Large-scale topology optimization using
    preconditioned Krylov subspace methods with recycling. Int. J. Numer. Meth. Eng. 69(12),
    2441-2468, 2007 (RMINRES).
    C. C. Paige, B. N. Parlett, H. A. van der Vorst. Approximate solutions and eigenvalue bounds
    from Krylov subspaces. Numer. Linear Algebra Appl. 2(2), 115-133, 1995.
    J. Mandel. Balancing domain decomposition. Commun. Numer. Methods Eng. 9(3), 233-241, 1993.
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
from .cg import _cg
from .lanczos import LanczosDeflation
from .minres import _minres
from .subspaces import (
    Harvest,
    Key,
    Space,
    Tridiagonal,
    flat_of,
    harmonic_nearest_zero,
    operator_key,
    ratio,
    ritz_smallest,
    same_operator,
    tree_of,
)

__all__ = ["RecycleStats", "RecycledCG", "RecycledMINRES"]


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
    CG preconditioned by the balancing deflation (module docstring): its effective condition
    number is ``λ_max/λ_{k+1}`` when ``W`` spans the eigenvectors of the ``k`` smallest
    eigenvalues. With ``update`` the space is refreshed from ``[W, d_1, …]`` after every solve.

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
    ``W`` plus MINRES on ``A`` compressed to the complement of ``C = AW`` (GCRO form, module
    docstring), so the residual is minimised over ``span(W) ⊕ K_m`` and is **non-increasing**;
    with ``update`` the space is refreshed from ``[W, v_1, …]`` after every solve.

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
