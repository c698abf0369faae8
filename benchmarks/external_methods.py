"""Hypergradient methods for :mod:`benchmarks.external_problems`: this library's solvers and the
peers', each a callable ``() -> dF/dx`` at the problem's fixed point for a budget of ``N_c``
iterations.

- Ours: :func:`implicitbilevel.argmin` on ``g`` with :class:`~implicitbilevel.CG`,
  :class:`~implicitbilevel.MINRES`, :class:`~implicitbilevel.Neumann` (step ``α = 1/λ_max``),
  :class:`~implicitbilevel.Dense`, and the Nyström methods (CG with a rank-``k``
  :class:`~implicitbilevel.NystromPreconditioner`; :class:`~implicitbilevel.NystromSolver` of
  rank ``N_c``). The Nyström methods solve ``I + H̃/δ``: the objective handed to the argmin is
  ``g − δ/2‖y‖²`` with ``damping = δ``, so the system is exactly ``∇²_yy g`` (``δ`` is half the
  smallest eigenvalue of ``∇²_yy g``, so ``H̃ = ∇²g − δI`` stays positive definite).
- TorchOpt: ``torchopt.diff.implicit.custom_root`` on ``∇_y g = 0`` with ``solve_cg``, its
  default ``solve_normal_cg`` and the Neumann series ``solve_inv(ns=True)``.
- JAXopt (``jax`` on CPU, float64): ``jaxopt.implicit_diff.custom_root`` with ``solve_cg`` and
  its default ``solve_normal_cg``; the whole hypergradient ``jax.jit``-compiled once (the
  compilation is timed separately, not in the per-call time).
- Betty (``betty-ml``): ``betty.hypergradient.cg`` and ``neumann`` on stand-ins with the
  attributes Betty's ``Problem`` gives them (:class:`benchmarks.peers.BettyStandIn`).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

import implicitbilevel as ib

from .external_problems import ExternalProblem
from .peers import (
    BettyStandIn,
    import_error,
    installed_version,
    products_per_solve,
    torchopt_solver,
    torchopt_warnings,
)

__all__ = ["Method", "methods", "peer_availability"]

Hypergradient = Callable[[], Tensor]


@dataclass
class Method:
    """A hypergradient method: ``build(problem, n_c) -> (callable, products per call)``.

    ``sweeps`` is False for a method whose cost does not depend on ``N_c`` (measured once).
    """

    label: str
    library: str
    build: Callable[[ExternalProblem, int], tuple[Hypergradient, float]]
    sweeps: bool = True


# -- ours --------------------------------------------------------------------------------------


def _ours(solver_for: Callable[[ExternalProblem, int], ib.LinearSolver],
          split: bool = False, extra_products: Callable[[ExternalProblem], int] | None = None
          ) -> Callable[[ExternalProblem, int], tuple[Hypergradient, float]]:
    def build(problem: ExternalProblem, n_c: int) -> tuple[Hypergradient, float]:
        solver = solver_for(problem, n_c)
        delta = 0.5 * problem.eigenvalues()[0] if split else 0.0
        records: list[ib.SolveInfo] = []

        def objective(y: dict, x: dict) -> Tensor:
            g = problem.inner(y["y"], x["x"])
            return g - 0.5 * delta * y["y"].square().sum() if split else g

        def hypergradient() -> Tensor:
            x = problem.x.clone().requires_grad_(True)
            y = ib.argmin(objective, {"y": problem.y}, {"x": x},
                          ij=ib.ImplicitJacobian(solver, damping=delta, on_breakdown="ignore"),
                          on_solve=lambda s: records.append(s.info))
            (grad,) = torch.autograd.grad(problem.outer(y["y"], x), x)
            return grad

        hypergradient()
        info = records[-1]
        products = info.iterations + (extra_products(problem) if extra_products else 0)
        return hypergradient, float(products)

    return build


def _neumann_alpha(problem: ExternalProblem) -> float:
    return 1.0 / problem.eigenvalues()[1]


NYSTROM_RANK = 10


def _our_methods() -> list[Method]:
    dim = lambda p: p.y.numel()  # noqa: E731
    return [
        Method("CG", "ours", _ours(lambda p, n: ib.CG(max_iter=n))),
        Method("MINRES", "ours", _ours(lambda p, n: ib.MINRES(max_iter=n))),
        Method("Neumann (alpha = 1/lambda_max)", "ours",
               _ours(lambda p, n: ib.Neumann(max_iter=n, alpha=_neumann_alpha(p)))),
        Method(f"CG + Nystrom preconditioner (k = {NYSTROM_RANK})", "ours",
               _ours(lambda p, n: ib.CG(max_iter=n, preconditioner=ib.NystromPreconditioner(
                   rank=min(NYSTROM_RANK, dim(p)))), split=True,
                     extra_products=lambda p: min(NYSTROM_RANK, dim(p)))),
        Method("Nystrom solver (Woodbury, k = N_c)", "ours",
               _ours(lambda p, n: ib.NystromSolver(rank=min(n, dim(p))), split=True,
                     extra_products=lambda p: 0)),
        Method("Dense", "ours", _ours(lambda p, n: ib.Dense()), sweeps=False),
    ]


# -- TorchOpt ------------------------------------------------------------------------------------


def _torchopt(kind: str) -> Callable[[ExternalProblem, int], tuple[Hypergradient, float]]:
    def build(problem: ExternalProblem, n_c: int) -> tuple[Hypergradient, float]:
        import torchopt

        solve = torchopt_solver(kind, n_c, alpha=_neumann_alpha(problem))

        def optimality(y: Tensor, x: Tensor) -> Tensor:
            return torch.func.grad(problem.inner)(y, x)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def inner_solution(y_init: Tensor, x: Tensor) -> Tensor:
            return problem.y.clone()  # solved elsewhere: the fixed point

        def hypergradient() -> Tensor:
            x = problem.x.clone().requires_grad_(True)
            with torchopt_warnings():
                y = inner_solution(problem.y, x)
                (grad,) = torch.autograd.grad(problem.outer(y, x), x)
            return grad

        return hypergradient, float(products_per_solve(kind, n_c))

    return build


# -- JAXopt ----------------------------------------------------------------------------------


def _jax_setup() -> None:
    """CPU, float64, one intra-op thread (like torch here): set before ``jax`` is imported."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                          "intra_op_parallelism_threads=1")
    import jax

    jax.config.update("jax_enable_x64", True)


def _jaxopt(kind: str) -> Callable[[ExternalProblem, int], tuple[Hypergradient, float]]:
    def build(problem: ExternalProblem, n_c: int) -> tuple[Hypergradient, float]:
        _jax_setup()
        import jax
        import jax.numpy as jnp
        from jaxopt import implicit_diff, linear_solve

        inner, outer = problem.jax_functions()
        base = linear_solve.solve_cg if kind == "cg" else linear_solve.solve_normal_cg

        def solve(matvec: Callable, b: Any) -> Any:
            return base(matvec, b, maxiter=n_c, tol=0.0)

        y_star = jnp.asarray(problem.y.numpy())

        @implicit_diff.custom_root(jax.grad(inner), solve=solve)
        def inner_solution(y_init: Any, x: Any) -> Any:
            return y_init  # solved elsewhere: the fixed point is passed in

        grad_fn = jax.jit(jax.grad(lambda x: outer(inner_solution(y_star, x), x)))
        x0 = jnp.asarray(problem.x.numpy())
        start = time.perf_counter()
        grad_fn(x0).block_until_ready()
        build.compile_seconds[(problem.name, n_c)] = time.perf_counter() - start

        def hypergradient() -> Tensor:
            return torch.from_numpy(jax.device_get(grad_fn(x0).block_until_ready()).copy())

        return hypergradient, float(products_per_solve(kind, n_c))

    build.compile_seconds = {}  # type: ignore[attr-defined]
    return build


# -- Betty ----------------------------------------------------------------------------------


def _betty(kind: str) -> Callable[[ExternalProblem, int], tuple[Hypergradient, float]]:
    def build(problem: ExternalProblem, n_c: int) -> tuple[Hypergradient, float]:
        from betty.hypergradient import cg, neumann

        fn = {"cg": cg, "neumann": neumann}[kind]
        alpha = _neumann_alpha(problem)

        def hypergradient() -> Tensor:
            x = problem.x.clone().requires_grad_(True)
            y = problem.y.clone().requires_grad_(True)
            lower = BettyStandIn([y], lambda batch: problem.inner(y, x), n_c, neumann_alpha=alpha)
            grad_y, grad_x = torch.autograd.grad(problem.outer(y, x), (y, x), allow_unused=True)
            upper = SimpleNamespace(trainable_parameters=lambda: [x])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (implicit,) = fn([grad_y], lower, upper)  # −∇²_xy g · [∇²_yy g]⁻¹ ∇_y f
            return implicit if grad_x is None else grad_x + implicit

        return hypergradient, float(n_c)

    return build


# -- the list ------------------------------------------------------------------------------

_PEERS = {"torchopt": ("torchopt", "torchopt"), "jaxopt": ("jaxopt", "jaxopt"),
          "betty": ("betty", "betty-ml")}


def peer_availability() -> dict[str, dict[str, Any]]:
    """Whether each peer imports beside this torch (its version, or the exact import error)."""
    status: dict[str, dict[str, Any]] = {}
    for key, (module, dist) in _PEERS.items():
        entry: dict[str, Any] = {"package": dist}
        error = None
        if key == "jaxopt":
            try:
                _jax_setup()
            except Exception as err:  # a missing or broken peer is recorded, not fatal
                error = f"{type(err).__name__}: {err}"
        error = error or import_error(module, quiet=True)
        if error is None:
            entry.update(version=installed_version(dist), available=True)
        else:
            entry.update(available=False, error=error)
        status[key] = entry
    return status


def methods(status: dict[str, dict[str, Any]]) -> list[Method]:
    """Our methods, then every peer method whose package imports."""
    out = _our_methods()
    if status["torchopt"]["available"]:
        out += [Method("TorchOpt custom_root + solve_cg", "torchopt", _torchopt("cg")),
                Method("TorchOpt custom_root default (solve_normal_cg)", "torchopt",
                       _torchopt("normal-cg")),
                Method("TorchOpt solve_inv(ns=True) (Neumann, alpha = 1/lambda_max)", "torchopt",
                       _torchopt("neumann"))]
    if status["jaxopt"]["available"]:
        out += [Method("JAXopt custom_root + solve_cg (jit)", "jaxopt", _jaxopt("cg")),
                Method("JAXopt custom_root default (solve_normal_cg, jit)", "jaxopt",
                       _jaxopt("normal-cg"))]
    if status["betty"]["available"]:
        out += [Method("Betty cg", "betty", _betty("cg")),
                Method("Betty neumann (alpha = 1/lambda_max)", "betty", _betty("neumann"))]
    return out
