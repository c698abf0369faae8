"""Block Lanczos: the extreme eigenpairs of a symmetric curvature operator, of both signs.

``H ≈ V Λ Vᵀ`` from ``m`` products ``H Q_j`` taken ``b`` at a time, with full
reorthogonalisation and a final Rayleigh–Ritz step (:func:`lanczos_eigenpairs`); the eigenpairs
of largest magnitude are kept (:class:`Eigenpairs`), with their products ``H u_i``, their measured
residuals, and the extreme Ritz values found. The classes that reuse them across the solves of a
BiSSL alternation (preconditioner, Woodbury solver, deflation space) are in
:mod:`implicitbilevel.solvers.lanczos`.

References: Lanczos (1950), Golub & Underwood (1977), Parlett (1998), as listed in
:mod:`implicitbilevel.solvers.lanczos`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_int
from ..tree import Params
from .subspaces import batch_of, rows_of

__all__ = ["Eigenpairs", "lanczos_eigenpairs"]


@dataclass
class Eigenpairs:
    """``k`` approximate eigenpairs ``H u_i ≈ λ_i u_i`` of a symmetric operator, of any sign.

    Attributes:
        basis: the orthonormal ``u_i`` as a dict whose entries have a leading dimension ``k``
            (``basis[name][i]`` is the ``name`` block of ``u_i``).
        eigenvalues: the Ritz values ``λ_i = u_iᵀ H u_i``, shape ``(k,)``, descending.
        images: ``H u_i``, stacked like ``basis`` (exact products, kept for deflation).
        residual_norms: ``‖H u_i − λ_i u_i‖``, shape ``(k,)`` (measured, not estimated).
        smallest: the smallest Ritz value found (kept or not): ``λ_min(H) <= smallest``.
        largest: the largest Ritz value found: ``λ_max(H) >= largest``.
        products: the curvature products spent.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> M = torch.diag(torch.tensor([9.0, -3.0, 0, 0, 0], dtype=torch.float64))  # indefinite
        >>> H = ib.HessianOperator(lambda p: 0.5 * p["w"] @ M @ p["w"],
        ...                        {"w": torch.zeros(5).double()})
        >>> A = ib.IJSystem(H, mu=4.0, identity=["w"])                     # A = I + M / mu
        >>> b = {"w": torch.ones(5).double()}
        >>> exact = torch.linalg.solve(torch.eye(5).double() + M / 4.0, b["w"])
        >>> pairs = ib.lanczos_eigenpairs(H.batched, H.params, rank=2)
        >>> u = {"w": pairs.basis["w"][0]}                   # H u = lambda u, either sign
        >>> torch.allclose(H(u)["w"], pairs.eigenvalues[0] * u["w"])
        True
        >>> pairs.smallest < 0 < pairs.largest
        True
    """

    basis: Params
    eigenvalues: Tensor
    images: Params
    residual_norms: Tensor
    smallest: float
    largest: float
    products: int

    @property
    def rank(self) -> int:
        """``k``, the number of eigenpairs."""
        return int(self.eigenvalues.shape[0])


def lanczos_eigenpairs(
    batched_matvec: Callable[[Params], Params],
    like: Mapping[str, Tensor],
    rank: int,
    *,
    products: int | None = None,
    block: int | None = None,
    seed: int = 0,
) -> Eigenpairs:
    """The ``k`` eigenpairs of largest magnitude of a symmetric ``H`` by block Lanczos.

    ``Q_1`` is a random orthonormal ``n × b`` block (a CPU generator seeded with ``seed``, so every
    rank and device draws the same); each step takes the ``b`` products ``H Q_j`` in one batched
    call, orthogonalises them against every block so far (two passes of classical Gram–Schmidt:
    full reorthogonalisation, so no spurious copies of converged eigenvalues) and factors the
    remainder ``Q_{j+1} R_j``. After ``m`` products the Rayleigh–Ritz step diagonalises
    ``T = Qᵀ H Q`` (from the kept products ``HQ``, exact to rounding) and keeps the ``k`` Ritz
    pairs with the largest ``|λ|``. The extreme eigenvalues at both ends converge first, so
    ``smallest`` approaches ``λ_min(H)`` from above.

    Cost: ``m`` products in ``⌈m/b⌉`` batched calls; ``O(n m²)`` for the orthogonalisation.
    Memory: ``2·n·m`` numbers while building (``Q`` and ``HQ``), ``2·n·k`` kept.

    Args:
        batched_matvec: ``Z ↦ HZ`` for a dict of ``b`` stacked tangents (leading dimension).
        like: a parameter dict giving names, shapes, dtype and device.
        rank: ``k``, ``1 <= k <= n``.
        products: ``m >= k``, the products to spend (default ``max(3k, k + 20)``, at most ``n``).
        block: ``b``, the products per batched call (default ``min(k, 8)``).
        seed: seed of the starting block.

    Raises:
        ValueError: for bad settings or non-finite products.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> M = torch.diag(torch.tensor([9.0, -3.0, 0, 0, 0], dtype=torch.float64))  # indefinite
        >>> H = ib.HessianOperator(lambda p: 0.5 * p["w"] @ M @ p["w"],
        ...                        {"w": torch.zeros(5).double()})
        >>> A = ib.IJSystem(H, mu=4.0, identity=["w"])                     # A = I + M / mu
        >>> b = {"w": torch.ones(5).double()}
        >>> exact = torch.linalg.solve(torch.eye(5).double() + M / 4.0, b["w"])
        >>> pairs = ib.lanczos_eigenpairs(H.batched, H.params, rank=2)   # largest magnitude
        >>> [round(v, 9) for v in pairs.eigenvalues.sort().values.tolist()]
        [-3.0, 9.0]
    """
    check_int(rank, "rank", 1)
    check_int(seed, "seed")
    if not like:
        raise ValueError("lanczos_eigenpairs needs at least one parameter in `like`")
    names = list(like)
    sizes = [like[n].numel() for n in names]
    n, k = sum(sizes), int(rank)
    if k > n:
        raise ValueError(f"rank must be <= the number of unknowns n = {n}, got {k}")
    m = min(n, max(3 * k, k + 20) if products is None else check_int(products, "products", k))
    b = min(m, min(k, 8) if block is None else check_int(block, "block", 1))
    ref = next(iter(like.values()))
    dtype, work = ref.dtype, torch.promote_types(ref.dtype, torch.float32)
    eps = torch.finfo(work).eps
    draw = torch.float64 if work == torch.float64 else torch.float32
    start = torch.randn(n, b, generator=torch.Generator().manual_seed(int(seed)), dtype=draw)
    q_block = torch.linalg.qr(start.to(device=ref.device, dtype=work)).Q.mT.contiguous()
    qs: list[Tensor] = []
    hqs: list[Tensor] = []
    spent = 0
    while True:
        hq = rows_of(batched_matvec(batch_of(q_block.to(dtype), like)), names).to(work)
        if not bool(torch.isfinite(hq).all()):
            raise ValueError("the curvature products are not finite; no Lanczos eigenpairs")
        qs.append(q_block)
        hqs.append(hq)
        spent += q_block.shape[0]
        if spent >= m:
            break
        q_all = torch.cat(qs)
        y = hq.clone()
        for _ in range(2):  # full reorthogonalisation
            y -= (y @ q_all.mT) @ q_all
        q_new, r = torch.linalg.qr(y.mT)
        scale = max(float(hq.norm(dim=1).max()), torch.finfo(work).tiny)
        if float(r.diagonal().abs().max()) <= math.sqrt(n) * eps * scale:
            break  # span(Q) is invariant: its Ritz pairs are exact
        q_new = q_new.mT[: m - spent]
        q_new = q_new - (q_new @ q_all.mT) @ q_all  # one more pass keeps Q orthonormal
        q_block = torch.linalg.qr(q_new.mT).Q.mT.contiguous()
    with torch.no_grad():
        q_all, hq_all = torch.cat(qs), torch.cat(hqs)
        t = (q_all @ hq_all.mT).double()
        theta, s = torch.linalg.eigh(0.5 * (t + t.mT))
        keep = theta.abs().argsort(descending=True)[: min(k, theta.shape[0])]
        keep = keep[theta[keep].argsort(descending=True)]
        coef = s[:, keep].mT.to(work)
        basis, images = coef @ q_all, coef @ hq_all
        lam = theta[keep].to(work)
        residuals = (images - lam[:, None] * basis).norm(dim=1)
    return Eigenpairs(batch_of(basis.to(dtype), like), lam.to(dtype),
                      batch_of(images.to(dtype), like), residuals.to(dtype), float(theta[0]),
                      float(theta[-1]), spent)
