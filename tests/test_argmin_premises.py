"""The library refuses, or says so, where a call's premise fails (no silent wrong answer).

Each case gave a wrong number without a word before: a non-stationary ``y`` handed to ``argmin``, a
second-order use of its first-order backward, an M-FAC solver with nothing to observe, a kept
curvature operator reused at another point, M-FAC settings other solvers refuse, a Gauss–Newton
split of another loss, a resume under changed settings, and non-finite numbers in the run log.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from implicitbilevel import (
    CG,
    MFAC,
    BilevelProblem,
    Dense,
    GaussNewton,
    ImplicitJacobian,
    ProximalL2,
    argmin,
)
from implicitbilevel.bissl import BiSSLConfig, BiSSLTrainer, bissl_upper_loss

F64 = torch.float64


def _ridge(seed: int = 0):
    """The README's ridge example: g(w, λ) = ½ mean((Xw − t)²) + ½ e^{log λ} ‖w‖²."""
    g = torch.Generator().manual_seed(seed)
    X, t = torch.randn(50, 5, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    Xv, tv = torch.randn(20, 5, generator=g, dtype=F64), torch.randn(20, generator=g, dtype=F64)

    def inner(y, x):
        return (0.5 * ((X @ y["w"] - t) ** 2).mean()
                + 0.5 * x["log_lam"].exp() * (y["w"] ** 2).sum())

    def solve(log_lam):
        return torch.linalg.solve(X.T @ X / 50 + log_lam.exp() * torch.eye(5, dtype=F64),
                                  X.T @ t / 50)

    def outer(w):
        return 0.5 * ((Xv @ w - tv) ** 2).mean()

    return inner, solve, outer


def _hypergradient(w0, **kwargs):
    inner, _, outer = _ridge()
    x = {"log_lam": torch.zeros((), dtype=F64, requires_grad=True)}
    y = argmin(inner, {"w": w0}, x, ij=ImplicitJacobian(Dense()), **kwargs)
    outer(y["w"]).backward()
    return x["log_lam"].grad


def test_a_stationary_point_passes_without_a_word():
    _, solve, _ = _ridge()
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _hypergradient(solve(torch.zeros((), dtype=F64)), on_solve=records.append)
    assert records[0].stationarity.relative < 1e-10


def test_a_point_that_is_not_stationary_is_named():
    inner, solve, outer = _ridge()
    exact = _hypergradient(solve(torch.zeros((), dtype=F64)), on_nonstationary="ignore")
    records = []
    with pytest.warns(RuntimeWarning, match=r"y is not a stationary point of g: ‖∇_y g‖ = "):
        wrong = _hypergradient(torch.zeros(5, dtype=F64), on_solve=records.append)
    assert not torch.allclose(wrong, exact, rtol=0.1)  # the answer it warns about is wrong
    found = records[0].stationarity
    # The Cauchy step of a quadratic from w = 0 against the exact distance ‖w*‖ (same order).
    w_star = float(solve(torch.zeros((), dtype=F64)).norm())
    assert found.relative > 1e-4 and 0.1 * w_star < found.step <= w_star * 1.0000001
    with pytest.raises(ValueError, match="not a stationary point"):
        _hypergradient(torch.zeros(5, dtype=F64), on_nonstationary="raise")


def _feature_ridge(seed: int = 0):
    """Ridge with one penalty per feature, g(w, a) = ½ mean((Xw − t)²) + ½ Σ e^{a_j} w_j²: a
    hypergradient that is not linear in a, with a closed-form inner solution to differentiate
    through as the reference."""
    g = torch.Generator().manual_seed(seed)
    X, t = torch.randn(50, 5, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    Xv, tv = torch.randn(20, 5, generator=g, dtype=F64), torch.randn(20, generator=g, dtype=F64)

    def inner(y, x):
        return 0.5 * ((X @ y["w"] - t) ** 2).mean() + 0.5 * (x["a"].exp() * y["w"] ** 2).sum()

    def solve(a):
        return torch.linalg.solve(X.T @ X / 50 + torch.diag(a.exp()), X.T @ t / 50)

    def outer(w):
        return 0.5 * ((Xv @ w - tv) ** 2).mean()

    return inner, solve, outer


def _gradient(a0, create_graph, ij=None):
    inner, solve, outer = _feature_ridge()
    a = a0.clone().requires_grad_(True)
    y = argmin(inner, {"w": solve(a.detach())}, {"a": a}, ij=ij or ImplicitJacobian(Dense()))
    (grad,) = torch.autograd.grad(outer(y["w"]), [a], create_graph=create_graph)
    return a, grad


def test_second_derivatives_match_differentiating_the_closed_form():
    inner, solve, outer = _feature_ridge()
    a0 = 0.3 * torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=F64)
    a, grad = _gradient(a0, create_graph=True)
    rows = [torch.autograd.grad(grad[i], [a], retain_graph=True)[0] for i in range(5)]
    hessian = torch.stack(rows)
    reference = torch.autograd.functional.hessian(lambda a_: outer(solve(a_)), a0)
    assert float((hessian - reference).norm() / reference.norm()) < 1e-10


def test_a_gradient_penalty_matches_finite_differences():
    # P(a) = ‖dF/da‖²: its gradient needs every second-order term of the implicit function
    # theorem (y*(a), the solve and the explicit a), which a first-order backward drops.
    inner, solve, outer = _feature_ridge()
    a0 = 0.3 * torch.randn(5, generator=torch.Generator().manual_seed(2), dtype=F64)
    a, grad = _gradient(a0, create_graph=True)
    (penalty_grad,) = torch.autograd.grad((grad ** 2).sum(), [a])

    def penalty(a_):
        return float((_gradient(a_, create_graph=False)[1] ** 2).sum())

    eps = 1e-6
    finite = torch.tensor([(penalty(a0 + eps * e) - penalty(a0 - eps * e)) / (2 * eps)
                           for e in torch.eye(5, dtype=F64)], dtype=F64)
    assert float((penalty_grad - finite).norm() / finite.norm()) < 1e-6


def test_a_third_derivative_and_gauss_newton_second_order_are_refused():
    a0 = torch.zeros(5, dtype=F64)
    a, grad = _gradient(a0, create_graph=True)
    with pytest.raises(RuntimeError, match="third time"):  # a differentiable second derivative
        torch.autograd.grad(grad.sum(), [a], create_graph=True)
    inner, solve, outer = _feature_ridge()
    split = GaussNewton(lambda y, x: y["w"], lambda z, x: inner({"w": z}, x))
    with pytest.raises(RuntimeError, match="need the exact Hessian"):
        _gradient(a0, create_graph=True, ij=ImplicitJacobian(Dense(), curvature=split))


def test_argmin_refuses_a_solver_that_needs_observed_gradients():
    inner, solve, _ = _ridge()
    x = {"log_lam": torch.zeros((), dtype=F64, requires_grad=True)}
    with pytest.raises(ValueError, match="argmin cannot use MFAC"):
        argmin(inner, {"w": solve(x["log_lam"].detach())}, x, ij=ImplicitJacobian(MFAC()))


@pytest.mark.parametrize("settings, error", [
    ({"tol": math.inf}, ValueError), ({"tol": "1e-3"}, ValueError),
    ({"tol": -1.0}, ValueError), ({"measure_residual": "no"}, TypeError),
])
def test_mfac_settings_are_checked_as_the_other_solvers_do(settings, error):
    with pytest.raises(error):
        MFAC(**settings)


def _problem(**ij):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 4, generator=g, dtype=F64)
    q = q @ q.T / 4 + torch.eye(4, dtype=F64)
    a = torch.randn(6, 4, generator=g, dtype=F64)

    def pretext(p, batch):
        return 0.5 * p["th"] @ q @ p["th"] + torch.nn.functional.softplus(a @ p["th"]).sum()

    def downstream(p, batch):
        return (torch.tanh(a @ p["th"]) * p["s"]).pow(2).mean()

    problem = BilevelProblem(bissl_upper_loss(downstream, ["th"]), pretext, lam=0.5,
                             regularizer=ProximalL2(["th"]),
                             ij=ImplicitJacobian(CG(max_iter=20, tol=1e-12), damping=1.0, **ij))
    upper = {"th": torch.randn(4, generator=g, dtype=F64).requires_grad_(),
             "s": torch.ones(1, dtype=F64, requires_grad=True)}
    lower = {"th": torch.randn(4, generator=g, dtype=F64).requires_grad_()}
    return problem, upper, lower, (q, a)


def test_a_kept_operator_refuses_another_point():
    problem, upper, lower, _ = _problem()
    hessian = problem.lower_hessian(upper, lower, None)
    same = {"th": lower["th"].detach().clone()}  # other tensors, equal values: fine
    problem.upper_grad(upper, same, None, lower_hessian=hessian)
    other = {"th": lower["th"].detach() + 0.1}
    with pytest.raises(RuntimeError, match="differs from the values given"):
        problem.upper_grad(upper, other, None, lower_hessian=hessian)
    lower["th"].data.add_(0.1)  # through .data: the version counter does not move
    with pytest.raises(RuntimeError, match=r"modified after it was built \(e.g. through .data\)"):
        problem.upper_grad(upper, lower, None, lower_hessian=hessian)


def test_a_gauss_newton_split_of_another_loss_is_refused():
    problem, upper, lower, (q, a) = _problem()

    def outputs(p, batch):
        return a @ p["th"]

    def softplus_sum(z, batch):
        return torch.nn.functional.softplus(z).sum()

    wrong = GaussNewton(outputs, softplus_sum)  # misses the quadratic term of the pretext loss
    bad, upper, lower, _ = _problem(curvature=wrong)
    with pytest.raises(ValueError, match="the GaussNewton split is not the lower loss"):
        bad.lower_hessian(upper, lower, None)

    def pretext_outputs(p, batch):
        return torch.cat([a @ p["th"], (q @ p["th"] * p["th"]).sum(0, keepdim=True)])

    def pretext_output_loss(z, batch):
        return torch.nn.functional.softplus(z[:-1]).sum() + 0.5 * z[-1]

    right = GaussNewton(pretext_outputs, pretext_output_loss)
    good, upper, lower, _ = _problem(curvature=right)
    good.upper_grad(upper, lower, None, None)  # composes to the pretext loss: accepted


def _trainer(tmp_path, lam=0.5, solver=None, alternations=2):
    problem, upper, lower, _ = _problem()
    problem = BilevelProblem(problem.upper_loss, problem.lower_loss, lam=lam,
                             regularizer=problem.regularizer,
                             ij=ImplicitJacobian(solver or CG(max_iter=5), damping=1.0,
                                                 reuse_graph=not isinstance(solver, MFAC)))
    data = torch.utils.data.TensorDataset(torch.zeros(4, 1, dtype=F64))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    return BiSSLTrainer(problem, upper, lower, torch.optim.SGD(list(upper.values()), lr=0.01),
                        torch.optim.SGD(list(lower.values()), lr=0.01), loader, loader,
                        BiSSLConfig(alternations=alternations, lower_steps=2, upper_steps=2,
                                    progress=False), out_dir=tmp_path)


def test_the_trainer_resume_names_a_changed_lambda(tmp_path):
    _trainer(tmp_path, alternations=1).run()
    with pytest.raises(ValueError, match=r"lam: 'ConstantSchedule\(value=0.5\)' -> "):
        _trainer(tmp_path, lam=0.25).run(resume=True)
    history = _trainer(tmp_path).run(resume=True, allow_changed_config=True)
    assert history[1]["changed_config"] == {"alternations": [1, 2]}


def test_the_run_log_is_strict_json(tmp_path):
    # M-FAC measures no residual by default: NaN in memory, null on disk.
    history = _trainer(tmp_path, solver=MFAC(m=3)).run()
    assert math.isnan(history[0]["solver_relative_residual"])

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert records[0]["solver_relative_residual"] is None and len(records) == 2
