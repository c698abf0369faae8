"""The implicit-Jacobian system as an operator: ``A = ∇²_yy r + ∇²_yy ℓ / μ`` over the solved names.

:class:`~implicitbilevel.BilevelProblem` hands an :class:`IJSystem` to its solver as ``matvec``.
For the proximal regulariser over the coupled names it is ``A = I + H/μ`` (eq. 4.8-4.9, Algorithm
3); over all lower variables (the concatenated head, Sec. 5.3.4, Cor. 5.6) it is
``A = diag(I, εI) + H_ω/μ`` with the head ridge ``ε`` (``0`` in the thesis).

Within one BiSSL alternation the lower point and the Hessian batch are fixed, so every upper step
solves with the same ``A`` and only the right-hand side changes. The curvature operator is built
once per alternation (:meth:`BilevelProblem.lower_hessian`); :meth:`IJSystem.low_rank` builds a
randomized Nyström approximation of it once and caches it on that operator, so all ``N_U`` solves
of the alternation share it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .tree import Params, tree_scale

__all__ = ["IJSystem"]


class IJSystem:
    """``z ↦ A z = D z + (H z)/μ``: the implicit-Jacobian matrix as a callable ``matvec``.

    Args:
        curvature: ``z ↦ H z`` over the solved names (:class:`~implicitbilevel.HessianOperator`
            or :class:`~implicitbilevel.GaussNewtonOperator`): has ``names``, ``batched``,
            ``psd`` and a ``memo`` dict.
        mu: ``μ = λ + λ_damp``.
        identity: the names on which ``D`` is the identity (the coupled names of a proximal
            regulariser; ``[]`` for ``A = H/μ``); ``None`` when ``D`` is given by ``lower_hvp``.
        lower_hvp: ``z ↦ ∇²_yy r · z`` (for a general regulariser), used when ``identity`` is
            ``None``.
        ridge: ``ε`` added on ``ridge_names`` (the head block of the concatenated-head system).
        ridge_names: the names the ridge applies to.
        reducer: averages curvature products across data-parallel ranks (``dict``: none).
    """

    def __init__(
        self,
        curvature: Any,
        mu: float,
        *,
        identity: Sequence[str] | None,
        lower_hvp: Callable[[Params], Params] | None = None,
        ridge: float = 0.0,
        ridge_names: Sequence[str] = (),
        reducer: Callable[[Mapping[Any, Tensor]], dict] = dict,
    ) -> None:
        if identity is None and lower_hvp is None:
            raise ValueError("IJSystem needs the identity names or a lower_hvp")
        self.curvature = curvature
        self.mu = float(mu)
        self.names = list(curvature.names)
        self.identity = None if identity is None else list(identity)
        self.lower_hvp = lower_hvp
        self.ridge = float(ridge)
        self.ridge_names = list(ridge_names) if ridge else []
        self.reducer = reducer
        self.products = 0

    @property
    def identity_plus_curvature(self) -> bool:
        """Whether ``A = I + H/μ`` on every solved name (what the Nyström solvers assume)."""
        return self.identity is not None and set(self.identity) == set(self.names)

    def curvature_product(self, z: Mapping[str, Tensor]) -> Params:
        """``H z`` (averaged across ranks)."""
        self.products += 1
        return self.reducer(self.curvature(z))

    def curvature_batched(self, zs: Mapping[str, Tensor]) -> Params:
        """``H z_i`` for a leading batch dimension ``k`` on every entry (averaged across ranks)."""
        self.products += next(iter(zs.values())).shape[0]
        return self.reducer(self.curvature.batched(zs))

    def __call__(self, z: Mapping[str, Tensor]) -> Params:
        """``A z``."""
        out = tree_scale(self.curvature_product(z), 1.0 / self.mu)
        if self.identity is not None:
            names = [n for n in self.identity if n in z]
            if names:  # an empty identity block is A = H/μ
                torch._foreach_add_([out[n] for n in names], [z[n] for n in names])
        else:
            reg = self.lower_hvp(z)  # type: ignore[misc]
            torch._foreach_add_([out[n] for n in reg], list(reg.values()))
        if self.ridge_names:
            torch._foreach_add_([out[n] for n in self.ridge_names],
                                [z[n] for n in self.ridge_names], alpha=self.ridge)
        return out

    def low_rank(self, rank: int, seed: int = 0) -> Any:
        """The rank-``rank`` randomized Nyström approximation ``Ĥ = U diag(λ̂) Uᵀ`` of ``H``.

        Built from one batched product of ``rank`` tangents the first time it is asked for and
        cached on the curvature operator, so every solve that shares the operator (all upper steps
        of an alternation) reuses it. See :func:`~implicitbilevel.nystrom.nystrom_approximation`.
        """
        from .nystrom import nystrom_approximation

        key = ("nystrom", rank, seed)
        memo = self.curvature.memo
        if key not in memo:
            start = time.perf_counter()
            memo[key] = nystrom_approximation(self.curvature_batched, self.curvature.params, rank,
                                              seed=seed)
            memo["build_seconds"] = memo.get("build_seconds", 0.0) + time.perf_counter() - start
        return memo[key]
