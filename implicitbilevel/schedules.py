"""The lower-level regularisation weight λ: constant, scheduled, or learnable.

Schedules follow thesis Sec. 5.2.1. They are evaluated once per training-stage alternation
``t = 0, …, T−1`` (Algorithm 2) as

.. math:: \\lambda(t) = (\\lambda_{max} - \\lambda_{min})\\, f(t) + \\lambda_{min},

with a monotonic ``f : {0, …, T−1} → [0, 1]``. A learnable λ (Definition 5.1) is ``λ = σ(ρ)`` with
``σ = softplus`` and ``ρ`` an upper-level parameter; its gradient is eq. 5.6, computed by
:class:`~implicitbilevel.BilevelProblem` from the implicit-Jacobian solve it already has.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ConstantSchedule",
    "CosineDecay",
    "CosineIncrease",
    "ExponentialIncrease",
    "LambdaSchedule",
    "LearnableLambda",
    "as_lambda",
]


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class LambdaSchedule(abc.ABC):
    """A schedule ``t ↦ λ(t) > 0`` over the alternations ``t = 0, …, T−1``."""

    @abc.abstractmethod
    def __call__(self, t: int) -> float:
        """Return λ at alternation ``t``."""


@dataclass(frozen=True)
class ConstantSchedule(LambdaSchedule):
    """``λ(t) = value`` (the original BiSSL: λ = 0.001 for vision, 0.1 for GPT)."""

    value: float

    def __post_init__(self) -> None:
        _check_positive("lambda", self.value)

    def __call__(self, t: int) -> float:
        """Return the constant λ."""
        return float(self.value)


@dataclass(frozen=True)
class _Interpolated(LambdaSchedule):
    lam_min: float
    lam_max: float
    total: int

    def __post_init__(self) -> None:
        _check_positive("lam_min", self.lam_min)
        _check_positive("lam_max", self.lam_max)
        if self.lam_max < self.lam_min:
            raise ValueError(f"lam_max ({self.lam_max}) must be >= lam_min ({self.lam_min})")
        if not (isinstance(self.total, int) and self.total >= 2):
            raise ValueError(f"total (the number of alternations T) must be an int >= 2, got "
                             f"{self.total!r}")

    def _progress(self, t: int) -> float:
        if not 0 <= t < self.total:
            raise ValueError(f"alternation t={t} is outside 0..{self.total - 1}")
        return t / (self.total - 1)

    @abc.abstractmethod
    def shape(self, s: float) -> float:
        """The monotonic ``f`` as a function of ``s = t/(T−1) ∈ [0, 1]``."""

    def __call__(self, t: int) -> float:
        """Return ``(λ_max − λ_min) f(t) + λ_min``."""
        return (self.lam_max - self.lam_min) * self.shape(self._progress(t)) + self.lam_min


@dataclass(frozen=True)
class CosineDecay(_Interpolated):
    """``f_CD(t) = ½(1 + cos(π t/(T−1)))``: λ falls from ``lam_max`` to ``lam_min`` (Sec. 5.2.1)."""

    def shape(self, s: float) -> float:
        """``½(1 + cos πs)``."""
        return 0.5 * (1.0 + math.cos(math.pi * s))


@dataclass(frozen=True)
class CosineIncrease(_Interpolated):
    """``f_CI(t) = 1 − f_CD(t)``: λ rises from ``lam_min`` to ``lam_max`` (Sec. 5.2.1)."""

    def shape(self, s: float) -> float:
        """``1 − ½(1 + cos πs)``."""
        return 1.0 - 0.5 * (1.0 + math.cos(math.pi * s))


@dataclass(frozen=True)
class ExponentialIncrease(_Interpolated):
    """``f_EI(t) = (1 − e^{−α t/(T−1)}) / (1 − e^{−α})``: a rise whose sharpness grows with α.

    ``α → 0`` approaches a linear ramp, large α a step (Sec. 5.2.1, Fig. 5.2).
    """

    alpha: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("alpha", self.alpha)

    def shape(self, s: float) -> float:
        """``(1 − e^{−αs}) / (1 − e^{−α})``."""
        return -math.expm1(-self.alpha * s) / -math.expm1(-self.alpha)


def _inverse_softplus(y: float) -> float:
    # softplus(x) = log(1 + e^x)  =>  x = log(e^y - 1) = y + log(1 - e^{-y})
    return y + math.log(-math.expm1(-y))


class LearnableLambda:
    """λ as an upper-level parameter: ``λ = softplus(ρ)`` (Definition 5.1).

    Register ``rho`` with an upper-level optimiser; :class:`~implicitbilevel.BilevelProblem` returns
    ``dF/dρ = σ'(ρ)/(σ(ρ) + λ_damp) · ⟨θ_D − θ_P, v_IJ⟩`` (eq. 5.6), where ``v_IJ`` is the
    implicit-Jacobian vector product it already computed for θ_D.

    Args:
        init: the initial λ (> 0); ``ρ`` starts at ``softplus⁻¹(init)``.
        dtype: dtype of ``ρ``.
        device: device of ``ρ`` (put it where the parameters are).
    """

    def __init__(
        self,
        init: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        _check_positive("initial lambda", init)
        rho = torch.tensor(_inverse_softplus(float(init)), dtype=dtype, device=device)
        self.rho = nn.Parameter(rho)

    def value(self) -> Tensor:
        """``σ(ρ)`` as a 0-dim tensor (no graph)."""
        return nn.functional.softplus(self.rho.detach())

    def derivative(self) -> Tensor:
        """``σ'(ρ) = sigmoid(ρ)``."""
        return torch.sigmoid(self.rho.detach())

    def __call__(self, t: int = 0) -> float:
        """Return the current λ as a float (``t`` is accepted for schedule compatibility)."""
        return float(self.value())

    def parameters(self) -> list[nn.Parameter]:
        """``[rho]``, for an optimiser."""
        return [self.rho]


def as_lambda(lam: float | LambdaSchedule | LearnableLambda) -> LambdaSchedule | LearnableLambda:
    """Normalise a float, schedule or learnable λ into a callable ``t ↦ λ``.

    Raises:
        ValueError: for λ ≤ 0 or a non-finite λ.
        TypeError: for anything but a number, a schedule or a learnable λ (``bool`` included).
    """
    if isinstance(lam, (LambdaSchedule, LearnableLambda)):
        return lam
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(
            f"lam must be a positive float, a LambdaSchedule or a LearnableLambda, got "
            f"{type(lam).__name__}"
        )
    return ConstantSchedule(float(lam))
