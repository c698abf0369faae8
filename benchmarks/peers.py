"""The peers' versions of one BiSSL upper step: the same implicit-Jacobian solve, other code.

Every function here takes a :class:`~benchmarks.workloads.BiSSLWorkload` and returns a
:class:`PeerResult` with the upper-level hypergradient (over θ_D, φ_D) and the implicit-Jacobian
solution ``u`` of ``(I + H/μ) u = v`` (``v = ∇_θP f``, ``H = ∇²_θP L^P``), so they can be timed
side by side and compared with :meth:`implicitbilevel.BilevelProblem.upper_grad`.

- :func:`reference_upper_step`: the scheme of the original BiSSL code: forward pass and
  ``autograd.grad(create_graph=True)`` recomputed for every Hessian-vector product, block-wise
  CG (``α``, ``β`` per parameter tensor) written as a Python loop over the tensors.
- :func:`torchopt_upper_step`: ``torchopt.diff.implicit.custom_root`` on the optimality condition
  ``∇L^P(θ_P)/μ + θ_P − θ_D = 0``, with ``torchopt.linear_solve.solve_cg`` or TorchOpt's default
  ``solve_normal_cg`` (CG on the normal equations, ``A² u = A v``).
- :func:`betty_upper_step`: Betty's ``betty.hypergradient.cg`` / ``neumann`` called on two
  minimal stand-ins for Betty ``Problem`` objects (the Engine itself needs data loaders and
  optimisers; the hypergradient code is what is measured).
- higher (``higher``) has no implicit solver, only unrolled differentiation; it is reported as not
  applicable.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from implicitbilevel.tree import Params

from .workloads import BiSSLWorkload

__all__ = [
    "PeerResult",
    "betty_upper_step",
    "ours_upper_step",
    "peer_status",
    "reference_upper_step",
    "torchopt_upper_step",
]


@dataclass
class PeerResult:
    """One upper step's outputs.

    Attributes:
        grads: the hypergradient over every upper name (θ_D and φ_D).
        u: the implicit-Jacobian solution over the backbone names.
        v: the right-hand side ``∇_θP f`` (``None`` where the peer does not expose it).
    """

    grads: Params
    u: Params
    v: Params | None = None


def _leaves(params: Params) -> Params:
    return {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}


def _upper_gradients(w: BiSSLWorkload) -> tuple[Params, Params, Params]:
    """``∇_x f`` over the upper names, ``v = ∇_θP f`` over the backbone, and the leaves."""
    x = _leaves(w.upper)
    y = {n: w.lower[n].detach().requires_grad_(True) for n in w.backbone}
    loss = w.upper_loss()(x, {**w.lower, **y}, w.upper_batch)
    grads = torch.autograd.grad(loss, list(x.values()) + list(y.values()))
    grad_x = dict(zip(x.keys(), grads[: len(x)]))
    v = dict(zip(y.keys(), grads[len(x):]))
    return grad_x, v, x


def _assemble(grad_x: Params, u: Params) -> Params:
    # For the proximal coupling the mixed term is +u on the backbone (thesis eq. 4.9).
    out = dict(grad_x)
    for n, un in u.items():
        out[n] = grad_x[n] + un
    return out


def ours_upper_step(w: BiSSLWorkload, problem: Any, lower_hessian: Any = None) -> PeerResult:
    """One :meth:`BilevelProblem.upper_grad` (a fresh ``lower_hessian`` unless one is given)."""
    out = problem.upper_grad(w.upper, w.lower, w.upper_batch, w.lower_batch,
                             lower_hessian=lower_hessian)
    return PeerResult(out.grads, out.u)


# -- the reference scheme (original BiSSL code) ------------------------------------------------


def reference_upper_step(w: BiSSLWorkload, max_iter: int = 5) -> PeerResult:
    """The original BiSSL code's scheme: recomputed double backward, per-tensor block-wise CG."""
    grad_x, v, _ = _upper_gradients(w)
    names = w.backbone
    fixed = {n: p.detach() for n, p in w.lower.items()}
    params = [fixed[n].clone().requires_grad_(True) for n in names]

    def hvp(vec: list[Tensor]) -> list[Tensor]:
        # Forward and first backward recomputed for every product, as the original code does.
        loss = w.lower_loss({**fixed, **dict(zip(names, params))}, w.lower_batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        products = torch.autograd.grad(grads, params, grad_outputs=vec)
        return [vi + hi.detach() / w.mu for vi, hi in zip(vec, products)]

    b = [v[n].detach() for n in names]
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    for _ in range(max_iter):
        ap = hvp(p)
        for i in range(len(names)):  # block-wise CG: α and β per parameter tensor
            rs = torch.sum(r[i] * r[i])
            curvature = torch.sum(p[i] * ap[i])
            alpha = rs / curvature if bool(curvature != 0) else torch.zeros_like(rs)
            x[i] = x[i] + alpha * p[i]
            r_new = r[i] - alpha * ap[i]
            rs_new = torch.sum(r_new * r_new)
            beta = rs_new / rs if bool(rs != 0) else torch.zeros_like(rs)
            p[i] = r_new + beta * p[i]
            r[i] = r_new
    u = dict(zip(names, x))
    return PeerResult(_assemble({n: g.detach() for n, g in grad_x.items()}, u), u,
                      {n: t.detach() for n, t in v.items()})


# -- TorchOpt --------------------------------------------------------------------------------


def torchopt_upper_step(w: BiSSLWorkload, solver: str = "cg", max_iter: int = 5) -> PeerResult:
    """One upper step through ``torchopt.diff.implicit.custom_root``.

    Args:
        w: the workload.
        solver: ``"cg"`` for ``torchopt.linear_solve.solve_cg(maxiter=max_iter, rtol=0)``;
            ``"normal-cg"`` for TorchOpt's default ``solve_normal_cg`` with the same budget
            (its default ``maxiter`` is 10 × the number of unknowns, far beyond N_c = 5).
        max_iter: CG iterations.
    """
    import torchopt

    names = w.backbone
    mu = w.mu
    fixed = {n: p.detach() for n, p in w.lower.items()}

    def optimality(theta_p: tuple[Tensor, ...], theta_d: tuple[Tensor, ...]) -> tuple:
        def scaled_loss(tp: tuple[Tensor, ...]) -> Tensor:
            return w.lower_loss({**fixed, **dict(zip(names, tp))}, w.lower_batch) / mu

        grads = torch.func.grad(scaled_loss)(theta_p)
        return tuple(g + p - d for g, p, d in zip(grads, theta_p, theta_d))

    if solver == "cg":
        solve = torchopt.linear_solve.solve_cg(maxiter=max_iter, rtol=0.0)
    elif solver == "normal-cg":
        solve = torchopt.linear_solve.solve_normal_cg(maxiter=max_iter, rtol=0.0)
    else:
        raise ValueError(f"solver must be 'cg' or 'normal-cg', got {solver!r}")

    captured: dict[str, Any] = {}

    def capturing_solve(matvec: Callable, b: Any) -> Any:
        u = solve(matvec, b)
        captured["u"] = u
        return u

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=capturing_solve)
    def lower_solution(theta_p_init: tuple, theta_d: tuple) -> tuple:
        # The lower level has been trained elsewhere; the solver returns where it stopped.
        return tuple(fixed[n].clone() for n in names)

    x = _leaves(w.upper)
    with warnings.catch_warnings():
        # TorchOpt 0.7.3 calls the deprecated functorch.vjp on every solve.
        warnings.filterwarnings("ignore", message=".*functorch.vjp.*", category=FutureWarning)
        theta_p = lower_solution(tuple(fixed[n] for n in names), tuple(x[n] for n in names))
        loss = w.upper_loss()(x, {**fixed, **dict(zip(names, theta_p))}, w.upper_batch)
        grads = dict(zip(x.keys(), torch.autograd.grad(loss, list(x.values()))))
    # TorchOpt solves Aᵀ u' = −g (its sign convention); u = −u'.
    u = {n: -t.detach() for n, t in zip(names, captured["u"])}
    return PeerResult({n: g.detach() for n, g in grads.items()}, u)


# -- Betty -----------------------------------------------------------------------------------


class _BettyLower:
    """The attributes ``betty.hypergradient.cg/neumann`` read from a lower-level ``Problem``."""

    def __init__(self, w: BiSSLWorkload, theta_d: list[Tensor], iterations: int) -> None:
        self.paths: list = []
        self.config = SimpleNamespace(cg_iterations=iterations, cg_alpha=1.0,
                                      neumann_iterations=iterations, neumann_alpha=1.0)
        self._w = w
        self._fixed = {n: p.detach() for n, p in w.lower.items()}
        self._theta_p = [self._fixed[n].clone().requires_grad_(True) for n in w.backbone]
        self._theta_d = theta_d
        self.cur_batch = w.lower_batch

    def training_step_exec(self, batch: Any) -> Tensor:
        """``G = L^P(θ_P)/μ + ½‖θ_P − θ_D‖²``, whose Hessian in θ_P is ``I + H/μ``."""
        w = self._w
        loss = w.lower_loss({**self._fixed, **dict(zip(w.backbone, self._theta_p))}, batch)
        reg = sum(0.5 * (p - d).square().sum() for p, d in zip(self._theta_p, self._theta_d))
        return loss / w.mu + reg

    def trainable_parameters(self) -> list[Tensor]:
        """θ_P."""
        return self._theta_p

    def parameters(self) -> list[Tensor]:
        """θ_P."""
        return self._theta_p


def betty_upper_step(w: BiSSLWorkload, method: str = "cg", iterations: int = 5) -> PeerResult:
    """One upper step with Betty's ``cg`` or ``neumann`` hypergradient (``cg_alpha = 1``)."""
    from betty.hypergradient import cg, neumann

    grad_x, v, x = _upper_gradients(w)
    theta_d = [x[n] for n in w.backbone]
    lower = _BettyLower(w, theta_d, iterations)
    upper = SimpleNamespace(trainable_parameters=lambda: theta_d)
    vector = [v[n].detach() for n in w.backbone]
    fn = {"cg": cg, "neumann": neumann}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        implicit = fn(vector, lower, upper)
    # Betty returns −∂²G/∂θ_D∂θ_P · x = x (the mixed block of G is −I), i.e. u itself.
    u = {n: t.detach() for n, t in zip(w.backbone, implicit)}
    return PeerResult(_assemble({n: g.detach() for n, g in grad_x.items()}, u), u,
                      {n: t.detach() for n, t in v.items()})


# -- install status --------------------------------------------------------------------------

_PIP_NAMES = {"torchopt": "torchopt", "betty": "betty-ml", "higher": "higher"}


def peer_status(try_install: bool = False) -> dict[str, dict[str, Any]]:
    """Whether each peer imports beside this torch; the exact error string where it does not.

    With ``try_install`` a missing peer is first installed with ``pip install <name>`` into this
    interpreter's environment, and pip's last error line is recorded when that fails.
    """
    status: dict[str, dict[str, Any]] = {}
    for module, pip_name in _PIP_NAMES.items():
        entry: dict[str, Any] = {"package": pip_name}
        try:
            importlib.import_module(module)
        except Exception as err:
            entry["import_error"] = f"{type(err).__name__}: {err}"
            if try_install:
                proc = subprocess.run(
                    [sys.executable, "-m", "pip", "install", pip_name],
                    capture_output=True, text=True, timeout=600,
                )
                lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "ERROR" in ln]
                entry["install_error"] = lines[-1] if proc.returncode else None
                try:
                    importlib.import_module(module)
                    entry.pop("import_error")
                except Exception as err2:
                    entry["import_error"] = f"{type(err2).__name__}: {err2}"
        try:
            entry["version"] = importlib.metadata.version(pip_name)
        except importlib.metadata.PackageNotFoundError:
            entry["version"] = None
        entry["available"] = "import_error" not in entry
        status[module] = entry
    status["higher"]["note"] = (
        "higher provides differentiable unrolled inner loops only (no implicit-Jacobian "
        "solver); not applicable to the IJ solve"
    )
    if status["betty"]["available"]:
        status["betty"]["note"] = (
            "pip on Python 3.11 resolves betty-ml to 0.1.1 (0.2.x declares Requires-Python "
            "<3.11); its hypergradient functions are called on stand-in Problem objects"
        )
    return status
