"""BilevelProblem hypergradients against independent references.

- Quadratic BiSSL problems (hypothesis over dimensions, λ, λ_damp, dtype): every IJ strategy against
  the closed form ``(I + Q_θθ/μ)⁻¹ v + ∇L^D(θ_D)`` (Prop. 4.2, Algorithm 3), the concatenated head
  against the dense block solve of eq. 5.14, Neumann against its own truncated sum.
- A small tanh network whose lower level is solved to stationarity by Newton's method: the
  hypergradient against Theorem 3.2 evaluated with dense Hessians from
  ``torch.autograd.functional.hessian``, and against finite differences of ``F``.
- Learnable λ (eq. 5.6, λ_damp = 0) against central finite differences through the exact solve,
  and with the implicit-Jacobian damping and the λ-gradient damping set apart, against the closed
  form of eq. 5.6 on a linear-quadratic problem.
- The general regulariser path against the proximal fast path and the ridge closed form.
- Every error the API promises.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicitbilevel import (
    CG,
    MINRES,
    BilevelProblem,
    CosineDecay,
    Dense,
    HVPModeError,
    ImplicitJacobian,
    LearnableLambda,
    Neumann,
    NonFiniteError,
    ProximalL2,
    Regularizer,
    SolverBreakdownError,
)
from implicitbilevel.bissl import bissl_upper_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

# -- a quadratic BiSSL problem with a closed-form hypergradient ---------------------------------


def _quadratic(seed: int, dim: int, head: int, out: int, dtype: torch.dtype, indefinite: float = 0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    m = rand(dim + head, dim + head)
    q = m @ m.T / (dim + head) + 0.1 * torch.eye(dim + head, dtype=dtype)
    q = q - indefinite * torch.eye(dim + head, dtype=dtype)
    c = rand(dim + head)
    b_mat, c_mat, a = rand(out, dim), rand(out, 2), rand(out)

    def pretext_loss(p, batch):
        w = torch.cat([p["th"], p["head_p"]]) if head else p["th"]
        return 0.5 * w @ q @ w + c @ w

    def downstream_loss(p, batch):
        r = b_mat @ torch.tanh(p["th"]) + c_mat @ p["phi"] - a
        return 0.5 * (r**2).sum()

    upper = {"th": rand(dim), "phi": rand(2)}
    lower = {"th": rand(dim)}
    if head:
        lower["head_p"] = rand(head)
    return q, pretext_loss, downstream_loss, upper, lower


def _grad(fn, params, name):
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    return torch.autograd.grad(fn(leaves, None), leaves[name])[0]


def _closed_form(q, dim, downstream_loss, upper, lower, mu, concat):
    """``dF/dθ_D`` by eq. 4.9 (fixed head) or Cor. 5.6 (concatenated head), densely."""
    v = _grad(downstream_loss, {"th": lower["th"], "phi": upper["phi"]}, "th")
    n = q.shape[0]
    if concat:
        a = q / mu
        a[:dim, :dim] += torch.eye(dim, dtype=q.dtype)
        rhs = torch.cat([v, torch.zeros(n - dim, dtype=q.dtype)])
        ij = torch.linalg.solve(a, rhs)[:dim]
    else:
        a = torch.eye(dim, dtype=q.dtype) + q[:dim, :dim] / mu
        ij = torch.linalg.solve(a, v)
    return ij + _grad(downstream_loss, upper, "th")


def _tol(dtype):
    return 1e-8 if dtype == torch.float64 else 2e-3


problem_cases = dict(
    seed=st.integers(0, 10_000),
    dim=st.integers(1, 8),
    head=st.integers(1, 3),
    lam=st.floats(1e-3, 10.0),
    damping=st.sampled_from([0.0, 0.5, 10.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)


@settings(max_examples=25, deadline=None)
@given(**problem_cases)
def test_strategies_match_closed_form(seed, dim, head, lam, damping, dtype):
    q, pre, down, upper, lower = _quadratic(seed, dim, head, 4, dtype)
    mu = lam + damping
    expected = _closed_form(q, dim, down, upper, lower, mu, concat=False)
    expected_concat = _closed_form(q, dim, down, upper, lower, mu, concat=True)
    strategies = {
        "cg": (CG(max_iter=4 * (dim + head) + 20, tol=1e-12), expected),
        "dense": (Dense(), expected),
        "concat": (CG(max_iter=8 * (dim + head) + 40, tol=1e-12), expected_concat),
        "concat-minres": (MINRES(max_iter=8 * (dim + head) + 40, tol=1e-12), expected_concat),
        "concat-dense": (Dense(), expected_concat),
    }
    for name, (ij, reference) in strategies.items():
        over = "all" if name.startswith("concat") else "coupled"
        problem = BilevelProblem(bissl_upper_loss(down, ["th"]), pre, lam=lam,
                                 regularizer=ProximalL2(["th"]),
                                 ij=ImplicitJacobian(ij, damping=damping, solve_over=over))
        out = problem.upper_grad(upper, lower, None, None)
        err = (out.grads["th"] - reference).norm() / reference.norm()
        assert err < _tol(dtype) * (10 if name.startswith("concat") else 1), (name, float(err))
        phi_ref = _grad(down, {"th": lower["th"], "phi": upper["phi"]}, "phi") + _grad(
            down, upper, "phi")
        assert torch.allclose(out.grads["phi"], phi_ref, rtol=_tol(dtype), atol=_tol(dtype))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), dim=st.integers(1, 8), lam=st.floats(1e-2, 10.0),
       steps=st.integers(0, 12))
def test_neumann_matches_its_truncated_series(seed, dim, lam, steps):
    q, pre, down, upper, lower = _quadratic(seed, dim, 1, 3, torch.float64)
    mu = lam + 10.0
    a = torch.eye(dim, dtype=torch.float64) + q[:dim, :dim] / mu
    alpha = 1.0 / float(torch.linalg.eigvalsh(a).max())
    v = _grad(down, {"th": lower["th"], "phi": upper["phi"]}, "th")
    step = torch.eye(dim, dtype=torch.float64) - alpha * a
    series = sum(torch.linalg.matrix_power(step, k) @ v for k in range(steps + 1))
    expected = alpha * series + _grad(down, upper, "th")
    problem = BilevelProblem(bissl_upper_loss(down, ["th"]), pre, lam=lam,
                             regularizer=ProximalL2(["th"]),
                             ij=ImplicitJacobian(Neumann(max_iter=steps, alpha=alpha),
                                                 damping=10.0))
    out = problem.upper_grad(upper, lower, None, None)
    assert torch.allclose(out.grads["th"], expected, rtol=1e-10, atol=1e-12)
    assert out.info.iterations == steps


def test_concatenated_head_reduces_to_plain_cg_for_a_decoupled_head():
    # With ∇²_θφ L^P = 0 the block system decouples and its θ block is the fixed-head system
    # (the sanity check after eq. 5.14).
    dim, head = 5, 3
    q, pre, down, upper, lower = _quadratic(3, dim, head, 4, torch.float64)
    q[:dim, dim:] = 0
    q[dim:, :dim] = 0
    plain = BilevelProblem(bissl_upper_loss(down, ["th"]), pre, lam=0.1,
                           regularizer=ProximalL2(["th"]),
                           ij=ImplicitJacobian(CG(max_iter=50, tol=1e-13), damping=1.0))
    concat = BilevelProblem(bissl_upper_loss(down, ["th"]), pre, lam=0.1,
                            regularizer=ProximalL2(["th"]),
                            ij=ImplicitJacobian(CG(max_iter=50, tol=1e-13), damping=1.0,
                                                solve_over="all"))
    g_plain = plain.upper_grad(upper, lower, None, None)
    g_concat = concat.upper_grad(upper, lower, None, None)
    assert torch.allclose(g_plain.grads["th"], g_concat.grads["th"], rtol=1e-10, atol=1e-12)
    assert set(g_concat.u) == {"th", "head_p"}
    assert set(g_plain.u) == {"th"}


def test_concatenated_head_indefinite_head_block_cg_breaks_minres_solves():
    dim, head = 4, 2
    q, pre, down, upper, lower = _quadratic(7, dim, head, 3, torch.float64)
    q[dim:, dim:] = -torch.eye(head, dtype=torch.float64)  # H_φφ indefinite
    mu = 0.1
    cg = BilevelProblem(bissl_upper_loss(down, ["th"]), pre, lam=mu,
                        regularizer=ProximalL2(["th"]),
                        ij=ImplicitJacobian(CG(max_iter=30), damping=0.0, solve_over="all"))
    with pytest.raises(SolverBreakdownError, match="non-positive curvature") as info:
        cg.upper_grad(upper, lower, None, None)
    assert info.value.info.breakdown is not None
    # MINRES is the default over all lower variables and solves the indefinite system exactly.
    minres = BilevelProblem(bissl_upper_loss(down, ["th"]), pre, lam=mu,
                            regularizer=ProximalL2(["th"]),
                            ij=ImplicitJacobian(damping=0.0, solve_over="all"))
    minres.solver.max_iter, minres.solver.tol = 40, 1e-13
    assert type(minres.solver).__name__ == "MINRES"
    expected = _closed_form(q, dim, down, upper, lower, mu, concat=True)
    out = minres.upper_grad(upper, lower, None, None)
    assert out.info.breakdown is None
    assert (out.grads["th"] - expected).norm() / expected.norm() < 1e-9


def test_head_damping_adds_a_ridge_on_the_head_block():
    dim, head, eps = 4, 2, 0.7
    q, pre, down, upper, lower = _quadratic(11, dim, head, 3, torch.float64)
    mu = 0.3
    problem = BilevelProblem(bissl_upper_loss(down, ["th"]), pre, lam=mu,
                             regularizer=ProximalL2(["th"]),
                             ij=ImplicitJacobian(CG(max_iter=60, tol=1e-13), damping=0.0,
                                                 solve_over="all", head_damping=eps))
    a = q / mu
    a[:dim, :dim] += torch.eye(dim, dtype=torch.float64)
    a[dim:, dim:] += eps * torch.eye(head, dtype=torch.float64)
    v = _grad(down, {"th": lower["th"], "phi": upper["phi"]}, "th")
    ij = torch.linalg.solve(a, torch.cat([v, torch.zeros(head, dtype=torch.float64)]))[:dim]
    expected = ij + _grad(down, upper, "th")
    out = problem.upper_grad(upper, lower, None, None)
    assert torch.allclose(out.grads["th"], expected, rtol=1e-9)


# -- a non-quadratic network solved to stationarity ----------------------------------------------


class _TanhNet:
    """Lower: softplus/tanh regression net ``ℓ(θ, φ_P)``; upper: a tanh-feature classifier loss."""

    def __init__(self, seed: int = 0, hidden: int = 3, features: int = 3):
        g = torch.Generator().manual_seed(seed)
        d = torch.float64
        self.x_p = torch.randn(24, features, generator=g, dtype=d)
        self.t_p = torch.randn(24, 2, generator=g, dtype=d)
        self.x_d = torch.randn(16, features, generator=g, dtype=d)
        self.y_d = torch.randint(0, 2, (16,), generator=g)
        self.upper = {
            "w": 0.5 * torch.randn(hidden, features, generator=g, dtype=d),
            "head_d": 0.5 * torch.randn(2, hidden, generator=g, dtype=d),
        }
        self.lower = {
            "w": self.upper["w"].clone(),
            "head_p": 0.5 * torch.randn(2, hidden, generator=g, dtype=d),
        }

    def pretext(self, p, batch=None):
        h = torch.nn.functional.softplus(self.x_p @ p["w"].T)
        return 0.5 * ((h @ p["head_p"].T - self.t_p) ** 2).mean()

    def downstream(self, p, batch=None):
        logits = torch.tanh(self.x_d @ p["w"].T) @ p["head_d"].T
        return torch.nn.functional.cross_entropy(logits, self.y_d)

    def lower_solution(self, w_d, lam, w0, head_p):
        """Newton's method on ``G(θ) = ℓ(θ, φ_P) + λ/2 ‖θ − θ_D‖²`` over θ (head fixed)."""
        shape = w0.shape

        def g_obj(flat):
            w = flat.view(shape)
            return self.pretext({"w": w, "head_p": head_p}) + 0.5 * lam * ((w - w_d) ** 2).sum()

        flat = w0.reshape(-1).clone()
        for _ in range(40):
            grad = torch.autograd.functional.jacobian(g_obj, flat)
            if grad.norm() < 1e-12:
                break
            hess = torch.autograd.functional.hessian(g_obj, flat)
            flat = flat - torch.linalg.solve(hess, grad)
        return flat.view(shape)

    def problem(self, lam, solver, damping=0.0, **kwargs):
        """The problem with ``ij=ImplicitJacobian(solver, damping=damping, **kwargs)``."""
        return BilevelProblem(bissl_upper_loss(self.downstream, ["w"]), self.pretext, lam=lam,
                              regularizer=ProximalL2(["w"]),
                              ij=ImplicitJacobian(solver, damping=damping, **kwargs))


def _dense_hypergradient(net: _TanhNet, lam: float, mu: float) -> torch.Tensor:
    """Theorem 3.2 literally: ∇_x f − ∇²_xy G [∇²_yy G]⁻¹ ∇_y f (G's λ replaced by μ in the IJ)."""
    w_d, w_p = net.upper["w"], net.lower["w"]
    shape, n = w_d.shape, w_d.numel()

    def g_joint(flat):
        wd, wp = flat[:n].view(shape), flat[n:].view(shape)
        return (net.pretext({"w": wp, "head_p": net.lower["head_p"]})
                + 0.5 * mu * ((wd - wp) ** 2).sum())

    hess = torch.autograd.functional.hessian(g_joint, torch.cat([w_d.reshape(-1), w_p.reshape(-1)]))
    h_xy, h_yy = hess[:n, n:], hess[n:, n:]
    f_y = _grad(net.downstream, {"w": w_p, "head_d": net.upper["head_d"]}, "w").reshape(-1)
    f_x = _grad(net.downstream, net.upper, "w").reshape(-1)
    return (f_x - h_xy @ torch.linalg.solve(h_yy, f_y)).view(shape)


@pytest.mark.parametrize("damping", [0.0, 10.0])
@pytest.mark.parametrize("reuse_graph", [True, False])
def test_network_hypergradient_matches_dense_theorem(damping, reuse_graph):
    net = _TanhNet(seed=1)
    lam = 0.5
    net.lower["w"] = net.lower_solution(net.upper["w"], lam, net.lower["w"], net.lower["head_p"])
    expected = _dense_hypergradient(net, lam, lam + damping)
    n = net.upper["w"].numel()
    solvers = [CG(max_iter=4 * n, tol=1e-13), Dense()]
    if reuse_graph:  # a long series; one product through the kept graph is cheap
        solvers.append(Neumann(max_iter=400, alpha=0.9))
    for ij in solvers:
        problem = net.problem(lam, ij, damping=damping, reuse_graph=reuse_graph)
        out = problem.upper_grad(net.upper, net.lower, None, None)
        err = float((out.grads["w"] - expected).norm() / expected.norm())
        assert err < 1e-6, (type(ij).__name__, err)


def test_network_hypergradient_matches_finite_differences():
    net = _TanhNet(seed=2)
    lam = 0.8
    head_p = net.lower["head_p"]
    net.lower["w"] = net.lower_solution(net.upper["w"], lam, net.lower["w"], head_p)
    problem = net.problem(lam, CG(max_iter=50, tol=1e-13))
    grad = problem.upper_grad(net.upper, net.lower, None, None).grads["w"]

    def total(w_d):
        w_p = net.lower_solution(w_d, lam, net.lower["w"], head_p)
        return (net.downstream({"w": w_p, "head_d": net.upper["head_d"]})
                + net.downstream({"w": w_d, "head_d": net.upper["head_d"]}))

    eps = 1e-6
    fd = torch.zeros_like(grad)
    for idx in range(grad.numel()):
        e = torch.zeros(grad.numel(), dtype=grad.dtype)
        e[idx] = eps
        e = e.view_as(grad)
        fd.view(-1)[idx] = (total(net.upper["w"] + e) - total(net.upper["w"] - e)) / (2 * eps)
    assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("lam0", [0.05, 0.7, 3.0])
def test_learnable_lambda_gradient_matches_finite_differences(lam0):
    # eq. 5.6 with λ_damp = 0 against dF/dρ through the exactly solved lower level.
    net = _TanhNet(seed=4)
    head_p = net.lower["head_p"]
    learnable = LearnableLambda(lam0, dtype=torch.float64)
    rho = float(learnable.rho.detach())

    def total(rho_value):
        lam = math.log1p(math.exp(rho_value))
        w_p = net.lower_solution(net.upper["w"], lam, net.lower["w"], head_p)
        return net.downstream({"w": w_p, "head_d": net.upper["head_d"]})

    net.lower["w"] = net.lower_solution(net.upper["w"], lam0, net.lower["w"], head_p)
    problem = net.problem(learnable, CG(max_iter=60, tol=1e-13))
    out = problem.upper_grad(net.upper, net.lower, None, None)
    eps = 1e-5
    fd = (total(rho + eps) - total(rho - eps)) / (2 * eps)
    assert out.lam_grad is not None
    assert float(out.lam_grad) == pytest.approx(float(fd), rel=1e-6, abs=1e-10)


def test_learnable_lambda_damped_formula():
    # eq. 5.6: σ'(ρ)/(σ(ρ)+λ_damp) · ⟨θ_D − θ_P, u⟩ with u the θ_D part of the hypergradient.
    net = _TanhNet(seed=5)
    learnable = LearnableLambda(0.2, dtype=torch.float64)
    problem = net.problem(learnable, CG(max_iter=60, tol=1e-13), damping=10.0)
    out = problem.upper_grad(net.upper, net.lower, None, None)
    rho = learnable.rho.detach()
    sigma, dsigma = torch.nn.functional.softplus(rho), torch.sigmoid(rho)
    u = out.u["w"]
    expected = dsigma / (sigma + 10.0) * ((net.upper["w"] - net.lower["w"]) * u).sum()
    assert float(out.lam_grad) == pytest.approx(float(expected), rel=1e-10)


def _linear_quadratic(seed: int, n: int = 5, k: int = 3):
    """Lower ``½θᵀQθ + cᵀθ``, upper ``½‖Bθ + b − a‖²``: every quantity has a closed form."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    m = torch.randn(n, n, generator=g, dtype=d)
    q = m @ m.T / n + 0.2 * torch.eye(n, dtype=d)
    c, b_mat, a = (torch.randn(n, generator=g, dtype=d), torch.randn(k, n, generator=g, dtype=d),
                   torch.randn(k, generator=g, dtype=d))

    def pretext(p, batch):
        return 0.5 * p["th"] @ q @ p["th"] + c @ p["th"]

    def downstream(p, batch):
        return 0.5 * ((b_mat @ p["th"] + p["bias"] - a) ** 2).sum()

    upper = {"th": torch.randn(n, generator=g, dtype=d),
             "bias": torch.randn(k, generator=g, dtype=d)}
    return q, c, b_mat, a, pretext, downstream, upper


@pytest.mark.parametrize("damping,lam_damping", [(10.0, 0.0), (10.0, 3.0), (0.0, 2.5), (0.5, 7.0),
                                                 (4.0, None)])
def test_learnable_lambda_separate_damping_matches_eq_5_6(damping, lam_damping):
    # eq. 5.6 with the implicit Jacobian damped by λ_damp and the prefactor by λ_damp^ρ:
    # dF/dρ = σ'(ρ)/(σ(ρ) + λ_damp^ρ) ⟨θ_D − θ_P, (I + Q/(σ(ρ) + λ_damp))⁻¹ Bᵀ(Bθ_P + b − a)⟩.
    q, c, b_mat, a, pretext, downstream, upper = _linear_quadratic(seed=11)
    n = q.shape[0]
    lower = {"th": upper["th"] + torch.randn(n, generator=torch.Generator().manual_seed(3),
                                             dtype=torch.float64)}
    learnable = LearnableLambda(0.3, dtype=torch.float64, damping=lam_damping)
    problem = BilevelProblem(bissl_upper_loss(downstream, ["th"]), pretext, lam=learnable,
                             regularizer=ProximalL2(["th"]),
                             ij=ImplicitJacobian(Dense(), damping=damping))
    out = problem.upper_grad(upper, lower, None, None)

    rho = float(learnable.rho.detach())
    sigma, dsigma = math.log1p(math.exp(rho)), 1.0 / (1.0 + math.exp(-rho))
    nu = sigma + (damping if lam_damping is None else lam_damping)
    v = b_mat.T @ (b_mat @ lower["th"] + upper["bias"] - a)
    u = torch.linalg.solve(torch.eye(n, dtype=torch.float64) + q / (sigma + damping), v)
    expected = dsigma / nu * float((upper["th"] - lower["th"]) @ u)
    assert set(out.grads) == {"th", "bias", "lam.rho"}
    assert problem.params == {"lam.rho": learnable.rho}
    assert float(out.grads["lam.rho"]) == pytest.approx(expected, rel=1e-12)
    assert out.lam_grad is out.grads["lam.rho"]
    torch.testing.assert_close(out.u["th"], u, rtol=1e-12, atol=1e-14)  # the damped solve


def test_learnable_lambda_undamped_is_the_exact_derivative():
    # Both dampings 0 (the first one set explicitly): dF/dρ of F(ρ) = L^D(θ_P*(σ(ρ))) through the
    # closed-form lower solution θ_P*(λ) = (Q + λI)⁻¹(λθ_D − c), by central differences.
    q, c, b_mat, a, pretext, downstream, upper = _linear_quadratic(seed=12)
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    lam0 = 0.4

    def solution(lam):
        return torch.linalg.solve(q + lam * eye, lam * upper["th"] - c)

    def total(rho):
        th_p = solution(math.log1p(math.exp(rho)))
        return float(downstream({"th": th_p, "bias": upper["bias"]}, None))

    learnable = LearnableLambda(lam0, dtype=torch.float64, damping=0.0)
    problem = BilevelProblem(bissl_upper_loss(downstream, ["th"]), pretext, lam=learnable,
                             regularizer=ProximalL2(["th"]),
                             ij=ImplicitJacobian(Dense(), damping=10.0))
    exact = BilevelProblem(bissl_upper_loss(downstream, ["th"]), pretext,
                           lam=LearnableLambda(lam0, dtype=torch.float64, damping=0.0),
                           regularizer=ProximalL2(["th"]),
                           ij=ImplicitJacobian(Dense(), damping=0.0))
    lower = {"th": solution(lam0)}
    rho, eps = float(learnable.rho.detach()), 1e-6
    fd = (total(rho + eps) - total(rho - eps)) / (2 * eps)
    assert float(exact.upper_grad(upper, lower, None, None).lam_grad) == pytest.approx(fd, rel=1e-7)
    # With the solve damped (λ_damp = 10) and the prefactor not, the gradient is not exact.
    damped = float(problem.upper_grad(upper, lower, None, None).lam_grad)
    assert abs(damped - fd) > 1e-3 * abs(fd)


def test_upper_variables_must_not_shadow_problem_parameters():
    net = _TanhNet(seed=5)
    learnable = LearnableLambda(0.2, dtype=torch.float64)
    problem = net.problem(learnable, CG(max_iter=5))
    with pytest.raises(ValueError, match="must not contain the problem's own parameters"):
        problem.upper_grad({**net.upper, **problem.params}, net.lower, None, None)
    assert net.problem(0.2, CG(max_iter=5)).params == {}


def test_general_regularizer_matches_proximal_fast_path():
    net = _TanhNet(seed=6)
    lam = LearnableLambda(0.3, dtype=torch.float64)

    def prox(upper, lower):
        return 0.5 * ((upper["w"] - lower["w"]) ** 2).sum()

    fast = net.problem(lam, CG(max_iter=40, tol=1e-13), damping=2.0)
    general = BilevelProblem(bissl_upper_loss(net.downstream, ["w"]), net.pretext, lam=lam,
                             regularizer=Regularizer(prox, lower_names=["w"]),
                             ij=ImplicitJacobian(CG(max_iter=40, tol=1e-13), damping=2.0))
    a = fast.upper_grad(net.upper, net.lower, None, None)
    b = general.upper_grad(net.upper, net.lower, None, None)
    for name in a.grads:
        assert torch.allclose(a.grads[name], b.grads[name], rtol=1e-10, atol=1e-12)
    assert float(a.lam_grad) == pytest.approx(float(b.lam_grad), rel=1e-10)
    la = fast.lower_grad(net.upper, net.lower, None)
    lb = general.lower_grad(net.upper, net.lower, None)
    for name in la.grads:
        assert torch.allclose(la.grads[name], lb.grads[name], rtol=1e-12, atol=1e-14)


def test_ridge_example_hypergradient_matches_autograd_through_the_solve():
    import ridge_hyperparameter as ridge

    data = ridge.make_data(n_train=20, n_val=30, dim=6, informative=2, seed=3)
    log_penalty = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    w = ridge.solve_lower(log_penalty, data)
    out = ridge.make_problem().upper_grad({"log_penalty": log_penalty}, {"w": w}, data, data)

    a = log_penalty.clone().requires_grad_(True)
    validation = ridge.val_loss({}, {"w": ridge.solve_lower(a, data)}, data)
    reference = torch.autograd.grad(validation, a)[0]
    assert torch.allclose(out.grads["log_penalty"], reference, rtol=1e-8, atol=1e-12)


def test_ridge_example_lowers_validation_loss():
    import ridge_hyperparameter as ridge

    history = ridge.run(steps=8, verbose=False)
    assert history[-1] < 0.5 * history[0]


def test_lower_grad_is_pretext_gradient_plus_proximal_term():
    net = _TanhNet(seed=7)
    lam = 0.37
    problem = net.problem(lam, CG())
    out = problem.lower_grad(net.upper, net.lower, None)
    leaves = {n: p.clone().requires_grad_(True) for n, p in net.lower.items()}
    g_value = net.pretext(leaves) + 0.5 * lam * ((net.upper["w"] - leaves["w"]) ** 2).sum()
    expected = torch.autograd.grad(g_value, list(leaves.values()))
    for name, ref in zip(leaves, expected):
        assert torch.allclose(out.grads[name], ref, rtol=1e-12, atol=1e-14)
    assert float(out.regularizer) == pytest.approx(
        float(0.5 * ((net.upper["w"] - net.lower["w"]) ** 2).sum()))


def test_prebuilt_lower_hessian_is_reused():
    net = _TanhNet(seed=8)
    problem = net.problem(0.5, CG(max_iter=5), damping=10.0)
    hessian = problem.lower_hessian(net.upper, net.lower, None)
    first = problem.upper_grad(net.upper, net.lower, None, lower_hessian=hessian)
    second = problem.upper_grad(net.upper, net.lower, None, lower_hessian=hessian)
    fresh = problem.upper_grad(net.upper, net.lower, None, None)
    assert hessian.calls == 10
    for name in fresh.grads:
        assert torch.allclose(first.grads[name], fresh.grads[name], rtol=1e-12)
        assert torch.equal(first.grads[name], second.grads[name])


def test_lambda_schedule_is_evaluated_at_the_alternation():
    net = _TanhNet(seed=9)
    schedule = CosineDecay(lam_min=0.01, lam_max=2.0, total=5)
    problem = net.problem(schedule, CG())
    assert [problem.lam_at(t) for t in range(5)] == [schedule(t) for t in range(5)]
    out = problem.lower_grad(net.upper, net.lower, None, t=4)
    assert out.lam == pytest.approx(0.01)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf")])
def test_nonpositive_lambda_is_rejected(lam):
    net = _TanhNet()
    with pytest.raises(ValueError, match="> 0"):
        net.problem(lam, CG())


def test_invalid_schedule_and_damping_are_rejected():
    with pytest.raises(ValueError, match="lam_min"):
        CosineDecay(lam_min=0.0, lam_max=1.0, total=10)
    net = _TanhNet()
    with pytest.raises(ValueError, match="damping"):
        net.problem(0.1, CG(), damping=-1.0)
    with pytest.raises(TypeError, match="LinearSolver"):
        net.problem(0.1, "cg")
    with pytest.raises(TypeError, match="lam"):
        net.problem("0.1", CG())


def test_coupled_names_must_exist_with_equal_shapes():
    net = _TanhNet()
    problem = BilevelProblem(bissl_upper_loss(net.downstream, ["w"]), net.pretext, lam=0.1,
                             regularizer=ProximalL2(["w", "missing"]))
    with pytest.raises(KeyError, match="missing"):
        problem.upper_grad(net.upper, net.lower, None, None)
    with pytest.raises(KeyError, match="missing"):
        problem.lower_grad(net.upper, net.lower, None)
    lower = dict(net.lower, w=torch.zeros(2, 2, dtype=torch.float64))
    problem = BilevelProblem(bissl_upper_loss(net.downstream, ["w"]), net.pretext, lam=0.1,
                             regularizer=ProximalL2(["w"]))
    with pytest.raises(ValueError, match="'w' has shape"):
        problem.lower_grad(net.upper, lower, None)
    with pytest.raises(ValueError, match="share no name"):
        BilevelProblem(lambda x, y, b: y["a"].sum(), lambda y, b: y["a"].sum(), lam=1.0).lower_grad(
            {"b": torch.zeros(1)}, {"a": torch.zeros(1)}, None)


def test_non_scalar_and_non_finite_losses_are_rejected():
    net = _TanhNet()
    vector_loss = BilevelProblem(lambda x, y, b: x["w"].sum(1), net.pretext, lam=0.1,
                                 regularizer=ProximalL2(["w"]))
    with pytest.raises(ValueError, match="scalar"):
        vector_loss.upper_grad(net.upper, net.lower, None, None)
    vector_lower = BilevelProblem(bissl_upper_loss(net.downstream, ["w"]),
                                  lambda y, b: y["w"].sum(0), lam=0.1,
                                  regularizer=ProximalL2(["w"]))
    with pytest.raises(ValueError, match="scalar"):
        vector_lower.lower_grad(net.upper, net.lower, None)
    nan_upper = BilevelProblem(lambda x, y, b: x["w"].sum() * float("nan"), net.pretext, lam=0.1,
                               regularizer=ProximalL2(["w"]))
    with pytest.raises(NonFiniteError, match="upper-level loss"):
        nan_upper.upper_grad(net.upper, net.lower, None, None)
    nan_lower = BilevelProblem(bissl_upper_loss(net.downstream, ["w"]),
                               lambda y, b: y["w"].sum() + float("inf"), lam=0.1,
                               regularizer=ProximalL2(["w"]))
    with pytest.raises(NonFiniteError, match="lower-level loss"):
        nan_lower.lower_grad(net.upper, net.lower, None)


def test_solver_breakdown_raises_or_warns():
    q, pre, down, upper, lower = _quadratic(1, 6, 1, 3, torch.float64, indefinite=5.0)
    kwargs = dict(lam=0.01, regularizer=ProximalL2(["th"]))
    cg = CG(max_iter=20)
    problem = BilevelProblem(bissl_upper_loss(down, ["th"]), pre,
                             ij=ImplicitJacobian(cg, damping=0.0), **kwargs)
    with pytest.raises(SolverBreakdownError, match="increase the damping"):
        problem.upper_grad(upper, lower, None, None)
    warn = BilevelProblem(bissl_upper_loss(down, ["th"]), pre,
                          ij=ImplicitJacobian(cg, damping=0.0, on_breakdown="warn"), **kwargs)
    with pytest.warns(RuntimeWarning, match="broke down"):
        out = warn.upper_grad(upper, lower, None, None)
    assert out.info.breakdown is not None
    quiet = BilevelProblem(bissl_upper_loss(down, ["th"]), pre,
                           ij=ImplicitJacobian(cg, damping=0.0, on_breakdown="ignore"), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quiet.upper_grad(upper, lower, None, None).info.breakdown is not None


def test_hvp_mode_the_loss_cannot_run_is_reported():
    class Exp(torch.autograd.Function):  # legacy style: no forward-mode rule
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a.exp()

        @staticmethod
        def backward(ctx, grad):
            (a,) = ctx.saved_tensors
            return a.exp() * grad

    def pretext(p, batch):
        return Exp.apply(p["w"]).sum()

    net = _TanhNet()
    problem = BilevelProblem(bissl_upper_loss(net.downstream, ["w"]), pretext, lam=0.5,
                             regularizer=ProximalL2(["w"]),
                             ij=ImplicitJacobian(hvp_mode="forward-over-reverse",
                                                 reuse_graph=False))
    with pytest.raises(HVPModeError, match="reverse-over-reverse"):
        problem.upper_grad(net.upper, net.lower, None, None)
    fallback = BilevelProblem(bissl_upper_loss(net.downstream, ["w"]), pretext, lam=0.5,
                              regularizer=ProximalL2(["w"]),
                              ij=ImplicitJacobian(CG(max_iter=30, tol=1e-12), reuse_graph=True))
    out = fallback.upper_grad(net.upper, net.lower, None, None)
    assert out.info.converged
