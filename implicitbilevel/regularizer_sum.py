"""A sum of regularisers ``r = Σ_k r_k``, each keeping its own derivatives (thesis eq. 3.3).

Every derivative the implicit step needs is linear in ``r``, so the sum's are the sums of the
terms': ``∇_y r = Σ ∇_y r_k``, ``∇²_yy r · z = Σ ∇²_yy r_k · z`` and
``∇_x ⟨∇_y r, u⟩ = Σ ∇_x ⟨∇_y r_k, u⟩``. A closed-form term (:class:`~implicitbilevel.ProximalL2`)
keeps its fast path while a general :class:`~implicitbilevel.Regularizer` over a few names adds
what it couples: appendix G's lower objective, for instance, is
``L^P(θ_P, φ_P) + λ [½‖θ_D − θ_P‖² + L^P(θ_D, φ_P)/λ]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .regularizers import BaseRegularizer
from .tree import Params

__all__ = ["SumRegularizer"]


def _accumulate(parts: list[Params]) -> Params:
    out: Params = {}
    for part in parts:
        for n, t in part.items():
            out[n] = t if n not in out else out[n] + t
    return out


class SumRegularizer(BaseRegularizer):
    """``r(x, y) = Σ_k r_k(x, y)``.

    Args:
        *terms: the regularisers summed; their coupled names are united (in order of first
            appearance).
    """

    def __init__(self, *terms: BaseRegularizer) -> None:
        if not terms:
            raise ValueError("SumRegularizer needs at least one term")
        for term in terms:
            if not isinstance(term, BaseRegularizer):
                raise TypeError(f"SumRegularizer terms must be regularisers, got "
                                f"{type(term).__name__}")
        self.terms = list(terms)

    def bind(self, batch: Any) -> BaseRegularizer:
        """Every term at the lower batch ``batch``."""
        return SumRegularizer(*(term.bind(batch) for term in self.terms))

    def coupled_names(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> list[str]:
        """The union of the terms' coupled names."""
        return list(dict.fromkeys(n for term in self.terms
                                  for n in term.coupled_names(upper, lower)))

    def value(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Tensor:
        """``Σ_k r_k(x, y)``."""
        return torch.stack([term.value(upper, lower) for term in self.terms]).sum()

    def lower_grad(self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> Params:
        """``Σ_k ∇_y r_k``."""
        return _accumulate([term.lower_grad(upper, lower) for term in self.terms])

    def lower_hvp(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], z: Mapping[str, Tensor]
    ) -> Params:
        """``Σ_k ∇²_yy r_k · z`` (each term over its coupled names present in ``z``)."""
        return self._restricted_sum("lower_hvp", upper, lower, z)

    def mixed_vjp(
        self, upper: Mapping[str, Tensor], lower: Mapping[str, Tensor], u: Mapping[str, Tensor]
    ) -> Params:
        """``Σ_k ∇_x ⟨∇_y r_k, u⟩`` (each term over its coupled names present in ``u``)."""
        return self._restricted_sum("mixed_vjp", upper, lower, u)

    def _restricted_sum(self, method: str, upper: Mapping[str, Tensor],
                        lower: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> Params:
        """``Σ_k term_k.method(upper, lower, v restricted to term_k's coupled names)``, skipping
        the terms none of whose names are in ``v``."""
        parts = []
        for term in self.terms:
            names = [n for n in term.coupled_names(upper, lower) if n in v]
            if names:
                parts.append(getattr(term, method)(upper, lower, {n: v[n] for n in names}))
        return _accumulate(parts)
