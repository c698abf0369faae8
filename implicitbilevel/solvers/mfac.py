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

**Blocks.** With a partition of the solved names into blocks ``b`` (``MFAC(blocks=...)``), the
Fisher is taken block-diagonal, ``F̂ = diag_b(F̂_b)`` with ``F̂_b = G_bᵀG_b/k`` (``G_b`` the same
``k`` gradients restricted to block ``b``), and each block is solved on its own:
``u_b = D_b⁻¹ v_b − D_b⁻¹ G_bᵀ (kμI + G_b D_b⁻¹ G_bᵀ)⁻¹ G_b D_b⁻¹ v_b``. Each block's Gram matrix
``K_b = Σ_{name∈b} K_name / D_name`` comes from the same per-name inner products, so the window's
updates are unchanged (``O(m·n)``); the factorisation costs ``O(m³)`` per block (``B`` blocks:
``O(B·m³)``, cached) and a solve ``O(m·n_b)`` per block, ``O(m·n)`` in all. One block (the
default) is the global M-FAC, bit for bit.

**Memory**: ``m·n`` numbers for the window (``n`` unknowns), plus ``m²`` per parameter tensor;
``MFAC(window_device="cpu")`` keeps them in host memory (a GPU run's solve then moves ``v`` and
the correction, ``2n`` numbers, across).

Reference:
    E. Frantar, E. Kurtic, D. Alistarh. M-FAC: Efficient matrix-free approximations of
    second-order information. NeurIPS 2021.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import check_bool
from ..tree import Params
from .base import LinearSolver, MatVec, SolveInfo, check_real, direct_solve_info
from .gradient_window import GradientWindow, validate_m

__all__ = ["MFAC", "GradientWindow"]


def partition_blocks(names: list[str], blocks: Any) -> list[list[str]]:
    r"""The blocks of ``names`` (each in the order of ``names``, blocks by first appearance).

    ``blocks``: ``None`` or ``"global"``: one block; ``"layer"``: by module prefix (the name
    without its last dotted part: ``"blocks.0.attn.qkv.weight"`` → ``"blocks.0.attn.qkv"``); any
    other string: a regular expression, the names with the same first match (``re.search``) form
    a block and the names it does not match one more block (``r"blocks\.\d+"``: one block per
    transformer block); a sequence of sequences of names: those blocks, the names none of them
    lists one more block.

    Raises:
        ValueError: a name listed twice or not solved, an empty block, an invalid expression.
    """
    if blocks is None or blocks == "global":
        return [list(names)]
    groups: dict[Any, list[str]] = {}
    if isinstance(blocks, str):
        if blocks == "layer":
            key = {n: n.rsplit(".", 1)[0] if "." in n else n for n in names}
        else:
            try:
                pattern = re.compile(blocks)
            except re.error as exc:
                raise ValueError(f"M-FAC blocks {blocks!r} is not a regular expression: "
                                 f"{exc}") from None
            found = {n: pattern.search(n) for n in names}
            key = {n: (0, f.group(0)) if f else (1, "") for n, f in found.items()}
    else:
        listed: dict[str, int] = {}
        for i, block in enumerate(blocks):
            block = [block] if isinstance(block, str) else list(block)
            if not block:
                raise ValueError(f"M-FAC block {i} is empty")
            for n in block:
                if n in listed:
                    raise ValueError(f"M-FAC blocks list {n!r} twice")
                if n not in names:
                    raise ValueError(f"M-FAC blocks list {n!r}, which is not solved for")
                listed[n] = i
        key = {n: (0, listed[n]) if n in listed else (1, 0) for n in names}
    for n in names:
        groups.setdefault(key[n], []).append(n)
    return list(groups.values())


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
        blocks: a partition of the solved names (``partition_blocks``: ``None`` = one global
            block, ``"layer"``, a regular expression, or lists of names); each block is solved
            with its own Gram matrix of the same ``m`` gradients (module docstring).
        window_device: where the window lives (``"cpu"`` keeps it in host memory on a GPU run);
            ``None``: the gradients' device.

    Attributes:
        window: the :class:`GradientWindow`.

    Raises:
        ValueError: at construction for a bad ``m`` or ``tol``; when called with a system whose
            damping ``D`` is not an invertible per-name diagonal, or with a right-hand side over
            other names than the observed gradients.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> H = ib.HessianOperator(lambda p: (p["w"] ** 2).sum(),          # only its names are used
        ...                        {"w": torch.zeros(3, dtype=torch.float64)})
        >>> A = ib.IJSystem(H, mu=0.5, identity=["w"])
        >>> solver = ib.MFAC(m=2)
        >>> G = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
        >>> for g in G:
        ...     solver.observe({"w": g})                   # a training loop's lower gradients
        >>> v = {"w": torch.ones(3, dtype=torch.float64)}
        >>> u, info = solver(A, v)                         # (I + G^T G / (k mu))^-1 v, no H
        >>> fisher = torch.eye(3, dtype=torch.float64) + G.T @ G / (2 * 0.5)
        >>> torch.allclose(u["w"], torch.linalg.solve(fisher, v["w"])), A.products
        (True, 0)
    """

    m: int = 20
    measure_residual: bool = False
    tol: float = 1e-6
    blocks: Any = None
    window_device: str | None = None
    window: GradientWindow = field(init=False, repr=False, compare=False)
    _factor: tuple[Any, list[Tensor]] | None = field(default=None, init=False, repr=False,
                                                     compare=False)

    def __post_init__(self) -> None:
        validate_m(self.m)
        check_real(self.tol, "tol")  # a finite number >= 0, as MINRES and Nyström require
        check_bool(self.measure_residual, "measure_residual")
        if not (self.blocks is None or isinstance(self.blocks, str)):
            self.blocks = [[b] if isinstance(b, str) else list(b) for b in self.blocks]
        partition_blocks([n for b in self.blocks for n in b]
                         if isinstance(self.blocks, list) else [], self.blocks)  # validates
        self.window = GradientWindow(self.m, self.window_device)

    def partition(self) -> list[list[str]]:
        """The blocks of the observed names (``[]`` before the first gradient)."""
        return partition_blocks(list(self.window.names), self.blocks) if self.window.names else []

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
        """The window and its blocks, for checkpoints (:meth:`GradientWindow.state_dict`)."""
        return {"mfac_window": self.window.state_dict(), "mfac_blocks": self.partition()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (its blocks must be this solver's)."""
        self.window.load_state_dict(state["mfac_window"])
        self._factor = None
        saved = state.get("mfac_blocks")
        if saved is not None and [list(b) for b in saved] != self.partition():
            raise ValueError(f"the saved M-FAC window was solved in blocks {saved}, this solver "
                             f"in {self.partition()}")

    def _cholesky(self, diagonal: Mapping[str, float], mu: float) -> list[Tensor]:
        """The lower Cholesky factors of ``kμI + G_b D_b⁻¹ G_bᵀ``, one per block (cached per
        window, ``D`` and ``μ``)."""
        w = self.window
        key = (w.version, tuple(sorted(diagonal.items())), mu)
        if self._factor is None or self._factor[0] != key:
            k = w.count
            eye = k * mu * torch.eye(k, dtype=torch.float64, device=w.gram[w.names[0]].device)
            factors = []
            for block in self.partition():
                core = w.kernel(diagonal, block) + eye
                factors.append(torch.linalg.cholesky(0.5 * (core + core.mT)))
            self._factor = (key, factors)
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
            for block, chol in zip(self.partition(), self._cholesky(diagonal, mu)):
                coef = torch.cholesky_solve(w.project(b, diagonal, block).unsqueeze(1),
                                            chol).squeeze(1)
                correction = w.combine(coef, block)
                for n in block:
                    u[n] = u[n] - (correction[n] / diagonal[n]).to(u[n].device, u[n].dtype)
        return u, direct_solve_info(matvec, b, u, self.tol, self.measure_residual)
