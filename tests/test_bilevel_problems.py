"""The bilevel suite's problems (``benchmarks/bilevel_problems.py``): each closed form or
converged reference against finite differences and autograd, and the finite-sum batches SABA's
sampler contract asks for."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bilevel_problems import quadratic_problem, rows
from benchmarks.bilevel_registry import build

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _h(pb, x, y_warm):
    return pb.f(x, pb.solve(x, y_warm), pb.outer)


def _check(pb, x, directions=2, eps=1e-5, rtol=1e-5):
    """``y*(x)`` is stationary, and ``⟨∇h, d⟩`` matches central differences of ``h``."""
    y_star = pb.solve(x, None)
    grad_y = torch.func.grad(lambda yy: pb.g(x, yy, pb.inner))(y_star)
    assert max(float(t.abs().max()) for t in grad_y.values()) < 1e-9
    grad = pb.hypergradient(x, y_star)
    gen = torch.Generator().manual_seed(0)
    for _ in range(directions):
        d = {n: torch.randn(t.shape, generator=gen, dtype=F64) for n, t in x.items()}
        plus = {n: x[n] + eps * d[n] for n in x}
        minus = {n: x[n] - eps * d[n] for n in x}
        fd = float(_h(pb, plus, y_star) - _h(pb, minus, y_star)) / (2 * eps)
        exact = sum(float((grad[n] * d[n]).sum()) for n in x)
        assert fd == pytest.approx(exact, rel=rtol, abs=1e-9), (fd, exact)


def test_quadratic_closed_forms_match_finite_differences_and_its_optimum():
    pb = quadratic_problem(dim_inner=8, dim_outer=3, n_inner=128, n_outer=64)
    gen = torch.Generator().manual_seed(1)
    x = {"x": torch.randn(3, generator=gen, dtype=F64)}
    _check(pb, x, eps=1e-3, rtol=1e-8)  # h is quadratic: central differences are exact
    grad_at_star = pb.hypergradient(pb.x_star, pb.solve(pb.x_star, None))["x"]
    assert float(grad_at_star.norm()) < 1e-12
    assert pb.info["h_hessian_min_eig"] > 0


def test_quadratic_has_the_benchmark_sizes_and_spectra():
    pb = quadratic_problem()
    assert (pb.n_inner, pb.n_outer) == (32768, 1024)
    assert pb.x0["x"].shape == (10,) and pb.y0["z"].shape == (100,)
    hess = pb.inner["a"].T @ pb.inner["a"] / pb.n_inner  # mean of the rank-one H_i
    ev = torch.linalg.eigvalsh(hess)
    assert 0.08 < float(ev[0]) and float(ev[-1]) < 1.2  # [μ, L] = [0.1, 1] up to sampling
    cross = pb.inner["u"].T @ pb.inner["w"] / pb.n_inner
    assert float(torch.linalg.matrix_norm(cross, 2)) < 0.12  # L_cross = 0.1


@pytest.mark.parametrize("name", ["breast_cancer", "ijcnn1", "digits_multilogreg",
                                  "cleaning_50"])
def test_classification_references_match_finite_differences(name):
    pb = build(name)
    gen = torch.Generator().manual_seed(2)
    x = {n: t + 0.3 * torch.randn(t.shape, generator=gen, dtype=F64) for n, t in pb.x0.items()}
    _check(pb, x)
    m = pb.metrics(x, pb.y0)
    assert 0.0 <= m["test_error"] <= 1.0 and m["inner_distance"] > 0


@pytest.mark.parametrize("name", ["breast_cancer", "cleaning_70"])
def test_losses_are_means_over_rows_that_carry_their_index(name):
    """SABA's contract: a batch's loss is the mean of its rows' losses, each read alone."""
    pb = build(name)
    index = torch.tensor([3, 0, 7, 5])
    batch = rows(pb.inner, index)
    assert torch.equal(batch["index"], index)
    x = {n: t + 0.1 for n, t in pb.x0.items()}
    y = {n: torch.full_like(t, 0.05) for n, t in pb.y0.items()}
    per_row = torch.stack([pb.g(x, y, rows(pb.inner, index[i:i + 1])) for i in range(4)])
    torch.testing.assert_close(pb.g(x, y, batch), per_row.mean(), rtol=1e-12, atol=0)


def test_cleaning_corrupts_the_stated_share_of_labels():
    from benchmarks.bilevel_classification import _digits

    clean, _, _ = _digits(0)
    for share in (0.5, 0.7, 0.9):
        noisy, _, _ = _digits(0, share)
        changed = float((noisy["t"] != clean["t"]).double().mean())
        assert changed == pytest.approx(share * 0.9, abs=0.05)  # a random class may be the same


def test_every_suite_method_runs_and_the_report_renders(tmp_path):
    """Each runner of the suite takes steps on a tiny quadratic, and a result renders."""
    from benchmarks.bilevel_methods import METHODS, make_runner
    from benchmarks.bilevel_suite import Settings, plot, render, run_method

    pb = quadratic_problem(dim_inner=4, dim_outer=2, n_inner=128, n_outer=64)
    for spec in METHODS:
        runner = make_runner(spec, pb, 0.1, 1.0, seed=0)
        for _ in range(2):
            runner.step()
        assert runner.equivalents() > 0, spec.name
        assert all(bool(torch.isfinite(t).all()) for t in runner.x.values()), spec.name
    tiny = Settings("quick", seeds=(1, 2), budget=0.05, tune_budget=0.02, evals=3)
    methods = [run_method(spec, pb, tiny) for spec in METHODS[:2]]
    problem = {"title": pb.title, "info": pb.info, "methods": methods,
               "target": methods[0]["target"], "plot": str(tmp_path / "q.png")}
    plot(problem, problem["plot"])
    results = {"mode": "quick", "command": "test", "wall_seconds": 0.0,
               "machine": {"cpu": "cpu", "cores": 2, "torch_threads": 1, "torch": "t",
                           "python": "p", "date_utc": "now"}, "problems": {"quadratic": problem}}
    text = render(results)
    assert "| SOBA |" in text and "| SABA |" in text and (tmp_path / "q.png").is_file()
