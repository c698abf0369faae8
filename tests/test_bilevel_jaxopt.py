"""JAXopt's implicit hypergradient (``benchmarks/bilevel_jaxopt.py``), the bilevel suite's
external reference, against the library's hypergradient and the closed form.

The tests that run JAXopt are skipped where ``jax`` and ``jaxopt`` are not installed (CI's
environment does not install them: its report shows these skips, with that reason); the last
test, how the suite leaves the method out, runs everywhere.
"""

from __future__ import annotations

import pytest
import torch

import implicitbilevel as ib
from benchmarks.bilevel_jaxopt import PORTED, unavailable
from benchmarks.bilevel_problems import quadratic_problem
from benchmarks.bilevel_registry import build

F64 = torch.float64
needs_jax = pytest.mark.skipif(unavailable() is not None,
                               reason=f"JAXopt comparison skipped: {unavailable()}")


pytestmark = pytest.mark.usefixtures("one_thread")


def _library(pb, x, y):
    """The library's hypergradient: ``argmin`` at the converged ``y``, CG to 1e-13."""
    xs = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    y_star = ib.argmin(lambda y_, x_: pb.g(x_, y_, pb.inner), y, xs,
                       ij=ib.ImplicitJacobian(ib.CG(max_iter=200, tol=1e-13)))
    return {"x": torch.autograd.grad(pb.f(xs, y_star, pb.outer), xs["x"])[0]}


def _rel(a, b):
    return float((a["x"] - b["x"]).norm() / b["x"].norm())


@needs_jax
@pytest.mark.parametrize("name", ["quadratic", "breast_cancer"])
def test_jaxopt_agrees_with_the_library_and_the_closed_form(name):
    from benchmarks.bilevel_jaxopt import jaxopt_hypergradient

    if name == "quadratic":
        pb = quadratic_problem(dim_inner=5, dim_outer=2, n_inner=64, n_outer=32, mu=0.5, seed=1)
        x = {"x": torch.tensor([0.3, -0.2], dtype=F64)}
        step, tol = 1.0, 1e-10
    else:
        pb = build(name)
        x = {n: t.clone() for n, t in pb.x0.items()}
        step, tol = 0.25, 1e-7
    y = pb.solve(x, None)
    exact = pb.hypergradient(x, y)
    jax_grad, jax_y = jaxopt_hypergradient(pb, x, y, step, inner_steps=10, cg_iters=60)
    assert float((jax_y["z"] - y["z"]).norm()) < 1e-8  # gradient steps stay at y*
    assert _rel(jax_grad, exact) < tol
    assert _rel(jax_grad, _library(pb, x, y)) < tol


@needs_jax
def test_jaxopt_runner_takes_the_outer_step_on_jaxopts_hypergradient():
    from benchmarks.bilevel_jaxopt import CG_ITERS, INNER_STEPS, JaxoptRunner, jaxopt_hypergradient

    pb = quadratic_problem(dim_inner=4, dim_outer=2, n_inner=128, n_outer=64)
    step, ratio = 0.1, 2.0
    runner = JaxoptRunner(pb, step, ratio)
    x0, y0 = {"x": runner.x["x"].clone()}, {"z": runner.y["z"].clone()}
    runner.step()
    hyper, y1 = jaxopt_hypergradient(pb, x0, y0, step)
    assert torch.allclose(runner.x["x"], x0["x"] - step / ratio * hyper["x"], rtol=1e-12,
                          atol=1e-14)
    assert torch.allclose(runner.y["z"], y1["z"], rtol=1e-12, atol=1e-14)
    # ten plain gradient steps from y0, as the library's implicit runners take
    z = y0["z"].clone()
    for _ in range(INNER_STEPS):
        zz = z.clone().requires_grad_(True)
        z = z - step * torch.autograd.grad(pb.g(x0, {"z": zz}, pb.inner), zz)[0]
    assert torch.allclose(runner.y["z"], z, rtol=1e-10, atol=1e-12)
    assert runner.equivalents() == INNER_STEPS + 2 + CG_ITERS


def test_the_suite_leaves_jaxopt_out_with_the_reason(tmp_path):
    from benchmarks.bilevel_suite import render

    assert "ported" in unavailable("digits_multilogreg") and "quadratic" in PORTED
    reason = unavailable("quadratic")
    assert reason is None or "pip install jax jaxopt" in reason
    row = {"method": "SOBA", "family": "stochastic", "step": 0.1, "ratio": 1.0, "steps": 3,
           "final": {"value": 1.0, "grad_norm2": 1.0, "inner_distance": 1.0, "test_error": None},
           "time_to_target": None, "calls_to_target": None, "diverged": 0}
    problem = {"title": "t", "methods": [row], "target": 1.0, "plot": str(tmp_path / "p.png"),
               "skipped": {"jaxopt-implicit": "a stated reason"}}
    results = {"mode": "full", "command": "test", "wall_seconds": 0.0,
               "machine": {"cpu": "cpu", "cores": 2, "torch_threads": 1, "torch": "t",
                           "python": "p", "date_utc": "now"},
               "problems": {"quadratic": problem, "cleaning_50": {**problem, "skipped": {}}}}
    text = render(results)
    assert "Not in this table: jaxopt-implicit (a stated reason)." in text
    assert "Not in this table: jaxopt-implicit (ported for quadratic, ijcnn1, breast_cancer " \
           "only)." in text
