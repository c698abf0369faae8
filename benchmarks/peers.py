"""The peers' versions of one BiSSL upper step: the same implicit-Jacobian solve, other code.

Every function here takes a :class:`~benchmarks.workloads.BiSSLWorkload` and returns a
:class:`PeerResult` with the upper-level hypergradient (over θ_D, φ_D) and the implicit-Jacobian
solution ``u`` of ``(I + H/μ) u = v`` (``v = ∇_θP f``, ``H = ∇²_θP L^P``), so they can be timed
side by side and compared with :meth:`implicitbilevel.BilevelProblem.upper_grad`.

- :func:`benchmarks.reference.reference_upper_step` (with the other reference solvers): the
  scheme of the original BiSSL code, on the same :class:`PeerResult`.
- :func:`torchopt_upper_step`: ``torchopt.diff.implicit.custom_root`` on the optimality condition
  ``∇L^P(θ_P)/μ + θ_P − θ_D = 0``, with ``torchopt.linear_solve.solve_cg`` or TorchOpt's default
  ``solve_normal_cg`` (CG on the normal equations, ``A² u = A v``).
- :func:`betty_upper_step`: Betty's ``betty.hypergradient.cg`` / ``neumann`` called on two
  minimal stand-ins for Betty ``Problem`` objects (the Engine itself needs data loaders and
  optimisers; the hypergradient code is what is measured): :class:`BettyStandIn`.
- higher (``higher``) has no implicit solver, only unrolled differentiation; it is reported as not
  applicable.

The TorchOpt solvers (:func:`torchopt_solver`), the Betty stand-in and the import checks
(:func:`import_error`, :func:`installed_version`) serve :mod:`benchmarks.external_methods` too.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from implicitbilevel.tree import Params

from .workloads import BiSSLWorkload

__all__ = [
    "BettyStandIn",
    "PeerResult",
    "assemble",
    "betty_upper_step",
    "import_error",
    "installed_version",
    "ours_upper_step",
    "peer_status",
    "products_per_solve",
    "torchopt_solver",
    "torchopt_upper_step",
    "torchopt_warnings",
    "upper_gradients",
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


def upper_gradients(w: BiSSLWorkload) -> tuple[Params, Params, Params]:
    """``∇_x f`` over the upper names, ``v = ∇_θP f`` over the backbone, and the leaves."""
    x = _leaves(w.upper)
    y = {n: w.lower[n].detach().requires_grad_(True) for n in w.backbone}
    loss = w.upper_loss()(x, {**w.lower, **y}, w.upper_batch)
    grads = torch.autograd.grad(loss, list(x.values()) + list(y.values()))
    grad_x = dict(zip(x.keys(), grads[: len(x)]))
    v = dict(zip(y.keys(), grads[len(x):]))
    return grad_x, v, x


def assemble(grad_x: Params, u: Params) -> Params:
    """The hypergradient ``∇_x f + u`` on the backbone: for the proximal coupling the mixed term
    is ``+u`` (thesis eq. 4.9)."""
    out = dict(grad_x)
    for n, un in u.items():
        out[n] = grad_x[n] + un
    return out


def ours_upper_step(w: BiSSLWorkload, problem: Any, lower_hessian: Any = None) -> PeerResult:
    """One :meth:`BilevelProblem.upper_grad` (a fresh ``lower_hessian`` unless one is given)."""
    out = problem.upper_grad(w.upper, w.lower, w.upper_batch, w.lower_batch,
                             lower_hessian=lower_hessian)
    return PeerResult(out.grads, out.u)


# -- TorchOpt --------------------------------------------------------------------------------


def torchopt_solver(kind: str, max_iter: int, alpha: float = 1.0) -> Callable:
    """TorchOpt's linear solve with a fixed budget and no tolerance stop: ``"cg"``
    (``solve_cg``), ``"normal-cg"`` (its default ``solve_normal_cg``, CG on ``A²u = Av``) or
    ``"neumann"`` (``solve_inv(ns=True)`` with step ``alpha``)."""
    import torchopt

    if kind == "cg":
        return torchopt.linear_solve.solve_cg(maxiter=max_iter, rtol=0.0)
    if kind == "normal-cg":
        return torchopt.linear_solve.solve_normal_cg(maxiter=max_iter, rtol=0.0)
    return torchopt.linear_solve.solve_inv(ns=True, maxiter=max_iter, alpha=alpha)


def products_per_solve(kind: str, max_iter: int) -> int:
    """Curvature products a solve spends (normal-equation CG: a product and a transposed one per
    iteration)."""
    return 2 * max_iter if kind == "normal-cg" else max_iter


@contextlib.contextmanager
def torchopt_warnings() -> Iterator[None]:
    """Silence TorchOpt 0.7.3's deprecation warning for ``functorch.vjp`` (on every solve)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*functorch.vjp.*", category=FutureWarning)
        yield


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

    if solver not in ("cg", "normal-cg"):
        raise ValueError(f"solver must be 'cg' or 'normal-cg', got {solver!r}")
    solve = torchopt_solver(solver, max_iter)

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
    with torchopt_warnings():
        theta_p = lower_solution(tuple(fixed[n] for n in names), tuple(x[n] for n in names))
        loss = w.upper_loss()(x, {**fixed, **dict(zip(names, theta_p))}, w.upper_batch)
        grads = dict(zip(x.keys(), torch.autograd.grad(loss, list(x.values()))))
    # TorchOpt solves Aᵀ u' = −g (its sign convention); u = −u'.
    u = {n: -t.detach() for n, t in zip(names, captured["u"])}
    return PeerResult({n: g.detach() for n, g in grads.items()}, u)


# -- Betty -----------------------------------------------------------------------------------


class BettyStandIn:
    """The attributes ``betty.hypergradient.cg/neumann`` read from a lower-level ``Problem``.

    ``loss(batch)`` is the lower objective ``G`` at ``params`` (the leaves it differentiates);
    ``cg_alpha`` is 1, ``neumann_alpha`` the given step, both with ``iterations``.
    """

    def __init__(self, params: list[Tensor], loss: Callable[[Any], Tensor], iterations: int,
                 neumann_alpha: float = 1.0, batch: Any = None) -> None:
        self.paths: list = []
        self.config = SimpleNamespace(cg_iterations=iterations, cg_alpha=1.0,
                                      neumann_iterations=iterations, neumann_alpha=neumann_alpha)
        self.cur_batch = batch
        self._params, self._loss = params, loss

    def training_step_exec(self, batch: Any) -> Tensor:
        """The lower objective on ``batch``."""
        return self._loss(batch)

    def trainable_parameters(self) -> list[Tensor]:
        """The lower parameters."""
        return self._params

    def parameters(self) -> list[Tensor]:
        """The lower parameters."""
        return self._params


def betty_upper_step(w: BiSSLWorkload, method: str = "cg", iterations: int = 5) -> PeerResult:
    """One upper step with Betty's ``cg`` or ``neumann`` hypergradient (``cg_alpha = 1``)."""
    from betty.hypergradient import cg, neumann

    grad_x, v, x = upper_gradients(w)
    theta_d = [x[n] for n in w.backbone]
    fixed = {n: p.detach() for n, p in w.lower.items()}
    theta_p = [fixed[n].clone().requires_grad_(True) for n in w.backbone]

    def objective(batch: Any) -> Tensor:
        """``G = L^P(θ_P)/μ + ½‖θ_P − θ_D‖²``, whose Hessian in θ_P is ``I + H/μ``."""
        loss = w.lower_loss({**fixed, **dict(zip(w.backbone, theta_p))}, batch)
        reg = sum(0.5 * (p - d).square().sum() for p, d in zip(theta_p, theta_d))
        return loss / w.mu + reg

    lower = BettyStandIn(theta_p, objective, iterations, batch=w.lower_batch)
    upper = SimpleNamespace(trainable_parameters=lambda: theta_d)
    vector = [v[n].detach() for n in w.backbone]
    fn = {"cg": cg, "neumann": neumann}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        implicit = fn(vector, lower, upper)
    # Betty returns −∂²G/∂θ_D∂θ_P · x = x (the mixed block of G is −I), i.e. u itself.
    u = {n: t.detach() for n, t in zip(w.backbone, implicit)}
    return PeerResult(assemble({n: g.detach() for n, g in grad_x.items()}, u), u,
                      {n: t.detach() for n, t in v.items()})


# -- install status --------------------------------------------------------------------------

_PIP_NAMES = {"torchopt": "torchopt", "betty": "betty-ml", "higher": "higher"}


def import_error(module: str, quiet: bool = False) -> str | None:
    """``None`` where ``module`` imports, else the exact error (``Type: message``); ``quiet``
    silences the warnings the import raises."""
    try:
        with warnings.catch_warnings() if quiet else contextlib.nullcontext():
            if quiet:
                warnings.simplefilter("ignore")
            importlib.import_module(module)
    except Exception as err:  # a missing or broken peer is recorded, not fatal
        return f"{type(err).__name__}: {err}"
    return None


def installed_version(dist: str) -> str | None:
    """The installed version of the distribution ``dist`` (``None`` where it is not installed)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def peer_status(try_install: bool = False) -> dict[str, dict[str, Any]]:
    """Whether each peer imports beside this torch; the exact error string where it does not.

    With ``try_install`` a missing peer is first installed with ``pip install <name>`` into this
    interpreter's environment, and pip's last error line is recorded when that fails.
    """
    status: dict[str, dict[str, Any]] = {}
    for module, pip_name in _PIP_NAMES.items():
        entry: dict[str, Any] = {"package": pip_name}
        error = import_error(module)
        if error is not None:
            entry["import_error"] = error
            if try_install:
                proc = subprocess.run(
                    [sys.executable, "-m", "pip", "install", pip_name],
                    capture_output=True, text=True, timeout=600,
                )
                lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "ERROR" in ln]
                entry["install_error"] = lines[-1] if proc.returncode else None
                error = import_error(module)
                if error is None:
                    entry.pop("import_error")
                else:
                    entry["import_error"] = error
        entry["version"] = installed_version(pip_name)
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
