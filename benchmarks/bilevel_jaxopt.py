"""JAXopt's implicit hypergradient as an external method of the bilevel suite (optional).

benchopt's bilevel benchmark runs JAXopt as its implicit-differentiation baseline. Here the
method ``jaxopt-implicit`` is outer gradient descent with JAXopt's hypergradient: the inner
problem is solved by ``jaxopt.GradientDescent`` (plain gradient steps, no acceleration, warm
started, 10 steps of size ``s`` as the library's implicit runners take), whose ``run`` is
differentiated implicitly (``implicit_diff=True``: ``jaxopt.implicit_diff.custom_root`` on the
optimality condition ``∇_y g(x, y) = 0``, the system ``∇²_yy g · w = ∇_y f`` solved by
``jaxopt.linear_solve.solve_cg`` with 10 iterations), and the outer step ``s / r`` is taken on
``jax.grad`` of ``x ↦ f(x, y(x))`` (thesis Theorem 3.2: ``∇_x f − ∇²_xy g w``), full batches,
float64, the step compiled by ``jax.jit`` once before the clock starts.

It is ported for the problems whose losses are written here in JAX: the quadratic and the two
binary logistic regressions (ijcnn1, breast-cancer); the others raise ``NotImplementedError``.
JAX is not a dependency of the library or of the suite: :func:`unavailable` says why the method
cannot run (``jax``/``jaxopt`` missing, or the problem not ported), and the suite then leaves it
out with that reason. Oracle calls are counted as for ``implicit-cg``: 10 inner gradients, one
``∇f``, one mixed product and at most 10 Hessian products per step (JAXopt does not report how
many CG iterations it took; its tolerance is set below reach, so it takes 10).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from benchmarks.bilevel_methods import INNER_STEPS, MethodSpec, Runner
from benchmarks.bilevel_problems import BenchProblem, Params

__all__ = ["EXTERNAL", "PORTED", "JaxoptRunner", "jaxopt_hypergradient", "unavailable"]

PORTED = ("quadratic", "ijcnn1", "breast_cancer")
CG_ITERS = 10
# One XLA thread, as the suite's one torch thread (read when jax is first imported).
_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def unavailable(problem: str | None = None) -> str | None:
    """Why ``jaxopt-implicit`` cannot run (on ``problem``), or ``None`` when it can."""
    if problem is not None and problem not in PORTED:  # whether or not jax is installed
        return f"JAXopt's losses are ported for {', '.join(PORTED)} only, not {problem}"
    os.environ.setdefault("XLA_FLAGS", _ONE_THREAD)
    try:
        import jax  # noqa: F401
        with warnings.catch_warnings():  # "JAXopt is no longer maintained" (0.8.5)
            warnings.simplefilter("ignore", DeprecationWarning)
            import jaxopt  # noqa: F401
    except ImportError as err:
        return f"jax and jaxopt are not installed ({err}); pip install jax jaxopt"
    return None


def _losses(name: str) -> tuple[Callable, Callable]:
    """``(f, g)`` of the problem ``name`` in JAX, ``f(x, z, data)`` and ``g(x, z, data)``."""
    import jax
    import jax.numpy as jnp

    if name == "quadratic":
        def g(x: Any, z: Any, d: dict) -> Any:
            return jnp.mean(0.5 * (d["a"] @ z) ** 2 + 0.5 * (d["b"] @ x) ** 2
                            + (d["u"] @ x) * (d["w"] @ z) + d["c"] @ z + d["d"] @ x)
        return g, g
    if name in ("ijcnn1", "breast_cancer"):
        def log_loss(z: Any, d: dict) -> Any:
            return jnp.mean(jax.nn.softplus(-d["t"] * (d["a"] @ z)))

        def g_log(x: Any, z: Any, d: dict) -> Any:
            return log_loss(z, d) + 0.5 * jnp.sum(jnp.exp(x) * z ** 2)

        return (lambda x, z, d: log_loss(z, d)), g_log
    raise NotImplementedError(unavailable(name))


def _to_jax(data: dict[str, torch.Tensor]) -> dict[str, Any]:
    import jax.numpy as jnp

    return {k: jnp.asarray(t.numpy()) for k, t in data.items() if k != "index"}


def _hypergradient_fn(problem: BenchProblem, step: float, inner_steps: int = INNER_STEPS,
                      cg_iters: int = CG_ITERS) -> Callable:
    """``(x, z0, inner, outer) -> (∇h estimate, y)``: ``inner_steps`` gradient steps from
    ``z0`` with JAXopt, differentiated implicitly."""
    import jax
    import jaxopt
    from jaxopt import linear_solve

    f, g = _losses(problem.name)
    solver = jaxopt.GradientDescent(
        fun=lambda z, x, data: g(x, z, data), stepsize=step, maxiter=inner_steps, tol=0.0,
        acceleration=False, implicit_diff=True,
        implicit_diff_solve=partial(linear_solve.solve_cg, maxiter=cg_iters, tol=1e-30))

    def outer(x: Any, z0: Any, inner: dict, data: dict) -> tuple[Any, Any]:
        z = solver.run(z0, x, inner).params
        return f(x, z, data), z

    grad = jax.grad(outer, has_aux=True)
    return lambda x, z0, inner, data: grad(x, z0, inner, data)


def jaxopt_hypergradient(problem: BenchProblem, x: Params, y: Params, step: float,
                         inner_steps: int = INNER_STEPS, cg_iters: int = CG_ITERS
                         ) -> tuple[Params, Params]:
    """JAXopt's hypergradient at ``x`` after ``inner_steps`` steps of size ``step`` from ``y``,
    and the inner iterate it reached (torch float64, the names of ``x`` and ``y``)."""
    reason = unavailable(problem.name)
    if reason:
        raise NotImplementedError(reason)
    import jax

    jax.config.update("jax_enable_x64", True)
    fn = jax.jit(_hypergradient_fn(problem, step, inner_steps, cg_iters))
    grad, z = fn(*_point(x, y), _to_jax(problem.inner), _to_jax(problem.outer))
    return {"x": _torch(grad)}, {"z": _torch(z)}


def _point(x: Params, y: Params) -> tuple[Any, Any]:
    import jax.numpy as jnp

    return jnp.asarray(x["x"].numpy()), jnp.asarray(y["z"].numpy())


def _torch(a: Any) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(a, dtype=np.float64))


class JaxoptRunner(Runner):
    """``jaxopt-implicit``: one outer step per :meth:`step` (module docstring)."""

    def __init__(self, problem: BenchProblem, step: float, ratio: float) -> None:
        reason = unavailable(problem.name)
        if reason:
            raise NotImplementedError(reason)
        import jax

        jax.config.update("jax_enable_x64", True)
        super().__init__(problem)
        grad = _hypergradient_fn(problem, step)
        lr = step / ratio

        def outer_step(x: Any, z: Any, inner: dict, data: dict) -> tuple[Any, Any]:
            hyper, z_new = grad(x, z, inner, data)
            return x - lr * hyper, z_new

        self._step = jax.jit(outer_step)
        self._inner, self._outer = _to_jax(problem.inner), _to_jax(problem.outer)
        self._x, self._z = _point(self.x, self.y)
        jax.block_until_ready(self._step(self._x, self._z, self._inner, self._outer))  # compile
        self.calls = 0.0

    def step(self) -> None:
        self._x, self._z = self._step(self._x, self._z, self._inner, self._outer)
        self.x["x"].copy_(_torch(self._x))
        self.y["z"].copy_(_torch(self._z))
        self.calls += INNER_STEPS + 2 + CG_ITERS

    def equivalents(self) -> float:
        return self.calls


def _build(problem: BenchProblem, step: float, ratio: float, gen: torch.Generator) -> Runner:
    return JaxoptRunner(problem, step, ratio)


EXTERNAL = (MethodSpec("jaxopt-implicit", "external", _build),)
"""The suite's external methods (run where :func:`unavailable` says nothing)."""


def check_agreement(problem: BenchProblem, x: Params, y: Params, step: float) -> float:
    """``‖JAXopt's hypergradient − the closed form‖/‖closed form‖`` at ``x`` from ``y``."""
    hyper, _ = jaxopt_hypergradient(problem, x, y, step)
    exact = problem.hypergradient(x, problem.solve(x, None))
    return float((hyper["x"] - exact["x"]).norm() / exact["x"].norm().clamp_min(math.ulp(1.0)))
