"""Appendix G of the thesis: the pretext head regularised through the upper level.

With ω = (θ_P, φ_P) (Definition 5.4) the problem becomes ::

    min_{θ_D, φ_D}  L^D(θ_P*, φ_D) + L^D(θ_D, φ_D) + μ_G/2 ‖φ_P*‖²
    ω* ∈ argmin_ω   L^P(θ_P, φ_P) + L^P(θ_D, φ_P) + λ ½‖θ_D − θ_P‖².

In :class:`~implicitbilevel.BilevelProblem`'s form ``G = ℓ(y) + λ r(x, y)`` the lower loss stays
``ℓ = L^P(θ_P, φ_P)`` and the regulariser is the sum of the proximal term and a data-dependent
coupling of the pretext head to the upper backbone,

    r(x, y) = ½‖θ_D − θ_P‖² + L^P(θ_D, φ_P)/λ,

so ``λ ∇_y r`` is appendix G's extra lower gradient, ``∇²_yy r = diag(I, ∇²_φφ L^P(θ_D, φ_P)/λ)``
and ``∇²_xy r = [−I, ∇²_{θ_D φ_P} L^P(θ_D, φ_P)/λ]``: with ``solve_over="all"`` the implicit
Jacobian ``AB`` of appendix G, the upper gradient's right-hand side being
``[∇_θ L^D(θ_P, φ_D); μ_G φ_P]``. The system is indefinite in general (MINRES).

λ must be a constant: ``1/λ`` is fixed into ``r``. ``λ_damp`` damps the curvature of ``ℓ`` only
(the library's ``A = ∇²r + ∇²ℓ/μ``), so the formula of appendix G is exact at ``λ_damp = 0``.
With an empty pretext head (the GPT recipe, whose LM head is tied to the embedding) both extra
terms vanish and the problem is the standard one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from implicitbilevel import ProximalL2, Regularizer, SumRegularizer
from implicitbilevel.bissl import bissl_upper_loss
from implicitbilevel.regularizers import BaseRegularizer

__all__ = ["appendix_g_parts"]


def appendix_g_parts(
    downstream: Any, pretext: Any, backbone: list[str], head: list[str], lam: float, mu_g: float
) -> tuple[Any, BaseRegularizer]:
    """``(upper_loss, regularizer)`` of appendix G for a :class:`~implicitbilevel.BilevelProblem`.

    Args:
        downstream: ``L^D(params, batch)`` over the downstream model's names.
        pretext: ``L^P(params, batch)`` over the pretext model's names (backbone and head).
        backbone: the coupled backbone names (the same in both models).
        head: the pretext head names φ_P (may be empty).
        lam: the constant λ > 0.
        mu_g: ``μ_G ≥ 0``, the weight of ``½‖φ_P‖²`` in the upper objective.
    """
    if not lam > 0:
        raise ValueError(f"appendix G needs a constant λ > 0, got {lam!r}")
    if not mu_g >= 0:
        raise ValueError(f"bissl.mu_g must be >= 0, got {mu_g!r}")
    standard = bissl_upper_loss(downstream, backbone)
    proximal = ProximalL2(backbone)
    if not head:
        return standard, proximal
    head = list(head)

    def upper_loss(upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], batch: Any) -> Tensor:
        squares = torch.stack([lower[n].square().sum() for n in head]).sum()
        return standard(upper, lower, batch) + 0.5 * mu_g * squares

    def head_coupling(upper: Mapping[str, Tensor], lower: Mapping[str, Tensor],
                      batch: Any) -> Tensor:
        """``L^P(θ_D, φ_P)/λ``: the pretext loss with the upper backbone and the lower head."""
        params = dict(lower)
        params.update({n: upper[n] for n in backbone})
        return pretext(params, batch) / lam

    coupling = Regularizer(head_coupling, lower_names=head, uses_batch=True)
    return upper_loss, SumRegularizer(proximal, coupling)
