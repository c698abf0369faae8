"""MINRES over parameter dicts (Paige & Saunders 1975), optionally preconditioned.

Solves ``A x = b`` for symmetric, possibly indefinite ``A``. In BiSSL ``A = I + H/μ`` (eq. 4.8-4.9,
Algorithm 3) is positive definite only where the curvature ``H`` is positive semi-definite or small
against ``μ``; MINRES needs symmetry only, so it solves the system where
:class:`~implicitbilevel.CG` breaks down.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..tree import Params, tree_clone, tree_norm, tree_zeros_like
from .base import (
    KrylovSolver,
    MatVec,
    SolveInfo,
    dtype_of,
    list_dot,
    threshold,
)

__all__ = ["MINRES"]

# The residual ``r`` is in A's numerical null space when ``||A r|| <= eps^_SINGULAR·||T||·||r||``
# (``eps^(2/3)``: 4e-11 in float64, 2e-5 in float32). Since ``||A r|| >= ||r|| / ||A⁻¹||``, a
# consistent system is flagged only if its condition number exceeds ``eps^(-2/3)``.
_SINGULAR = 2.0 / 3.0


@dataclass
class MINRES(KrylovSolver):
    """MINRES for ``A x = b``, ``A`` symmetric and possibly indefinite (Paige & Saunders 1975).

    The ``k``-th iterate minimises ``||b − A x||_2`` over ``x ∈ x0 + K_k(A, r0)``, ``r0 = b − A x0``
    (with a preconditioner: ``||b − A x||_{M⁻¹}`` over ``x0 + K_k(M⁻¹A, M⁻¹r0)``), by the Lanczos
    process on ``A`` and a QR factorisation of its tridiagonal matrix updated with one Givens
    rotation per step. The minimised residual norm ``φ_k`` is therefore **non-increasing** in ``k``
    and available from the rotations without forming ``b − A x_k``. Per step: one product, one
    inner product, one norm and seven fused in-place vector updates (three Lanczos vectors, two
    search directions, the iterate).

    Why it suits the implicit-Jacobian system ``I + H/μ`` on real networks: away from a minimum of
    the lower-level loss the Hessian ``H`` has negative eigenvalues, and once one is below ``−μ``
    the system is indefinite (CG then meets non-positive curvature and stops); the
    concatenated-head system ``diag(I, 0) + H_ω/μ`` of thesis Sec. 5.3.4 is indefinite even near a
    minimum, as ``H_ω`` couples the head to the backbone. MINRES needs only symmetry, and its
    residual never grows, so truncating it after a few products (the thesis's ``N_c = 5``) is safe.

    Stops after ``max_iter`` products; when the residual is at most
    ``max(tol·||b||, atol, 10·eps·||b||)`` (converged); when the Lanczos process terminates
    (``β_{k+1} = 0``: the Krylov space is invariant and the iterate is the exact solution there, so
    ``φ_k = 0``; converged, not a breakdown; a ``β_{k+1}`` at rounding level only makes the next
    Lanczos vector noise, which does no harm, and the residual test decides); or on a breakdown,
    which returns the last good iterate with the reason (nothing is silently repaired):

    - non-finite values (in ``b``, ``A v`` or ``M⁻¹r``);
    - a preconditioner that is not positive definite (``rᵀM⁻¹r < 0``, or ``= 0`` for ``r ≠ 0``);
    - a singular system: the recurrence finds the residual in ``A``'s numerical null space,
      ``||A r_{k−1}|| = φ_{k−1}·hypot(γ̄_k, δ̄_{k+1}) <= eps^(2/3)·||T||·||r_{k−1}||`` (at an
      invariant Krylov space this is ``γ̄_k = 0`` with ``φ_{k−1} ≠ 0``), so ``b`` is not in the
      range of ``A`` and ``x_{k−1}`` is a least-squares solution (in the ``M⁻¹``-norm with a
      preconditioner); or an iterate farther from ``x0`` than
      ``d = (||r0|| + max_j ||r_j||)/(eps^(2/3)·||A||)``, or a step longer than ``2d``, which no
      system with ``cond(A) <= eps^(-2/3)`` needs (this catches the same case once the Lanczos
      vectors have lost orthogonality and ``γ̄_k`` no longer vanishes; the iterate before is
      returned, a least-squares solution perhaps only to a few digits, and its residual, from the
      recurrence, may understate the true one). ``||T||``, the largest column norm of the
      Lanczos tridiagonal, estimates ``||A||`` (the preconditioned operator's) from the Krylov
      space seen so far; the step test bounds ``||A||_2`` below by ``||T||`` or, with a
      preconditioner, by ``max_k ||A v_k|| / ||v_k||``. A consistent system is never flagged
      unless ``cond(A) > eps^(-2/3)``; on a singular consistent one, MINRES from ``x0 = 0``
      converges to the minimum-norm solution.

    Args:
        max_iter: maximum matrix-vector products, including the one for ``r0 = b − A x0`` when
            ``x0`` is given or warm-started (``max_iter − 1`` Lanczos steps remain then).
        tol: relative residual tolerance; ``0`` runs ``max_iter`` products unless the residual
            reaches the rounding floor ``10·eps·||b||`` first (as it does when the Lanczos
            process terminates).
        atol: absolute residual tolerance.
        warm_start: start from the previous call's solution when ``x0`` is not given and the
            parameter names match (useful when consecutive systems are close).
        preconditioner: ``None``, or a :data:`~implicitbilevel.solvers.Preconditioner`: called
            with the system's ``matvec``, it returns ``r ↦ M⁻¹r`` for a symmetric positive
            definite ``M`` (it need not approximate ``A``, which may be indefinite; ``M ≈ |A|``
            is the ideal). Costs per step one application, an inner product in place of the
            norm, three more vector updates (the 2-norm residual) and three norms (that residual,
            ``||A v_k||`` and ``||v_k||``, for the singularity test).

    Returns ``(x, SolveInfo)``; ``SolveInfo`` holds ``iterations`` (products spent, including the
    one for ``r0``), ``residual_norm``, ``rhs_norm = ||b||_2``, ``converged`` and ``breakdown``.
    Without a preconditioner ``residual_norm`` is the recurrence's ``φ_k``, equal to
    ``||b − A x_k||_2`` in exact arithmetic and non-increasing in ``k``; in floating point it can
    drift below the true residual by about ``eps·cond(A)·||A||·||x||`` once the residual is that
    small. With a preconditioner the recurrence's ``φ_k`` is ``||b − A x_k||_{M⁻¹}``
    (non-increasing); ``residual_norm`` is instead ``||r_k||_2`` for the residual vector updated
    by ``r_k = s_k² r_{k−1} − c_k φ_k M v_{k+1}`` (``c_k, s_k`` the ``k``-th rotation; no extra
    product, one vector update and a norm per step), which equals ``||b − A x_k||_2`` in exact
    arithmetic but need not decrease monotonically; the stopping test uses it, so ``tol`` means
    the same with and without a preconditioner. With ``x0`` and ``max_iter = 0`` nothing is
    measured: ``x0`` is returned with ``residual_norm = nan``.

    Reference: C. C. Paige and M. A. Saunders, "Solution of sparse indefinite systems of linear
    equations", SIAM J. Numer. Anal. 12(4), 617-629, 1975.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> A = torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=torch.float64)  # indefinite
        >>> b = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
        >>> x, info = ib.MINRES(max_iter=10, tol=1e-10)(lambda v: {"w": A @ v["w"]}, b)
        >>> torch.allclose(x["w"], torch.linalg.solve(A, b["w"]))
        True
        >>> info.breakdown is None
        True
    """

    def solve(
        self, matvec: MatVec, b: Params, x0: Mapping[str, Tensor] | None,
        precondition: Callable[[Params], Params] | None,
    ) -> tuple[Params, SolveInfo]:
        """One (preconditioned) MINRES solve from ``x0``."""
        return _minres(matvec, b, x0, self.max_iter, self.tol, self.atol, precondition)


def _minres(
    matvec: MatVec, b: Params, x0: Mapping[str, Tensor] | None, max_iter: int, tol: float,
    atol: float, precondition: Callable[[Params], Params] | None = None,
) -> tuple[Params, SolveInfo]:
    keys = list(b.keys())
    if not keys:
        return {}, SolveInfo(0, 0.0, 0.0, True)
    dtype = dtype_of(b)
    eps = torch.finfo(dtype).eps
    rhs_norm = float(tree_norm(b))
    stop_at = threshold(tol, atol, rhs_norm, dtype)
    x = tree_zeros_like(b) if x0 is None else tree_clone({k: x0[k] for k in keys})
    xs = [x[k] for k in keys]
    if not math.isfinite(rhs_norm):
        return x, SolveInfo(0, math.inf, rhs_norm, False, "non-finite right-hand side b")
    if rhs_norm == 0.0:  # x = 0 is the (minimum-norm) solution, whatever x0 is
        return tree_zeros_like(b), SolveInfo(0, 0.0, 0.0, True)

    products = 0
    if x0 is None:
        r0 = [b[k].detach() for k in keys]  # read only: never updated in place
    elif max_iter == 0:
        return x, SolveInfo(0, math.nan, rhs_norm, False)
    else:
        ax = matvec(dict(zip(keys, xs)))
        products = 1
        r0 = torch._foreach_sub([b[k].detach() for k in keys], [ax[k] for k in keys])

    def info(residual: float, converged: bool, breakdown: str | None = None) -> SolveInfo:
        return SolveInfo(products, residual, rhs_norm, converged, breakdown)

    residual = r0_norm = _norm(r0)
    if not math.isfinite(residual):
        return x, info(math.inf, False, "non-finite initial residual b − A x0")
    if residual <= stop_at:
        return x, info(residual, True)

    def preconditioned(vector: list[Tensor]) -> list[Tensor]:
        z = precondition(dict(zip(keys, vector)))  # type: ignore[misc]
        return [z[k] for k in keys]

    # Lanczos on A (with a preconditioner: on M⁻¹A in the M-inner product). u_k = M v_k; without
    # a preconditioner u_k and v_k are the same tensors. beta is β_k, the norm of z_k = β_k u_k.
    r_track: list[Tensor] | None = None  # the residual vector, tracked only when preconditioned
    if precondition is None:
        beta = residual
        v = u = torch._foreach_div(r0, beta)
    else:
        q = preconditioned(r0)
        beta_sq = float(list_dot(r0, q))
        if not math.isfinite(beta_sq):
            return x, info(residual, False, "non-finite preconditioned residual M⁻¹r0")
        if beta_sq <= 0.0:
            return x, info(residual, False, _not_pd(beta_sq, products))
        beta = math.sqrt(beta_sq)
        v = torch._foreach_div(q, beta)  # before touching r0: q may alias it
        u = torch._foreach_div(r0, beta)
        r_track = torch._foreach_clone(r0)
    u_prev: list[Tensor] | None = None
    # Search directions w_{k−1}, w_{k−2} (allocated at the first two steps: w_0 = w_{−1} = 0) and
    # upper bounds on their norms (without a preconditioner, where ||v_k|| = 1).
    ws: list[Tensor] | None = None
    ws_old: list[Tensor] | None = None
    omega = omega_old = 0.0
    # QR of the tridiagonal T_k by Givens rotations (c, s); phibar is φ_k (the M⁻¹-norm residual).
    phibar = beta
    c, s = -1.0, 0.0
    dbar = eps_next = 0.0
    t_norm = 0.0  # max column norm of T so far, an estimate of ||A|| (M-scaled)
    # For the step-length test: a lower bound on ||A||_2, the 2-norm of v_k, the largest residual.
    a_norm, v_norm, r_max = 0.0, 1.0, residual
    x0_norm = 0.0 if x0 is None else _norm(xs)
    x_bound = x0_norm  # an upper bound on ||x_k||
    breakdown = None
    converged = False
    while products < max_iter:
        av = matvec(dict(zip(keys, v)))
        products += 1
        avs = [av[k] for k in keys]
        # p = σ·P holds A v_k − β_k u_{k−1}, in place in u_{k−1}'s buffer (σ saves a scaling pass).
        if u_prev is None:
            p, sigma = torch._foreach_clone(avs), 1.0
        else:
            p, sigma = u_prev, -beta
            torch._foreach_add_(p, avs, alpha=-1.0 / beta)
        if precondition is None:
            alpha = sigma * float(list_dot(v, p))
        else:
            # ||A v_k||_2 / ||v_k||_2 <= ||A||_2 for the step-length test below (one host sync).
            norms = torch._foreach_norm([*avs, *v])
            alpha, av_norm, v_norm = torch.stack([
                list_dot(v, p), torch.linalg.vector_norm(torch.stack(norms[:len(keys)])),
                torch.linalg.vector_norm(torch.stack(norms[len(keys):]))]).tolist()
            alpha *= sigma
            if math.isfinite(av_norm) and v_norm > 0.0:
                a_norm = max(a_norm, av_norm / v_norm)
        if not math.isfinite(alpha):
            breakdown = f"non-finite values in A v at iteration {products}"
            break
        torch._foreach_add_(p, u, alpha=-alpha / sigma)  # now σ·P = z_{k+1} = β_{k+1} u_{k+1}
        if precondition is None:
            q = p
            beta_next = abs(sigma) * _norm(p)
        else:
            q = preconditioned(p)  # M⁻¹P
            beta_sq = sigma * sigma * float(list_dot(p, q))
            if not math.isfinite(beta_sq):
                breakdown = f"non-finite preconditioned vector M⁻¹z at iteration {products}"
                break
            if beta_sq < 0.0 or (beta_sq == 0.0 and _norm(p) > 0.0):
                breakdown = _not_pd(beta_sq, products)
                break
            beta_next = math.sqrt(beta_sq)
        if not math.isfinite(beta_next):
            breakdown = f"non-finite values in A v at iteration {products}"
            break
        column = math.sqrt((beta * beta if u_prev is not None else 0.0) + alpha * alpha
                           + beta_next * beta_next)
        t_norm = max(t_norm, column)
        # Rotate T's new column by the previous rotation, then annihilate β_{k+1} by a new one.
        eps_k = eps_next
        delta = c * dbar + s * alpha
        gbar = s * dbar - c * alpha
        eps_next = s * beta_next
        dbar = -c * beta_next
        # ||A r_{k−1}|| = φ_{k−1}·hypot(γ̄_k, δ̄_{k+1}) (M-norms with a preconditioner): a residual
        # in A's numerical null space, not small (else the solve had stopped), means b is not in
        # A's range, and x_{k−1} is a least-squares solution. γ̄_k = 0 at termination is this case.
        root = math.hypot(gbar, dbar)
        if root <= eps**_SINGULAR * t_norm:
            breakdown = (
                f"singular system at iteration {products}: the residual ({residual:.3g}) lies in "
                f"the numerical null space of A (||A r||/||r|| = {root:.3g}, ||A|| ≈ "
                f"{t_norm:.3g}), so b is not in the range of A; x is the last iterate, a "
                "least-squares solution"
            )
            break
        gamma = math.hypot(gbar, beta_next)  # >= root > 0
        c, s = gbar / gamma, beta_next / gamma
        phi, phibar = c * phibar, s * phibar
        # w_k = (v_k − ε_k w_{k−2} − δ_k w_{k−1}) / γ_k, in place in w_{k−2}'s buffer.
        if ws is None:
            ws = torch._foreach_div(v, gamma)
        elif ws_old is None:
            ws_old, ws = ws, torch._foreach_add(v, ws, alpha=-delta)
            torch._foreach_div_(ws, gamma)
        else:
            torch._foreach_mul_(ws_old, -eps_k / gamma)
            torch._foreach_add_(ws_old, ws, alpha=-delta / gamma)
            torch._foreach_add_(ws_old, v, alpha=1.0 / gamma)
            ws, ws_old = ws_old, ws
        omega, omega_old = (v_norm + abs(eps_k) * omega_old + abs(delta) * omega) / gamma, omega
        if r_track is None:
            new_residual = phibar
        else:
            # r_k = s² r_{k−1} − c φ_k u_{k+1}, u_{k+1} = (σ/β_{k+1}) P.
            torch._foreach_mul_(r_track, s * s)
            if beta_next > 0.0:
                torch._foreach_add_(r_track, p, alpha=-c * phibar * sigma / beta_next)
            new_residual = _norm(r_track)
            r_max = max(r_max, new_residual)
        # Every ||x_j − x0||_2 <= (||r0|| + ||r_j||)/σ_min(A), so an iterate farther than
        # d_max = (||r0|| + max_j ||r_j||)/(eps^(2/3)·||A||) from x0, or a step longer than 2·d_max,
        # proves cond(A) > eps^(-2/3): A is numerically singular, b (nearly) outside its range, and
        # x only grows, amplifying rounding (the recurrence misses this once the Lanczos vectors
        # have lost orthogonality). ||A|| is bounded below by ||T|| (no preconditioner; there
        # ||v_k|| = 1 and ||r_j|| <= ||r0||) or by max ||A v_k||/||v_k||. omega and x_bound bound
        # ||w_k|| and ||x_k|| by the triangle inequality; only when a bound exceeds its limit is
        # the norm computed, so a well-conditioned solve pays nothing for the test.
        a_low = t_norm if precondition is None else a_norm
        r_high = r0_norm if precondition is None else r_max
        d_max = (r0_norm + r_high) / (eps**_SINGULAR * a_low) if a_low > 0.0 else math.inf
        if abs(phi) * omega > 2.0 * d_max:
            omega = _norm(ws)
        growth = None
        if abs(phi) * omega > 2.0 * d_max:
            growth = f"the step would move x by {abs(phi) * omega:.3g}"
        else:
            torch._foreach_add_(xs, ws, alpha=phi)
            x_bound += abs(phi) * omega
            if x_bound > x0_norm + d_max:
                x_bound = _norm(xs)
            if x_bound > x0_norm + d_max:
                torch._foreach_add_(xs, ws, alpha=-phi)  # back to x_{k−1}: |φ|·||w|| <= 2·d_max
                growth = f"x would move {x_bound - x0_norm:.3g} or more from x0"
        if growth is not None:
            breakdown = (
                f"numerically singular system at iteration {products}: {growth}, more than A "
                f"allows unless cond(A) > eps^(-2/3) (||r0|| = {r0_norm:.3g}, ||A|| >= "
                f"{a_low:.3g}); b is (nearly) outside the range of A; x is the last iterate, whose "
                "residual (from the recurrence) may understate the true one"
            )
            break
        residual = new_residual
        # β_{k+1} = 0 (the Lanczos process terminated: K_k is invariant and x_k exact there) gives
        # s = 0, so φ_k = 0 and the solve stops here: the normalisation below never divides by 0.
        if residual <= stop_at:
            converged = True
            break
        if products >= max_iter:
            break
        scale = sigma / beta_next
        if precondition is not None:
            v = torch._foreach_mul(q, scale)  # before scaling P: q may alias it
        torch._foreach_mul_(p, scale)
        if precondition is None:
            v = p
        u_prev, u = u, p
        beta = beta_next
    return x, info(residual, converged, breakdown)


def _norm(vector: list[Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(vector))))


def _not_pd(value: float, products: int) -> str:
    return (f"the preconditioner is not positive definite (rᵀM⁻¹r = {value:.3g} for r ≠ 0 at "
            f"iteration {products})")
