"""M-FAC: the implicit-Jacobian solve with an empirical Fisher of recent gradients (Sec. 9.1).

The thesis's future work (Sec. 9.1, second item) proposes replacing the Hessian ``H`` of the
implicit-Jacobian system (eq. 4.8-4.9, Algorithm 3) by the empirical Fisher of recent gradients,
inverted matrix-free as in M-FAC (Frantar, Kurtic & Alistarh 2021). With the ``k ≤ m`` most
recent lower-level gradients ``g_1 … g_k`` of the pretext loss as the rows of ``G`` (``k × n``),

.. math::

    \\hat F = \\tfrac{1}{k} G^\\top G, \\qquad
    \\Big(D + \\tfrac{1}{\\mu}\\hat F\\Big)^{-1} v
    = D^{-1} v - D^{-1} G^\\top \\big(k\\mu I_k + G D^{-1} G^\\top\\big)^{-1} G D^{-1} v

(the Woodbury identity), where ``μ = λ + λ_damp`` and ``D`` is the system's damping: the identity
on the coupled names (the proximal regulariser, eq. 4.8) and the head ridge ``ε`` on the head
names of the concatenated-head system (Sec. 5.3.4). ``F̂`` stands in for ``H`` in the same system
``(D + H/μ) u = v``; no Hessian-vector product is taken.

**The dynamic algorithm.** As in M-FAC's sliding-window variant, :class:`GradientWindow` keeps
the last ``m`` gradients in a ring buffer together with their ``k × k`` inner products (one
matrix per parameter name, so any per-name diagonal ``D`` is ``K = Σ_name K_name / D_name``).
A new gradient replaces the oldest one and updates one row and column of those matrices:
``O(m·n)``. M-FAC applies the inverse through ``m`` Sherman-Morrison updates, whose coefficients
come from that same small matrix; here the small system ``kμI + K`` is factorised once by
Cholesky (``O(m³)``, once per window and ``μ``, cached), which gives the same inverse in exact
arithmetic. Each solve then costs ``O(m·n)``: ``G D⁻¹ v`` (``k`` inner products), two
triangular solves of size ``k`` and one combination of ``k`` gradients.

**Assumptions.** ``F̂`` is positive semi-definite, so ``D + F̂/μ`` is positive definite and the
solve never breaks down; it is an approximation of ``H``, not a converged solve of the Hessian
system, and how close it is depends on the lower problem (the gradients of a minibatch sample
the Fisher; the Fisher equals the Hessian of a log-likelihood only at its minimum, in
expectation). ``D`` must be invertible: the system must be an
:class:`~implicitbilevel.system.IJSystem` with the proximal regulariser, and with
``solve_over="all"`` a head ridge ``head_damping > 0``.

**Before ``m`` gradients exist** the window uses the ``k < m`` it has (``F̂ = GᵀG/k``); with none,
``u = D⁻¹ v``. **Across alternations** the window slides on: its oldest gradients come from
earlier lower points. **On resume** the window is part of the BiSSL trainer's checkpoint
(:meth:`MFAC.state_dict`); a checkpoint without it (another solver, or an older file) leaves the
window empty, and it refills from the next lower steps.

**Memory**: ``m·n`` numbers for the window (``n`` unknowns), plus ``m²`` per parameter tensor.

Reference:
    E. Frantar, E. Kurtic, D. Alistarh. M-FAC: Efficient matrix-free approximations of
    second-order information. NeurIPS 2021.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import check_bool
from ..tree import Params, tree_norm
from .base import LinearSolver, MatVec, SolveInfo, check_real, direct_solve_info

__all__ = ["MFAC", "GradientWindow"]


def _validate_m(m: Any) -> None:
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
        raise ValueError(f"m (the number of gradients M-FAC keeps) must be an int >= 1, got {m!r}")


class GradientWindow:
    """The ``m`` most recent gradients (a ring buffer) and their inner products per name.

    Attributes:
        m: the window's capacity.
        count: ``k``, the gradients held (``min(observed, m)``).
        names: the parameter names, fixed by the first gradient (``[]`` before).
        buffer: ``{name: Tensor of shape (m, *shape)}``; rows ``0 … k−1`` hold gradients.
        gram: ``{name: (m, m) float64}``, ``gram[name][i, j] = ⟨g_i[name], g_j[name]⟩``.
        version: incremented by every change (a key for what is cached from the window).
    """

    def __init__(self, m: int) -> None:
        _validate_m(m)
        self.m = int(m)
        self.reset()

    def reset(self) -> None:
        """Forget every gradient."""
        self.names: list[str] = []
        self.buffer: Params = {}
        self.gram: Params = {}
        self.count = 0
        self.position = 0
        self.version = getattr(self, "version", 0) + 1

    def observe(self, grads: Mapping[str, Tensor]) -> None:
        """Add one gradient, replacing the oldest when the window is full (``O(m·n)``).

        Raises:
            ValueError: an empty or non-finite gradient, or names or shapes that differ from the
                window's.
        """
        if not grads:
            raise ValueError("M-FAC needs a gradient with at least one parameter")
        if not self.names:
            self._allocate(grads)
        self.to(next(iter(grads.values())).device)
        if list(grads) != self.names and set(grads) != set(self.names):
            raise ValueError(f"the gradient has names {sorted(grads)}, the M-FAC window "
                             f"{sorted(self.names)}")
        for n in self.names:
            if grads[n].shape != self.buffer[n].shape[1:]:
                raise ValueError(f"gradient {n!r} has shape {tuple(grads[n].shape)}, the window "
                                 f"{tuple(self.buffer[n].shape[1:])}")
        if not math.isfinite(float(tree_norm(grads))):
            raise ValueError("M-FAC was given a non-finite gradient")
        slot = self.position
        filled = min(self.count + 1, self.m)  # slots 0 … filled−1 hold gradients after this one
        with torch.no_grad():
            for n in self.names:
                rows = self.buffer[n]
                rows[slot].copy_(grads[n].detach())
                flat = rows[:filled].reshape(filled, -1)
                dots = (flat @ flat[slot]).to(torch.float64)
                self.gram[n][slot, :filled] = dots
                self.gram[n][:filled, slot] = dots
        self.count = filled
        self.position = (slot + 1) % self.m
        self.version += 1

    def _allocate(self, grads: Mapping[str, Tensor]) -> None:
        self.names = list(grads)
        for n, g in grads.items():
            dtype = torch.promote_types(g.dtype, torch.float32)
            self.buffer[n] = torch.zeros(self.m, *g.shape, dtype=dtype, device=g.device)
            self.gram[n] = torch.zeros(self.m, self.m, dtype=torch.float64, device=g.device)

    def kernel(self, diagonal: Mapping[str, float]) -> Tensor:
        """``K = G D⁻¹ Gᵀ = Σ_name K_name / D_name`` over the ``k`` held gradients (``k × k``)."""
        k = self.count
        return sum(self.gram[n][:k, :k] / diagonal[n] for n in self.names)  # type: ignore[return-value]

    def project(self, v: Mapping[str, Tensor], diagonal: Mapping[str, float]) -> Tensor:
        """``G D⁻¹ v``: the ``k`` inner products ``⟨g_i, D⁻¹ v⟩`` (``O(k·n)``), float64."""
        k = self.count
        parts = [(self.buffer[n][:k].reshape(k, -1) @ v[n].reshape(-1).to(self.buffer[n].dtype))
                 .to(torch.float64) / diagonal[n] for n in self.names]
        return torch.stack(parts).sum(0)

    def combine(self, c: Tensor) -> Params:
        """``Gᵀ c = Σ_i c_i g_i`` for coefficients ``c`` of shape ``(k,)`` (``O(k·n)``)."""
        k = self.count
        return {n: torch.tensordot(c.to(self.buffer[n].dtype), self.buffer[n][:k], dims=1)
                for n in self.names}

    def state_dict(self) -> dict[str, Any]:
        """The gradients, their inner products and the ring position (tensors and plain types)."""
        return {"m": self.m, "names": list(self.names), "count": self.count,
                "position": self.position,
                "buffer": {n: t.clone() for n, t in self.buffer.items()},
                "gram": {n: t.clone() for n, t in self.gram.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the capacity ``m`` must match)."""
        if int(state["m"]) != self.m:
            raise ValueError(f"the saved M-FAC window holds m = {state['m']} gradients, this "
                             f"solver m = {self.m}")
        self.reset()
        self.names = list(state["names"])
        self.buffer = {n: state["buffer"][n].clone() for n in self.names}
        self.gram = {n: state["gram"][n].clone() for n in self.names}
        self.count = int(state["count"])
        self.position = int(state["position"])
        self.version += 1

    def to(self, device: torch.device) -> None:
        """Move the window to ``device`` (a checkpoint may be loaded onto another device)."""
        if self.names and self.buffer[self.names[0]].device != device:
            self.buffer = {n: t.to(device) for n, t in self.buffer.items()}
            self.gram = {n: t.to(device) for n, t in self.gram.items()}


def _diagonal(system: Any, names: list[str]) -> tuple[dict[str, float], float]:
    """``D`` on ``names`` and ``μ`` of an :class:`~implicitbilevel.IJSystem`."""
    full = system.diagonal() if hasattr(system, "diagonal") else None
    if full is None or not hasattr(system, "mu"):
        raise ValueError(
            "MFAC solves (D + F̂/μ) u = v with a per-name diagonal D: it needs the "
            "implicit-Jacobian system of a BilevelProblem with the proximal regulariser "
            "(ProximalL2); got a matvec without an identity block"
        )
    diagonal = {n: full.get(n, 0.0) for n in names}
    singular = [n for n, d in diagonal.items() if d <= 0]
    if singular:
        raise ValueError(
            f"MFAC needs an invertible damping D, but D = 0 on {singular[:3]}: with "
            "solve_over='all' set head_damping > 0, or solve over the coupled names"
        )
    return diagonal, float(system.mu)


@dataclass
class MFAC(LinearSolver):
    """``u = (D + F̂/μ)⁻¹ v`` with ``F̂ = GᵀG/k`` the empirical Fisher of the ``k ≤ m`` most
    recent gradients (M-FAC's dynamic algorithm; Frantar, Kurtic & Alistarh 2021; thesis Sec. 9.1).

    ``F̂`` replaces the Hessian in the implicit-Jacobian system ``(D + H/μ) u = v`` of eq. 4.8-4.9
    (see the module docstring for the Woodbury formula, the assumptions and the window's life
    across alternations and resumes). The solver is fed gradients with :meth:`observe`; the BiSSL
    trainer feeds it the pretext-loss gradient ``∇_θ L^P`` of every lower step over the solved
    names (:meth:`BilevelProblem.observe_lower_gradient
    <implicitbilevel.BilevelProblem.observe_lower_gradient>`). With no gradient yet, ``u = D⁻¹ v``.

    Cost: no curvature products. ``O(m·n)`` per observed gradient; ``O(m³)`` once per window and
    ``μ`` (a ``k × k`` Cholesky factorisation, cached); ``O(m·n)`` per solve. Memory: ``m·n``.

    Diagnostics: ``SolveInfo(iterations=0, residual_norm=nan, rhs_norm=||v||, converged=False)``
    (the solve does not measure its residual against the Hessian system). With
    ``measure_residual=True`` one product ``matvec(u)`` is spent: ``iterations=1`` and
    ``residual_norm = ||v − A u||`` with the true ``A = D + H/μ``.

    Args:
        m: the number of gradients kept (default 20: one alternation's ``N_L`` lower steps at the
            thesis's settings, Sec. 6.1.3).
        measure_residual: spend one product to measure the residual of the Hessian system.
        tol: relative residual tolerance for ``converged`` when the residual is measured.

    Attributes:
        window: the :class:`GradientWindow`.

    Raises:
        ValueError: at construction for a bad ``m`` or ``tol``; when called with a system whose
            damping ``D`` is not an invertible per-name diagonal, or with a right-hand side over
            other names than the observed gradients.
    """

    m: int = 20
    measure_residual: bool = False
    tol: float = 1e-6
    window: GradientWindow = field(init=False, repr=False, compare=False)
    _factor: tuple[Any, Tensor] | None = field(default=None, init=False, repr=False,
                                               compare=False)

    def __post_init__(self) -> None:
        _validate_m(self.m)
        check_real(self.tol, "tol")  # a finite number >= 0, as MINRES and Nyström require
        check_bool(self.measure_residual, "measure_residual")
        self.window = GradientWindow(self.m)

    observes_gradients: ClassVar[bool] = True

    def prepare(self, matvec: MatVec) -> float:
        """Factor ``kμI + G D⁻¹ Gᵀ`` for this system and the current window, unless held (the
        seconds spent)."""
        if not self.window.count:
            return 0.0
        start = time.perf_counter()
        held = self._factor
        diagonal, mu = _diagonal(matvec, list(self.window.names))
        self.window.to(self.window.gram[self.window.names[0]].device)
        self._cholesky(diagonal, mu)
        return 0.0 if self._factor is held else time.perf_counter() - start

    def observe(self, grads: Mapping[str, Tensor]) -> None:
        """Add a gradient to the window (the oldest leaves once ``m`` are held)."""
        self.window.observe(grads)

    def state_dict(self) -> dict[str, Any]:
        """The window, for checkpoints (:meth:`GradientWindow.state_dict`)."""
        return {"mfac_window": self.window.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.window.load_state_dict(state["mfac_window"])
        self._factor = None

    def _cholesky(self, diagonal: Mapping[str, float], mu: float) -> Tensor:
        """The lower Cholesky factor of ``kμI + G D⁻¹ Gᵀ`` (cached per window, ``D`` and ``μ``)."""
        w = self.window
        key = (w.version, tuple(sorted(diagonal.items())), mu)
        if self._factor is None or self._factor[0] != key:
            k = w.count
            core = w.kernel(diagonal) + k * mu * torch.eye(k, dtype=torch.float64,
                                                            device=w.gram[w.names[0]].device)
            self._factor = (key, torch.linalg.cholesky(0.5 * (core + core.mT)))
        return self._factor[1]

    def __call__(
        self, matvec: MatVec, b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None = None
    ) -> tuple[Params, SolveInfo]:
        """Solve ``(D + F̂/μ) u = b`` by the Woodbury identity (``x0`` is ignored)."""
        b = dict(b)
        diagonal, mu = _diagonal(matvec, list(b))
        if not (mu > 0 and math.isfinite(mu)):
            raise ValueError(f"MFAC needs μ = λ + λ_damp > 0, got {mu}")
        w = self.window
        u = {n: t / diagonal[n] for n, t in b.items()}
        if w.count:
            if set(b) != set(w.names):
                raise ValueError(f"the right-hand side has names {sorted(b)}, the observed "
                                 f"gradients {sorted(w.names)}")
            w.to(next(iter(b.values())).device)
            chol = self._cholesky(diagonal, mu)
            coef = torch.cholesky_solve(w.project(b, diagonal).unsqueeze(1), chol).squeeze(1)
            correction = w.combine(coef)
            u = {n: u[n] - (correction[n] / diagonal[n]).to(u[n].dtype) for n in u}
        return u, direct_solve_info(matvec, b, u, self.tol, self.measure_residual)
