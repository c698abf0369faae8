"""The randomized Nyström approximation ``Ĥ = U diag(λ̂) Uᵀ ≈ H`` of a positive semi-definite
curvature operator, from ``k`` products in one batched call.

:func:`nystrom_approximation` builds it with the numerically stable algorithm of Tropp, Yurtsever,
Udell & Cevher (2017) as stated by Frangella, Tropp & Udell (2023); :class:`LowRank` holds it and
applies it in ``O(nk)``. The preconditioner and solver that reuse it across the solves of a BiSSL
alternation are in :mod:`implicitbilevel.solvers.nystrom` (with the references).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_int
from ..tree import Params

__all__ = ["LowRank", "nystrom_approximation"]

_INDEFINITE = (
    "the Nyström core ΩᵀHΩ is not positive definite: the curvature is indefinite (e.g. the exact "
    "Hessian of a network away from a minimum). The Nyström preconditioner and solver assume a "
    "positive semi-definite curvature: use Gauss-Newton curvature (PSD by construction), or "
    "MINRES without preconditioning"
)


@dataclass
class LowRank:
    """A symmetric low-rank operator ``Ĥ = U diag(λ̂) Uᵀ`` over parameter dicts.

    Attributes:
        basis: the ``k`` orthonormal columns of ``U``, stored as a dict whose entries have a
            leading dimension ``k`` (``basis[name][i]`` is the ``name`` block of ``u_i``, shaped
            like the parameter).
        eigenvalues: ``λ̂``, shape ``(k,)``, descending and ``>= 0``.

    Memory: ``k·n`` numbers for the basis (``n`` unknowns) plus ``k``.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> U = {"w": torch.tensor([[0.6, 0.8]], dtype=torch.float64)}      # k = 1 basis vector
        >>> low = ib.LowRank(U, torch.tensor([5.0], dtype=torch.float64))   # H = 5 u u^T
        >>> low.matvec({"w": torch.tensor([1.0, 0.0], dtype=torch.float64)})["w"]
        tensor([1.8000, 2.4000], dtype=torch.float64)
    """

    basis: Params
    eigenvalues: Tensor

    def __post_init__(self) -> None:
        k = self.eigenvalues.shape[0] if self.eigenvalues.dim() == 1 else -1
        if k < 1 or any(t.shape[0] != k for t in self.basis.values()):
            raise ValueError(
                "LowRank needs eigenvalues of shape (k,) and basis entries of leading dimension k"
            )

    @property
    def rank(self) -> int:
        """``k``, the number of basis vectors."""
        return int(self.eigenvalues.shape[0])

    def project(self, v: Mapping[str, Tensor]) -> Tensor:
        """``Uᵀ v``: the ``k`` coordinates of ``v`` in the basis (``O(nk)``), shape ``(k,)``."""
        k = self.rank
        parts = [u.reshape(k, -1) @ v[name].reshape(-1) for name, u in self.basis.items()]
        return torch.stack(parts).sum(0)

    def expand(self, c: Tensor) -> Params:
        """``U c`` for coordinates ``c`` of shape ``(k,)`` (``O(nk)``)."""
        return {name: torch.tensordot(c, u, dims=1) for name, u in self.basis.items()}

    def matvec(self, v: Mapping[str, Tensor]) -> Params:
        """``Ĥ v = U diag(λ̂) Uᵀ v`` (``O(nk)``, no curvature products)."""
        return self.expand(self.eigenvalues * self.project(v))


def check_rank_and_seed(rank: Any, seed: Any) -> None:
    """Reject a ``rank`` that is not an int ``>= 1`` or a ``seed`` that is not an int."""
    check_int(rank, "rank", 1)
    check_int(seed, "seed")


def nystrom_approximation(
    batched_matvec: Callable[[Params], Params],
    like: Mapping[str, Tensor],
    rank: int,
    *,
    seed: int = 0,
) -> LowRank:
    """The stable randomized Nyström approximation ``Ĥ = U diag(λ̂) Uᵀ ≈ H`` of rank ``k``.

    ``Ĥ = (HΩ)(ΩᵀHΩ)⁺(HΩ)ᵀ`` for a random orthonormal ``Ω`` (``n × k``), computed with the
    numerically stable algorithm of Tropp, Yurtsever, Udell & Cevher (2017), as stated by
    Frangella, Tropp & Udell (2023): ``Y = HΩ``; shift ``ν = sqrt(n)·eps·||Y||₂``;
    ``Y_ν = Y + νΩ``; ``C = chol(ΩᵀY_ν)``; ``B = Y_ν C⁻ᵀ``; thin SVD ``B = U Σ Vᵀ``;
    ``λ̂ = max(Σ² − ν, 0)``.

    Assumes ``H`` symmetric positive semi-definite. Then ``0 ⪯ Ĥ ⪯ H`` (up to the shift ``ν``),
    ``Ĥ = H`` when ``rank(H) <= k``, and for ``r < k − 1`` (Tropp et al. 2017)
    ``E‖H − Ĥ‖_* <= (1 + r/(k − r − 1)) Σ_{j>r} λ_j(H)``.

    ``eps`` is that of the working precision: the parameters' dtype, or float32 for half-precision
    parameters (whose products are taken in their dtype, the factorisations in float32).

    ``Ω`` is a Gaussian matrix drawn from a CPU ``torch.Generator`` seeded with ``seed``, then
    moved to the device and dtype of ``like`` and orthonormalised (QR), so every data-parallel rank
    and every device draws the same ``Ω``.

    Cost: one call of ``batched_matvec`` (``k`` curvature products), once per alternation, plus
    ``O(nk²)`` for the QR, the triangular solve and the SVD. Memory: the ``k × n`` Gaussian draw on
    the CPU, and on the device a few ``n·k`` numbers at peak (``Ω``, ``Y`` and the SVD of ``B``),
    of which the returned basis keeps one ``n·k``.

    Args:
        batched_matvec: ``Z ↦ HZ``: takes a dict whose entries have a leading dimension ``k``
            (``k`` tangents) and returns the products ``H z_i`` stacked the same way.
        like: a parameter dict giving the names, shapes, dtype and device (values are unused).
        rank: ``k``, an int with ``1 <= k <= n``.
        seed: seed of the test matrix.

    Raises:
        ValueError: for a bad ``rank`` or ``seed`` (ints), non-finite products, or when the core
            ``ΩᵀHΩ`` is not positive definite (indefinite curvature; use Gauss–Newton curvature or
            MINRES without preconditioning). Indefiniteness is detected only where ``Ω`` sees it.

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
        >>> low = ib.nystrom_approximation(H.batched, H.params, rank=2)
        >>> t = {"w": torch.arange(6.0, dtype=torch.float64)}
        >>> torch.allclose(low.matvec(t)["w"], B.T @ B @ t["w"])    # rank 2 captures H exactly
        True
    """
    check_rank_and_seed(rank, seed)
    if not like:
        raise ValueError("nystrom_approximation needs at least one parameter in `like`")
    names = list(like.keys())
    shapes = [like[name].shape for name in names]
    sizes = [like[name].numel() for name in names]
    n = sum(sizes)
    k = int(rank)
    if k > n:
        raise ValueError(f"rank must be <= the number of unknowns n = {n}, got {k}")
    ref = next(iter(like.values()))
    dtype, device = ref.dtype, ref.device
    # The factorisations need at least single precision; the products run in the parameters' dtype.
    work = torch.promote_types(dtype, torch.float32)
    draw = torch.float64 if work == torch.float64 else torch.float32
    generator = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(k, n, generator=generator, dtype=draw).to(device=device, dtype=work)
    omega = torch.linalg.qr(omega.mT).Q.mT.contiguous()  # k × n, orthonormal rows
    tangents = {
        name: chunk.reshape(k, *shape).to(dtype)
        for name, shape, chunk in zip(names, shapes, torch.split(omega, sizes, dim=1))
    }
    products = batched_matvec(tangents)
    del tangents
    with torch.no_grad():
        y = torch.cat([products[name].detach().reshape(k, -1).to(work) for name in names], dim=1)
        del products
        if not bool(torch.isfinite(y).all()):
            raise ValueError("the curvature products are not finite; no Nyström approximation")
        gram = y @ y.mT
        norm = float(torch.linalg.eigvalsh(0.5 * (gram + gram.mT))[-1].clamp(min=0).sqrt())
        # The working precision's eps: that of half-precision products would swamp the spectrum.
        nu = math.sqrt(n) * torch.finfo(work).eps * norm
        if nu == 0.0:  # H Ω = 0: the approximation is zero
            nu = torch.finfo(work).tiny
        y.add_(omega, alpha=nu)  # Y_ν
        core = omega @ y.mT
        del omega
        chol, info = torch.linalg.cholesky_ex(0.5 * (core + core.mT))
        if int(info) != 0:
            note = "" if dtype == work else (
                f" (or rounding in the {dtype} products: compute the curvature in float32)")
            raise ValueError(_INDEFINITE + note)
        # Bᵀ = C⁻¹ Y_νᵀ (k × n); B = U Σ Vᵀ  ⇔  Bᵀ = V Σ Uᵀ, so Uᵀ is the right factor of Bᵀ.
        b_t = torch.linalg.solve_triangular(chol, y, upper=False)
        del y
        _, sigma, u_t = torch.linalg.svd(b_t, full_matrices=False)
        del b_t
        eigenvalues = (sigma.square() - nu).clamp(min=0).to(dtype)
        u_t = u_t.to(dtype)
        basis = {
            name: chunk.reshape(k, *shape)
            for name, shape, chunk in zip(names, shapes, torch.split(u_t, sizes, dim=1))
        }
    return LowRank(basis, eigenvalues)
