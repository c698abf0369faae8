"""Subspaces recycled across solves: extraction from recorded products, and what a deflated
solve needs to keep (the harvest, the Lanczos tridiagonal, the operator's identity).

Every space here is a pair of row matrices ``(Z, AZ)``: ``k`` vectors flattened over the
parameter dict and their products with ``A``, which a solve records as it goes, so that Rayleigh–
Ritz (Parlett 1998) or harmonic Rayleigh–Ritz (Paige, Parlett & van der Vorst 1995; Morgan 1991)
extraction spends no product. Used by :mod:`implicitbilevel.solvers.recycled` and
:mod:`implicitbilevel.solvers.lanczos`; nothing here is public API.

References:
    B. N. Parlett. The Symmetric Eigenvalue Problem, SIAM, 1998.
    R. B. Morgan. Computing interior eigenvalues of large matrices. Linear Algebra Appl.
    154-156, 289-309, 1991.
    C. C. Paige, B. N. Parlett, H. A. van der Vorst. Approximate solutions and eigenvalue bounds
    from Krylov subspaces. Numer. Linear Algebra Appl. 2(2), 115-133, 1995.
    M. L. Parks, E. de Sturler, G. Mackey, D. D. Johnson, S. Maiti. Recycling Krylov subspaces
    for sequences of linear systems. SIAM J. Sci. Comput. 28(5), 1651-1674, 2006.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..tree import Params, tree_unflatten
from .base import MatVec, dtype_of

__all__: list[str] = []

Space = tuple[Tensor, Tensor, Tensor]  # W (k × n rows, orthonormal), AW, θ with W AWᵀ = diag(θ)

Key = tuple[list[Callable[[], Any]], tuple]  # weak references and settings naming an operator

_CANDIDATES = 3  # the harvest keeps 3k candidate vectors between windows


def rows_of(stacked: Mapping[str, Tensor], names: list[str]) -> Tensor:
    """A dict of ``k`` stacked tangents as a ``k × n`` matrix (row ``i`` is tangent ``i``)."""
    k = next(iter(stacked.values())).shape[0]
    return torch.cat([stacked[name].detach().reshape(k, -1) for name in names], dim=1)


def batch_of(rows: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`rows_of`: the rows as ``k`` stacked tangents shaped like ``like``."""
    k = rows.shape[0]
    chunks = torch.split(rows, [t.numel() for t in like.values()], dim=1)
    return {name: chunk.reshape(k, *t.shape) for (name, t), chunk in zip(like.items(), chunks)}


def diagonal_of(system: Any, like: Mapping[str, Tensor], who: str) -> Tensor:
    """``D`` of ``A = D + H/μ`` as a flat vector (one scalar per solved name, repeated)."""
    diagonal = getattr(system, "diagonal", lambda: None)()
    if diagonal is None:
        raise ValueError(f"{who} needs A = D + H/μ with D one scalar per name (an IJSystem of the "
                         "proximal regulariser); this system's D is a regulariser's Hessian")
    return torch.cat([torch.full((t.numel(),), diagonal[n], dtype=t.dtype, device=t.device)
                      for n, t in like.items()])


def _sym(m: Tensor) -> Tensor:
    return 0.5 * (m + m.mT)


def _whitening(gram: Tensor, eps: float) -> Tensor:
    """``T`` (``r × m``, float64) with ``T Z`` orthonormal rows, from ``gram = Z Zᵀ`` alone: the
    rows are normalised, then whitened by the eigendecomposition of their Gram matrix; directions
    whose normalised Gram eigenvalue is below ``sqrt(eps)`` of the largest are dropped (so ``‖T‖``
    stays moderate and ``T (AZ)`` is the product of ``T Z`` to rounding). Zero rows get a zero
    column."""
    if gram.numel() == 0 or not bool((gram.diagonal() > 0).any()):
        return gram.new_zeros(0, gram.shape[0])  # no direction at all (every row zero)
    norms = gram.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(gram.dtype).tiny), 0.0)
    g, u = torch.linalg.eigh(_sym(inv[:, None] * gram * inv[None, :]))
    keep = g > math.sqrt(eps) * float(g.max().clamp_min(0))
    return (u[:, keep] / g[keep].sqrt()).mT * inv[None, :]


def _gram(a: Tensor, b: Tensor) -> Tensor:
    return (a @ b.mT).double()


def _ritz_in(c: Tensor, f: Tensor, eps: float, positive: bool) -> tuple[Tensor, Tensor]:
    """Rayleigh–Ritz on the span of the rows of ``cᵀ Q`` (``Q`` orthonormal rows, ``f = Q AQᵀ``),
    all in the small space: ``(M, θ)`` with ``W = M Q`` orthonormal rows and
    ``W AWᵀ = diag(θ)``. Ritz values below ``eps^(2/3)·max|θ|`` in magnitude (numerically
    singular, not worth deflating) are dropped, and with ``positive`` every ``θ <= 0`` too."""
    t = _whitening(c.mT @ c, eps) @ c.mT  # rows of t Q are orthonormal
    theta, y = torch.linalg.eigh(_sym(t @ f @ t.mT))
    floor = eps ** (2 / 3) * float(theta.abs().max().clamp_min(0)) if theta.numel() else 0.0
    keep = theta > floor if positive else theta.abs() > floor
    return y[:, keep].mT @ t, theta[keep]


def _space(m: Tensor, z: Tensor, az: Tensor, theta: Tensor) -> Space | None:
    """``(M Z, M AZ, θ)``: the two products with the long rows, the only ones an extraction
    makes after its Gram matrices (``None`` if ``M`` has no rows)."""
    if m.shape[0] == 0:
        return None
    m = m.to(z.dtype)
    return m @ z, m @ az, theta.to(z.dtype)


def rayleigh_ritz(w: Tensor, aw: Tensor, positive: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(W, AW, θ)`` for the span of ``w``: orthonormal rows with ``W AWᵀ = diag(θ)`` (the Ritz
    pairs of ``A`` on that span). Ritz values below ``eps^(2/3)·max|θ|`` in magnitude (numerically
    singular, not worth deflating) are dropped, and with ``positive`` every ``θ <= 0`` too."""
    eps = torch.finfo(w.dtype).eps
    t = _whitening(_gram(w, w), eps)
    if t.shape[0] == 0:
        return w[:0], aw[:0], w.new_zeros(0)
    m, theta = _ritz_in(torch.eye(t.shape[0], dtype=t.dtype), t @ _gram(w, aw) @ t.mT, eps,
                        positive)
    space = _space(m @ t, w, aw, theta)
    if space is None:
        return w[:0], aw[:0], theta.to(w.dtype)
    return space


def ritz_smallest(z: Tensor, az: Tensor, k: int) -> Space | None:
    """The ``k`` Ritz pairs with the smallest positive Ritz values on the rows of ``z``."""
    eps = torch.finfo(z.dtype).eps
    t = _whitening(_gram(z, z), eps)
    if t.shape[0] == 0:
        return None
    f = t @ _gram(z, az) @ t.mT  # Q AQᵀ for Q = T Z
    theta, y = torch.linalg.eigh(_sym(f))
    floor = eps ** (2 / 3) * float(theta.abs().max().clamp_min(0))
    chosen = (theta > floor).nonzero().flatten()[:k]
    m, values = _ritz_in(y[:, chosen], f, eps, True)
    return _space(m @ t, z, az, values)


def harmonic_nearest_zero(z: Tensor, az: Tensor, k: int) -> Space | None:
    """The ``k`` harmonic Ritz pairs with harmonic Ritz values nearest zero."""
    eps = torch.finfo(z.dtype).eps
    t = _whitening(_gram(z, z), eps)
    if t.shape[0] == 0:
        return None
    f = t @ _gram(z, az) @ t.mT  # Q AQᵀ for Q = T Z
    g = t @ _gram(az, az) @ t.mT  # (AQ)(AQ)ᵀ
    s, u = torch.linalg.eigh(_sym(g))
    keep = s > eps * float(s.max().clamp_min(0))
    if not bool(keep.any()):
        return None
    root = u[:, keep] / s[keep].sqrt()  # G^(-1/2) on the range of G
    # F y = (1/θ) G y  ⇔  (G^(-1/2) F G^(-1/2)) ỹ = ν ỹ, ν = 1/θ: nearest zero = largest |ν|.
    nu, y = torch.linalg.eigh(root.mT @ _sym(f) @ root)
    chosen = nu.abs().argsort(descending=True)[:k]
    m, values = _ritz_in(root @ y[:, chosen], f, eps, False)
    return _space(m @ t, z, az, values)


class Tridiagonal:
    """The Lanczos tridiagonal ``T̄`` of the vectors an unpreconditioned MINRES multiplies by the
    deflated operator ``ΠAΠ`` (``α_j = v_jᵀΠAv_j``, ``β_{j+1} = v_{j+1}ᵀΠAv_j``) and the
    couplings ``b_j = Cᵀ A v_j``, so that MINRES's ``x̃_m = V_m y_m``,
    ``y_m = argmin ‖β_1 e_1 − T̄_m y‖``, gives ``Cᵀ A x̃_m = B_m y_m`` without a product
    (GCRO's ``B`` matrix; Parks et al. 2006). Holds the last two vectors and one product."""

    def __init__(self) -> None:
        self.alpha: list[float] = []
        self.beta: list[float] = []  # β_2, β_3, …
        self.coupling: list[Tensor] = []
        self.last: tuple[Tensor | None, Tensor, Tensor] | None = None  # v_{j−1}, v_j, ΠAv_j

    def add(self, v: Tensor, out: Tensor, coupling: Tensor) -> None:
        if self.last is not None:
            self.beta.append(float(v @ self.last[2]))
        self.alpha.append(float(v @ out))
        self.coupling.append(coupling)
        self.last = (None if self.last is None else self.last[1], v, out)

    def coupling_of(self, m: int, beta1: float) -> Tensor:
        """``Cᵀ A x̃_m`` for the MINRES iterate after ``m`` steps."""
        if m == 0:
            return torch.zeros_like(self.coupling[0])
        if m < len(self.alpha):
            last = self.beta[m - 1]
        else:  # β_{m+1} = ‖ΠAv_m − α_m v_m − β_m v_{m−1}‖
            prev, v, out = self.last  # type: ignore[misc]
            rest = out - self.alpha[-1] * v
            if prev is not None:
                rest = rest - self.beta[-1] * prev
            last = float(rest.norm())
        t = torch.zeros(m + 1, m, dtype=torch.float64)
        idx = torch.arange(m)
        t[idx, idx] = torch.tensor(self.alpha[:m], dtype=torch.float64)
        t[idx[1:], idx[:-1]] = t[idx[:-1], idx[1:]] = torch.tensor(self.beta[: m - 1],
                                                                   dtype=torch.float64)
        t[m, m - 1] = last
        rhs = torch.zeros(m + 1, 1, dtype=torch.float64)
        rhs[0] = beta1
        y = torch.linalg.lstsq(t, rhs, driver="gelsd").solution[:, 0]
        b = torch.stack(self.coupling[:m])
        return y.to(b) @ b


def flat_of(tree: Mapping[str, Tensor], like: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
    """The tensors of ``tree`` in the order of ``like``'s names as one flat vector of ``dtype``
    (a matvec or a preconditioner may answer with its names in another order)."""
    return torch.cat([tree[k].detach().reshape(-1) for k in like]).to(dtype)


def tree_of(flat: Tensor, like: Params) -> Params:
    """A flat vector as a dict shaped like ``like``, in its dtype (views where no cast)."""
    return tree_unflatten(flat.to(dtype_of(like)), like)


def ratio(a: Tensor, b: Tensor) -> float:
    """``‖a‖/‖b‖`` (0 when ``b = 0``)."""
    nb = float(b.norm())
    return float(a.norm()) / nb if nb > 0 else 0.0


class Harvest:
    """The vectors a solve multiplied by ``A`` and their products, folded every ``window``
    vectors into a candidate space of dimension ``3k`` (starting from the current space; a
    candidate of only ``k`` loses the directions a later window would have sharpened), cut to
    ``k`` at the end."""

    def __init__(self, k: int, window: int, start: Space | None,
                 extract: Callable[[Tensor, Tensor, int], Space | None]) -> None:
        self.k, self.window, self.extract = k, window, extract
        self.candidate = start
        self.z: list[Tensor] = []
        self.az: list[Tensor] = []

    def add(self, v: Tensor, av: Tensor) -> None:
        self.z.append(v)
        self.az.append(av)
        if len(self.z) >= self.window:
            self.flush()

    def flush(self) -> None:
        if not self.z:
            return
        z, az = torch.stack(self.z), torch.stack(self.az)
        self.z, self.az = [], []
        if not bool(torch.isfinite(z).all() and torch.isfinite(az).all()):
            return
        if self.candidate is not None:
            z = torch.cat([self.candidate[0], z])
            az = torch.cat([self.candidate[1], az])
        self.candidate = self.extract(z, az, _CANDIDATES * self.k) or self.candidate

    def result(self) -> Space | None:
        self.flush()
        if self.candidate is not None and self.candidate[0].shape[0] > self.k:
            self.candidate = self.extract(self.candidate[0], self.candidate[1], self.k)
        return self.candidate


def _ref(target: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(target)
    except TypeError:  # an object that takes no weak references is held
        return lambda: target


def operator_key(matvec: MatVec) -> Key:
    """What identifies the matrix: the curvature operator (or the callable), the regulariser's
    Hessian product if any (a new one per upper step), ``μ``, the identity names and the ridge."""
    curvature = getattr(matvec, "curvature", None)
    targets = [matvec if curvature is None else curvature]
    lower_hvp = getattr(matvec, "lower_hvp", None)
    if lower_hvp is not None:
        targets.append(lower_hvp)
    settings = (getattr(matvec, "mu", None), getattr(matvec, "ridge", None),
                tuple(getattr(matvec, "identity", None) or ()),
                tuple(getattr(matvec, "ridge_names", None) or ()))
    refs = [_ref(t) for t in targets]
    return refs, (settings, tuple(id(t) for t in targets))


def same_operator(a: Key, b: Key) -> bool:
    """Whether two keys of :func:`operator_key` name the same live operator."""
    if a[1] != b[1] or len(a[0]) != len(b[0]):
        return False
    return all(ra() is not None and ra() is rb() for ra, rb in zip(a[0], b[0]))
