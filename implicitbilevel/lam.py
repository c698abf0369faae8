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
    """A schedule ``t ↦ λ(t) > 0`` over the alternations ``t = 0, …, T−1``.

    Example:
        >>> import implicitbilevel as ib
        >>> class Halving(ib.LambdaSchedule):             # lam(t) = 2^-t
        ...     def __call__(self, t):
        ...         return 0.5 ** t
        >>> [Halving()(t) for t in range(3)]
        [1.0, 0.5, 0.25]
    """

    @abc.abstractmethod
    def __call__(self, t: int) -> float:
        """Return λ at alternation ``t``."""


@dataclass(frozen=True)
class ConstantSchedule(LambdaSchedule):
    """``λ(t) = value`` (the original BiSSL: λ = 0.001 for vision, 0.1 for GPT).

    Example:
        >>> import implicitbilevel as ib
        >>> lam = ib.ConstantSchedule(0.001)
        >>> lam(0), lam(499)
        (0.001, 0.001)
    """

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
    """``f_CD(t) = ½(1 + cos(π t/(T−1)))``: λ falls from ``lam_max`` to ``lam_min`` (Sec. 5.2.1).

    Example:
        >>> import implicitbilevel as ib
        >>> lam = ib.CosineDecay(lam_min=1e-8, lam_max=1.0, total=3)
        >>> [round(lam(t), 6) for t in range(3)]
        [1.0, 0.5, 0.0]
    """

    def shape(self, s: float) -> float:
        """``½(1 + cos πs)``."""
        return 0.5 * (1.0 + math.cos(math.pi * s))


@dataclass(frozen=True)
class CosineIncrease(_Interpolated):
    """``f_CI(t) = 1 − f_CD(t)``: λ rises from ``lam_min`` to ``lam_max`` (Sec. 5.2.1).

    Example:
        >>> import implicitbilevel as ib
        >>> lam = ib.CosineIncrease(lam_min=1e-8, lam_max=1.0, total=3)
        >>> [round(lam(t), 6) for t in range(3)]
        [0.0, 0.5, 1.0]
    """

    def shape(self, s: float) -> float:
        """``1 − ½(1 + cos πs)``."""
        return 1.0 - 0.5 * (1.0 + math.cos(math.pi * s))


@dataclass(frozen=True)
class ExponentialIncrease(_Interpolated):
    """``f_EI(t) = (1 − e^{−α t/(T−1)}) / (1 − e^{−α})``: a rise whose sharpness grows with α.

    ``α → 0`` approaches a linear ramp, large α a step (Sec. 5.2.1, Fig. 5.2).

    Example:
        >>> import math
        >>> import implicitbilevel as ib
        >>> lam = ib.ExponentialIncrease(lam_min=0.0001, lam_max=1.0, total=3, alpha=10.0)
        >>> s = (1 - math.exp(-5.0)) / (1 - math.exp(-10.0))   # f_EI at t = 1 of T = 3
        >>> lam(0), lam(2), math.isclose(lam(1), 0.0001 + (1.0 - 0.0001) * s)
        (0.0001, 1.0, True)
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

    ``ρ`` is a parameter of the :class:`~implicitbilevel.BilevelProblem` holding this λ:
    ``problem.params == {"lam.rho": rho}``, and ``problem.upper_grad`` returns ``dF/dρ`` in
    ``UpperGradient.grads["lam.rho"]``. Register ``rho`` with the upper-level optimiser
    (:meth:`parameters`); the BiSSL trainer clips, checkpoints and broadcasts it with the upper
    parameters.

    The gradient is eq. 5.6 with its own damping. Two dampings enter it, at different places:

    .. math::

        \\frac{dF}{d\\rho} = \\frac{\\sigma'(\\rho)}{\\sigma(\\rho) + \\lambda_{damp}^{\\rho}}
        \\,\\langle \\theta_D - \\theta_P,\\, u \\rangle, \\qquad
        \\Big(I + \\tfrac{1}{\\sigma(\\rho) + \\lambda_{damp}} H\\Big)\\, u
        = \\nabla_{\\theta} \\mathcal{L}^D(\\theta_P, \\phi_D),

    (for a general regulariser ``⟨θ_D − θ_P, u⟩`` is ``−⟨∇_y r, u⟩``). ``λ_damp`` is the
    problem's ``damping``: it damps the implicit-Jacobian system of Algorithm 3, whose solution
    ``u`` (the θ_D part of the hypergradient) this gradient reuses. ``λ_damp^ρ`` is this object's
    ``damping``: it damps only the prefactor ``1/σ(ρ)`` of eq. 5.5-5.6. With both 0 this is the
    exact ``dF/dρ``; ``damping=None`` uses the problem's ``λ_damp`` for both, as the thesis does
    (Sec. 5.2.2). ``damping=0`` with a damped solve is the "learnable λ with λ_damp = 0" setting
    of Sec. 6.4.2 (Table F.8) without giving up the damped implicit-Jacobian solve.

    Args:
        init: the initial λ (> 0); ``ρ`` starts at ``softplus⁻¹(init)``.
        dtype: dtype of ``ρ``.
        device: device of ``ρ`` (put it where the parameters are).
        damping: ``λ_damp^ρ ≥ 0`` in the prefactor of eq. 5.6; ``None``: the problem's damping.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> lam = ib.LearnableLambda(0.1, dtype=torch.float64)
        >>> round(lam(), 12)                              # softplus(rho) starts at init
        0.1
        >>> torch.allclose(lam.derivative(), torch.sigmoid(lam.rho.detach())), len(lam.parameters())
        (True, 1)
    """

    def __init__(
        self,
        init: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        damping: float | None = None,
    ) -> None:
        _check_positive("initial lambda", init)
        if damping is not None and not (
            isinstance(damping, (int, float)) and not isinstance(damping, bool)
            and math.isfinite(damping) and damping >= 0
        ):
            raise ValueError(f"damping must be None or a finite number >= 0, got {damping!r}")
        self.damping = None if damping is None else float(damping)
        rho = torch.tensor(_inverse_softplus(float(init)), dtype=dtype, device=device)
        self.rho = nn.Parameter(rho)
        self.init = float(init)

    def __repr__(self) -> str:
        return f"LearnableLambda(init={self.init!r}, damping={self.damping!r})"

    def value(self) -> Tensor:
        """``σ(ρ)`` as a 0-dim tensor (no graph)."""
        return nn.functional.softplus(self.rho.detach())

    def derivative(self) -> Tensor:
        """``σ'(ρ) = sigmoid(ρ)``."""
        return torch.sigmoid(self.rho.detach())

    def gradient_scale(self, problem_damping: float) -> Tensor:
        """``σ'(ρ) / (σ(ρ) + λ_damp^ρ)``, the prefactor of eq. 5.6 (no graph).

        Args:
            problem_damping: the problem's ``λ_damp``, used when this λ's ``damping`` is ``None``.
        """
        damping = problem_damping if self.damping is None else self.damping
        return self.derivative() / (self.value() + damping)

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

    Example:
        >>> import implicitbilevel as ib
        >>> from implicitbilevel.lam import as_lambda
        >>> schedule = ib.CosineDecay(1e-8, 1.0, 5)
        >>> as_lambda(0.01)(7), as_lambda(schedule) is schedule
        (0.01, True)
    """
    if isinstance(lam, (LambdaSchedule, LearnableLambda)):
        return lam
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(
            f"lam must be a positive float, a LambdaSchedule or a LearnableLambda, got "
            f"{type(lam).__name__}"
        )
    return ConstantSchedule(float(lam))
