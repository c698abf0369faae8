"""What every stochastic bilevel method shares: construction, step sizes, batches, in-place
updates, diagnostics and checkpoints.

A method is built like an optimiser, from a :class:`~implicitbilevel.BilevelProblem` (or
:class:`~implicitbilevel.stochastic.BilevelOracles`, e.g. from two callables ``f(x, y, batch)``,
``g(x, y, batch)``) and the upper and lower parameter dicts, which it updates in place::

    method = SOBA(problem, upper, lower, lr_inner=0.1, lr_outer=0.01)
    for upper_batch, lower_batch in batches:
        info = method.step(upper_batch, lower_batch)   # x, y and v move once

``step`` returns a :class:`StepInfo`: the norm of the inner gradient estimate, the residual of the
linear-system variable ``v`` where the method has one, and the oracle calls so far.

**Batches.** Each argument of ``step`` is a batch, or a sampler: a zero-argument callable that
returns a fresh batch on every call. A method that needs several lower batches in one step
(stocBiO, AmIGO, F2SA, BOME's inner loop) draws one per use from a sampler and reuses a plain
batch for all of them (then several products at one point share one kept graph).

**Sign of v.** Here ``v`` solves ``∇²_yy G · v = ∇_y f`` (the ``u`` of
:class:`~implicitbilevel.BilevelProblem`), so the hypergradient is
``∇_x f − ∇²_xy G · v``; SOBA's paper writes the negative, ``v* = −[∇²_yy G]⁻¹ ∇_y f``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import check_distinct_levels, check_int
from ..problem import BilevelProblem
from ..tree import Params, tree_clone, tree_norm, tree_zeros_like
from .oracles import BilevelOracles, OracleCounts, as_oracles

__all__ = ["PolynomialDecay", "StepInfo", "StochasticBilevel", "StepSize"]


@dataclass(frozen=True)
class PolynomialDecay:
    """The step size ``initial · (t + 1)^(−power)`` at step ``t = 0, 1, …``.

    SOBA's rule (Dagréou et al. 2022, Theorem 1) is ``ρ_t ∝ t^(−2/5)`` for ``y`` and ``v`` and
    ``γ_t ∝ t^(−3/5)`` for ``x``; ``power = 0`` is a constant step.

    Example:
        >>> import implicitbilevel as ib
        >>> lr = ib.PolynomialDecay(1.0, power=0.5)         # 1 / sqrt(t + 1)
        >>> [round(lr(t), 3) for t in range(4)]
        [1.0, 0.707, 0.577, 0.5]
    """

    initial: float
    power: float = 0.0

    def __post_init__(self) -> None:
        for name in ("initial", "power"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def __call__(self, t: int) -> float:
        """The step size at step ``t``."""
        return float(self.initial) * (t + 1) ** (-float(self.power))


StepSize = float | PolynomialDecay | Callable[[int], float]
"""A step size: a constant, a :class:`PolynomialDecay`, or any ``t -> float``."""


def _as_step(value: StepSize, what: str) -> Callable[[int], float]:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number or a schedule, got {value!r}")
    if isinstance(value, (int, float)):
        return PolynomialDecay(float(value))
    if callable(value):
        return value
    raise TypeError(f"{what} must be a number, a PolynomialDecay or a callable t -> float, got "
                    f"{type(value).__name__}")


@dataclass
class StepInfo:
    """Diagnostics of one step.

    Attributes:
        t: the step just taken (from 0).
        inner_grad_norm: ``‖∇̂_y G‖``, the norm of the last inner gradient estimate the step used.
        v_residual: ``‖∇̂²_yy G · v − ∇̂_y f‖`` on the step's batches for the method's ``v``
            (its definition per method is in the method's docstring); ``None`` without a ``v``.
        outer_grad_norm: ``‖D_x‖``, the norm of the direction ``x`` moved along.
        lr_inner: the inner step size used.
        lr_outer: the outer step size used.
        calls: the oracle calls so far (:meth:`OracleCounts.as_dict`).
        extra: method-specific values (F2SA's and BOME's multipliers).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> c = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> problem = ib.BilevelProblem(
        ...     lambda x, y, batch: 0.5 * ((y["w"] - c) ** 2).sum(),   # f(x, y)
        ...     lambda y, batch: 0.5 * (y["w"] ** 2).sum(),            # G = |y|^2/2 + |x - y|^2/2
        ...     lam=1.0, regularizer=ib.ProximalL2())                  # y*(x) = x/2, x* = 2c
        >>> x = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> y = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> info = ib.SOBA(problem, x, y, lr_inner=0.5, lr_outer=0.5).step(None, None)
        >>> info.t, info.lr_inner, info.outer_grad_norm     # at y = y*(0), x = 0: no outer gradient
        (0, 0.5, 0.0)
        >>> info.calls["hvp"], info.calls["total"]
        (1, 4)
    """

    t: int
    inner_grad_norm: float
    v_residual: float | None
    outer_grad_norm: float
    lr_inner: float
    lr_outer: float
    calls: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


def draw(batch: Any) -> Any:
    """A batch: ``batch`` itself, or a fresh one from it when it is a sampler (a callable)."""
    if callable(batch) and not isinstance(batch, (Mapping, Tensor, tuple, list)):
        return batch()
    return batch


def is_sampler(batch: Any) -> bool:
    """Whether ``batch`` is a sampler (draws a fresh batch per call) rather than one batch."""
    return callable(batch) and not isinstance(batch, (Mapping, Tensor, tuple, list))


def axpy_(target: Mapping[str, Tensor], direction: Mapping[str, Tensor], alpha: float) -> None:
    """``target ← target + α · direction`` in place (the caller's tensors)."""
    names = list(target)
    with torch.no_grad():
        torch._foreach_add_([target[n] for n in names], [direction[n] for n in names],
                            alpha=alpha)


def norm(tree: Mapping[str, Tensor]) -> float:
    """``‖tree‖`` as a float."""
    return float(tree_norm(tree)) if tree else 0.0


class StochasticBilevel(abc.ABC):
    """The base of every stochastic method (module docstring).

    Args:
        problem: a :class:`~implicitbilevel.BilevelProblem` or
            :class:`~implicitbilevel.stochastic.BilevelOracles`.
        upper: the upper variables ``x`` by name, updated in place.
        lower: the lower variables ``y`` by name, updated in place.
        lr_inner: the step size of ``y`` (and of ``v`` unless ``lr_v`` is given).
        lr_outer: the step size of ``x``.
        lr_v: the step size of ``v`` (methods with a ``v`` only).

    Attributes:
        upper: the upper variables (the caller's tensors).
        lower: the lower variables (the caller's tensors).
        v: the linear-system variable, ``None`` for a method without one.
        t: the number of steps taken.
        oracles: the :class:`~implicitbilevel.stochastic.BilevelOracles` in use.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> c = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> problem = ib.BilevelProblem(
        ...     lambda x, y, batch: 0.5 * ((y["w"] - c) ** 2).sum(),   # f(x, y)
        ...     lambda y, batch: 0.5 * (y["w"] ** 2).sum(),            # G = |y|^2/2 + |x - y|^2/2
        ...     lam=1.0, regularizer=ib.ProximalL2())                  # y*(x) = x/2, x* = 2c
        >>> x = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> y = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> method = ib.SOBA(problem, x, y, lr_inner=0.5, lr_outer=0.5)
        >>> isinstance(method, ib.stochastic.StochasticBilevel), method.upper["w"] is x["w"]
        (True, True)
        >>> info = method.step(None, None)                  # x, y and v move once
        >>> method.t, x["w"].tolist()                       # y was at y*(0) = 0: no outer gradient
        (1, [0.0, 0.0])
    """

    name: ClassVar[str] = "base"
    has_v: ClassVar[bool] = True

    def __init__(self, problem: BilevelProblem | BilevelOracles, upper: Mapping[str, Tensor],
                 lower: Mapping[str, Tensor], *, lr_inner: StepSize, lr_outer: StepSize,
                 lr_v: StepSize | None = None) -> None:
        self.oracles = as_oracles(problem)
        for what, params in (("upper", upper), ("lower", lower)):
            if not isinstance(params, Mapping) or not params:
                raise TypeError(f"{what} must be a non-empty dict of tensors")
            bad = [n for n, p in params.items()
                   if not isinstance(p, Tensor) or not p.is_floating_point()]
            if bad:
                raise TypeError(f"{what} variables must be floating-point tensors: {bad[:5]}")
        check_distinct_levels(upper, lower)
        self.upper = dict(upper)
        self.lower = dict(lower)
        self.lr_inner = _as_step(lr_inner, "lr_inner")
        self.lr_outer = _as_step(lr_outer, "lr_outer")
        self.lr_v = self.lr_inner if lr_v is None else _as_step(lr_v, "lr_v")
        self.v: Params | None = tree_zeros_like(lower) if self.has_v else None
        self.t = 0

    @classmethod
    def from_functions(cls, f: Callable[[Params, Params, Any], Tensor],
                       g: Callable[[Params, Params, Any], Tensor], upper: Mapping[str, Tensor],
                       lower: Mapping[str, Tensor], **kwargs: Any) -> StochasticBilevel:
        """The method on ``min_x f(x, y*(x))``, ``y*(x) = argmin_y g(x, y)`` with
        ``f(x, y, batch)`` and ``g(x, y, batch)`` (:meth:`BilevelOracles.from_functions`)."""
        return cls(BilevelOracles.from_functions(f, g), upper, lower, **kwargs)

    @property
    def counts(self) -> OracleCounts:
        """The oracle calls so far."""
        return self.oracles.counts

    def step(self, upper_batch: Any, lower_batch: Any) -> StepInfo:
        """One step of the method: ``x``, ``y`` and ``v`` (where there is one) move once.

        Args:
            upper_batch: a batch of ``f``'s data, or a sampler of them.
            lower_batch: a batch of ``G``'s data, or a sampler of them.
        """
        info = self._step(upper_batch, lower_batch, self.t)
        self.t += 1
        info.calls = self.counts.as_dict()
        return info

    @abc.abstractmethod
    def _step(self, upper_batch: Any, lower_batch: Any, t: int) -> StepInfo:
        """The method's update at step ``t``."""

    # -- checkpoints -------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        """The method's own state beyond ``x``, ``y``, ``v`` and ``t``."""
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`_extra_state`."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit: ``x``, ``y``, ``v``, the step
        ``t``, the oracle counts and the method's own state (SABA's memory, F2SA's penalty
        variable and multiplier). The batches, and their samplers, are the caller's."""
        return {"method": self.name, "t": self.t, "upper": tree_clone(self.upper),
                "lower": tree_clone(self.lower),
                "v": None if self.v is None else tree_clone(self.v),
                "counts": self.counts.as_dict(), **self._extra_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into this method's tensors (copied in place)."""
        if state.get("method") != self.name:
            raise ValueError(f"a {state.get('method')!r} state cannot be loaded into "
                             f"{self.name}")
        self.t = check_int(state["t"], "state['t']", 0)
        for what, mine in (("upper", self.upper), ("lower", self.lower), ("v", self.v)):
            if mine is None:
                continue
            copy_into(mine, state[what], f"state[{what!r}]")
        counts = {k: v for k, v in state["counts"].items() if k != "total"}
        self.oracles.counts = OracleCounts(**counts)
        self._load_extra_state(state)


def copy_into(target: Mapping[str, Tensor], source: Mapping[str, Tensor], what: str) -> None:
    """Copy ``source`` into ``target`` in place, refusing other names or shapes."""
    if set(target) != set(source):
        raise KeyError(f"{what} holds {sorted(source)}, expected {sorted(target)}")
    with torch.no_grad():
        for n, t in target.items():
            if t.shape != source[n].shape:
                raise ValueError(f"{what}[{n!r}] has shape {tuple(source[n].shape)}, expected "
                                 f"{tuple(t.shape)}")
            t.copy_(source[n])
