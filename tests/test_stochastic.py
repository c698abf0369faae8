"""The stochastic bilevel methods (:mod:`implicitbilevel.stochastic`): convergence on the
benchmark's quadratic, every single step against a hand transcription of the paper's update,
SABA's memory across a kill and resume, and the sampler contract.

Budgets (float64, one thread, the quadratic of ``benchmarks.bilevel_problems`` at 5 inner / 2
outer unknowns, 64 / 32 samples, ``μ = 0.5`` so that ``h`` is well conditioned): every method
reaches ``‖∇h‖² < 1e-6`` from ``x = 0, y = 0`` within the steps named in its test, with the step
rules of its paper. SOBA's decreasing steps (Theorem 1) on full batches (on minibatches its
noise floor falls as ``t^(−2/5)``, far too slowly for a unit test); SABA on minibatches of 8 with
constant steps (Theorems 2-3); stocBiO, AmIGO, F2SA and BOME on full batches, as their
deterministic analyses. BOME's constant step ``ξ`` leaves a floor: its iterates settle into a
two-cycle ``O(ξ)`` away from the optimum (the multiplier ``λ_k`` switches on and off), measured
here at ``‖∇h‖² ≈ 0.008 ξ²`` and ``0.018 ξ²`` on its two points with ``η = 20`` and ``T = 12``
inner steps (fewer inner steps add a floor of their own: ``2.7e-6`` with ``T = 8``). So its test
takes Theorem 1's ``ξ = c/√K`` with ``K = 2500`` steps, ``c = 0.35`` (``ξ = 0.007``, both points
near ``4e-7`` and ``9e-7``) and checks the last two iterates: 40,000 oracle calls, about 9 s of
CPU on this 2-core machine (a single ``1e-6`` crossing of one point takes fewer, but the other
point of the cycle stays above it).
"""

from __future__ import annotations

import pytest
import torch
from stochastic_tiny import tiny

from benchmarks.bilevel_problems import quadratic_problem, rows
from implicitbilevel.stochastic import (
    BOME,
    F2SA,
    SABA,
    SOBA,
    AmIGO,
    BilevelOracles,
    PolynomialDecay,
    StocBiO,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quad():
    return quadratic_problem(dim_inner=5, dim_outer=2, n_inner=64, n_outer=32, mu=0.5, seed=1)


def _start(pb):
    return {n: t.clone() for n, t in pb.x0.items()}, {n: t.clone() for n, t in pb.y0.items()}


def _v_star(pb, x, y_star):
    """``[∇²_zz g]⁻¹ ∇_z f`` at ``(x, y*(x))``, dense."""
    def g_flat(z):
        return pb.g(x, {"z": z}, pb.inner)

    hess = torch.autograd.functional.hessian(g_flat, y_star["z"])
    grad_f = torch.func.grad(lambda z: pb.f(x, {"z": z}, pb.outer))(y_star["z"])
    return torch.linalg.solve(hess, grad_f)


def _converged(pb, x, y, v=None, v_tol=1e-3, tol=1e-6):
    m = pb.metrics(x, y)
    assert m["grad_norm2"] < tol, m
    assert float((x["x"] - pb.x_star["x"]).norm()) < 1e-2
    if v is not None:
        v_star = _v_star(pb, x, m["y_star"])
        assert float((v - v_star).norm()) <= v_tol * float(v_star.norm())


def _minibatches(pb, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def sampler(data):
        n = int(data["index"].shape[0])
        return lambda: rows(data, torch.randperm(n, generator=gen)[:batch])

    return sampler(pb.outer), sampler(pb.inner)


# -- convergence on the quadratic ------------------------------------------------------------


def test_soba_converges_with_the_decreasing_steps_of_theorem_1(quad):
    x, y = _start(quad)
    method = SOBA.from_functions(quad.f, quad.g, x, y, **SOBA.paper_step_sizes(1.0, 2.0))
    for _ in range(300):
        info = method.step(quad.outer, quad.inner)
    _converged(quad, x, y, method.v["z"])
    assert info.v_residual < 1e-3 and info.calls["total"] == 4 * 300


def test_saba_converges_linearly_on_minibatches(quad):
    x, y = _start(quad)
    method = SABA.from_functions(quad.f, quad.g, x, y, n_inner=64, n_outer=32, lr_inner=0.3,
                                 lr_outer=0.3)
    upper, lower = _minibatches(quad, 8)
    for _ in range(250):
        method.step(upper, lower)
    _converged(quad, x, y, method.v["z"])


def test_amigo_and_stocbio_converge(quad):
    x, y = _start(quad)
    amigo = AmIGO.from_functions(quad.f, quad.g, x, y, lr_inner=1.0, lr_outer=1.0,
                                 inner_steps=5, v_steps=5)
    for _ in range(30):
        amigo.step(quad.outer, quad.inner)
    _converged(quad, x, y, amigo.v["z"], v_tol=1e-6)
    x, y = _start(quad)
    stocbio = StocBiO.from_functions(quad.f, quad.g, x, y, lr_inner=1.0, lr_outer=1.0,
                                     inner_steps=5, neumann_steps=30)
    for _ in range(30):
        stocbio.step(quad.outer, quad.inner)
    _converged(quad, x, y, stocbio.v["z"], v_tol=1e-6)


def test_f2sa_converges_as_its_multiplier_grows(quad):
    x, y = _start(quad)
    method = F2SA.from_functions(quad.f, quad.g, x, y, lr_inner=1.0, lr_outer=1.0, lam0=10.0,
                                 lam_increment=10.0, inner_steps=5)
    for _ in range(200):
        info = method.step(quad.outer, quad.inner)
    assert info.extra["lam"] == pytest.approx(10.0 + 10.0 * 199)
    _converged(quad, x, y, method.implied_v["z"], v_tol=2e-3)  # λ(z − y) = v* + O(1/λ)
    assert method.counts.hvp == 0 and method.counts.cross == 0


def test_bome_converges_with_steps_of_order_one_over_root_k(quad):
    steps = 2500
    x, y = _start(quad)
    method = BOME.from_functions(quad.f, quad.g, x, y, lr_inner=1.0,
                                 lr_outer=0.35 / steps ** 0.5, eta=20.0, inner_steps=12)
    for _ in range(steps - 1):
        method.step(quad.outer, quad.inner)
    before_last = quad.metrics(x, y)["grad_norm2"]
    method.step(quad.outer, quad.inner)
    # both points of the two-cycle it settles into: see the module docstring
    assert before_last < 1e-6
    _converged(quad, x, y)
    assert method.counts.hvp == 0 and method.counts.cross == 0


# -- checkpoints -------------------------------------------------------------------------------


def _batches(seed, steps):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randperm(5, generator=gen)[:2], torch.randperm(6, generator=gen)[:3])
            for _ in range(steps)]


@pytest.mark.parametrize("cls, hyper", [
    (SABA, {"n_inner": 6, "n_outer": 5}), (SOBA, {}), (F2SA, {"inner_steps": 2}),
    (StocBiO, {"inner_steps": 2, "neumann_steps": 2}), (AmIGO, {"inner_steps": 2}),
    (BOME, {"inner_steps": 2})])
def test_kill_and_resume_continues_exactly(cls, hyper):
    """Run 6 steps straight; run 3, save, rebuild from scratch, load, run 3 more: equal to the
    bit, SABA's per-sample memory included."""
    f, g, x, y, _, inner, outer = tiny()
    batches = _batches(0, 6)
    steps = dict(lr_inner=PolynomialDecay(0.3, 0.4), lr_outer=0.2, **hyper)

    def fresh():
        return cls.from_functions(f, g, {n: t.clone() for n, t in x.items()},
                                  {n: t.clone() for n, t in y.items()}, **steps)

    straight = fresh()
    for i_out, i_in in batches:
        straight.step(rows(outer, i_out), rows(inner, i_in))
    first = fresh()
    for i_out, i_in in batches[:3]:
        first.step(rows(outer, i_out), rows(inner, i_in))
    saved = first.state_dict()
    del first  # killed
    resumed = fresh()
    resumed.load_state_dict(saved)
    for i_out, i_in in batches[3:]:
        resumed.step(rows(outer, i_out), rows(inner, i_in))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a["t"] == b["t"] == 6 and a["counts"] == b["counts"]
    for key in ("upper", "lower", "v", "penalty"):
        if a.get(key) is not None:
            for n in a[key]:
                assert torch.equal(a[key][n], b[key][n]), (key, n)
    if cls is SABA:
        for k, mem in a["memory"].items():
            for n in mem["table"]:
                assert torch.equal(mem["table"][n], b["memory"][k]["table"][n])
                assert torch.equal(mem["mean"][n], b["memory"][k]["mean"][n])
        with pytest.raises(ValueError, match="cannot be loaded"):
            SOBA.from_functions(f, g, x, y, lr_inner=0.1, lr_outer=0.1).load_state_dict(a)


# -- SABA's sampler contract ---------------------------------------------------------------------


def _saba():
    f, g, x, y, _, inner, outer = tiny()
    return SABA.from_functions(f, g, x, y, n_inner=6, n_outer=5, lr_inner=0.1,
                               lr_outer=0.1), f, g, x, y, inner, outer


@pytest.mark.parametrize("index, error, match", [
    (torch.tensor([0, 0, 1]), ValueError, "repeats a sample index"),
    (torch.tensor([0, 6]), ValueError, r"must lie in \[0, 6\)"),
    (torch.tensor([0.0, 1.0]), TypeError, "1-D integer tensor")])
def test_saba_refuses_batches_that_break_the_sampler_contract(index, error, match):
    method, *_, inner, outer = _saba()
    batch = {k: t[:len(index)] for k, t in inner.items()}
    batch["index"] = index
    with pytest.raises(error, match=match):
        method.step(rows(outer, torch.tensor([0, 1])), batch)
    with pytest.raises(TypeError, match="'index' entry"):
        method.step(rows(outer, torch.tensor([0, 1])), {"a": inner["a"], "t": inner["t"]})


def test_saba_refuses_a_loss_that_is_not_a_mean_over_rows():
    _, f, g, x, y, inner, outer = _saba()

    def summed(xx, yy, b):  # a sum over the rows: a row's term is not the sample's
        return g(xx, yy, b) * len(b["t"])

    method = SABA.from_functions(f, summed, x, y, n_inner=6, n_outer=5, lr_inner=0.1,
                                 lr_outer=0.1)
    with pytest.raises(ValueError, match="not the mean of its rows"):
        method.step(rows(outer, torch.tensor([0, 1])), rows(inner, torch.tensor([0, 1, 2])))


def test_per_row_oracles_fall_back_to_a_loop_with_the_same_values():
    f, g, x, y, v, inner, outer = tiny()

    def g_host(xx, yy, b):  # .item() has no batching rule: vmap fails, the loop does not
        return g(xx, yy, b) * (1.0 + 0.0 * float(b["t"].sum().item()))

    vec = BilevelOracles.from_functions(f, g).per_sample(x, y, {"z": v}, inner, outer)
    with pytest.warns(RuntimeWarning, match="could not be vectorised"):
        loop = BilevelOracles.from_functions(f, g_host).per_sample(x, y, {"z": v}, inner, outer)
    for k in vec:
        for n in vec[k]:
            torch.testing.assert_close(vec[k][n], loop[k][n], rtol=0, atol=1e-13)


def test_step_info_and_oracle_counts():
    f, g, x, y, _, inner, outer = tiny()
    gen = torch.Generator().manual_seed(0)
    sampler = lambda: rows(inner, torch.randperm(6, generator=gen)[:3])  # noqa: E731
    method = StocBiO.from_functions(f, g, x, y, lr_inner=0.1, lr_outer=0.1, inner_steps=3,
                                    neumann_steps=4)
    info = method.step(outer, sampler)  # a sampler: a fresh batch per use
    assert info.calls == {"grad_inner": 3, "grad_outer": 1, "hvp": 4, "cross": 1, "total": 9}
    assert info.t == 0 and info.inner_grad_norm > 0 and info.v_residual > 0
    assert info.lr_inner == info.lr_outer == 0.1 and method.t == 1
