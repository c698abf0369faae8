"""Appendix G of the thesis (recipes.common.appendix_g) through BilevelProblem's general
regulariser and upper objective, in float64 on a small tanh network:

- against a dense evaluation of appendix G's formula ``dω*/dθ_D = AB`` with
  ``A = −[λ∇²_{θ_Dθ_P} r, ∇²_{θ_Dφ_P} L^P(θ_D, φ_P)]`` and
  ``B = [∇²_ω L^P(θ_P, φ_P) + diag(λ∇²_{θ_P} r, ∇²_{φ_P} L^P(θ_D, φ_P))]⁻¹``;
- against central finite differences of ``F(θ_D) = L^D(θ_P*, φ_D) + L^D(θ_D, φ_D) + μ_G/2‖φ_P*‖²``
  through a lower level solved exactly by Newton's method."""

import math

import pytest
import torch

from implicitbilevel import MINRES, BilevelProblem, Dense, ImplicitJacobian
from recipes.common.appendix_g import appendix_g_parts

LAM, MU_G = 0.7, 0.3
BACKBONE = ["backbone.weight", "backbone.bias"]
HEAD = ["head.weight", "head.bias"]
SHAPES = {"backbone.weight": (4, 3), "backbone.bias": (4,),
          "head.weight": (2, 4), "head.bias": (2,)}


def _features(p, x):
    return torch.tanh(x @ p["backbone.weight"].T + p["backbone.bias"])


def pretext_loss(p, batch):  # smooth regression through the pretext head
    x, y = batch
    return (_features(p, x) @ p["head.weight"].T + p["head.bias"] - y).pow(2).mean()


def downstream_loss(p, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(_features(p, x) @ p["head.weight"].T
                                             + p["head.bias"], y)


def _data():
    gen = torch.Generator().manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    upper = {n: 0.5 * rand(*SHAPES[n]) for n in SHAPES}
    lower = {n: upper[n] + 0.2 * rand(*SHAPES[n]) if n in BACKBONE else 0.5 * rand(*SHAPES[n])
             for n in SHAPES}
    lower_batch = (rand(16, 3), rand(16, 2))
    upper_batch = (rand(12, 3), torch.randint(0, 2, (12,), generator=gen))
    return upper, lower, lower_batch, upper_batch


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def _unflat(v, names):
    out, i = {}, 0
    for n in names:
        k = torch.Size(SHAPES[n]).numel()
        out[n] = v[i:i + k].reshape(SHAPES[n])
        i += k
    return out


OMEGA = BACKBONE + HEAD


def _lower_objective(theta_d, omega, batch):
    """``L^P(θ_P, φ_P) + L^P(θ_D, φ_P) + λ/2‖θ_D − θ_P‖²`` on flat vectors."""
    w = _unflat(omega, OMEGA)
    d = {**_unflat(theta_d, BACKBONE), **{n: w[n] for n in HEAD}}
    prox = 0.5 * (theta_d - _flat(w, BACKBONE)).pow(2).sum()
    return pretext_loss(w, batch) + pretext_loss(d, batch) + LAM * prox


def _minimise_lower(theta_d, omega0, batch):
    """A local minimiser ω* of the lower objective: L-BFGS, then Newton to machine precision."""
    omega = omega0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([omega], max_iter=500, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = _lower_objective(theta_d, omega, batch)
        value.backward()
        return value

    opt.step(closure)
    return _solve_lower(theta_d, omega.detach(), batch)


def _solve_lower(theta_d, omega0, batch):
    """ω*(θ_D) by Newton's method from a nearby ``omega0`` (the Hessian is positive definite)."""
    omega = omega0.clone()
    for _ in range(50):
        g = torch.func.grad(lambda w: _lower_objective(theta_d, w, batch))(omega)
        if g.norm() < 1e-14:
            break
        h = torch.autograd.functional.hessian(lambda w: _lower_objective(theta_d, w, batch), omega)
        omega = omega - torch.linalg.solve(h, g)
    assert g.norm() < 1e-12
    return omega


def _upper_objective(theta_d, phi_d, omega, batch):
    w = _unflat(omega, OMEGA)
    head = _unflat(phi_d, HEAD)
    return (downstream_loss({**_unflat(theta_d, BACKBONE), **head}, batch)
            + downstream_loss({**{n: w[n] for n in BACKBONE}, **head}, batch)
            + 0.5 * MU_G * _flat(w, HEAD).pow(2).sum())


def _problem(ij):
    upper_loss, reg = appendix_g_parts(downstream_loss, pretext_loss, BACKBONE, HEAD, LAM, MU_G)
    return BilevelProblem(upper_loss, pretext_loss, lam=LAM, regularizer=reg,
                          ij=ImplicitJacobian(ij, damping=0.0, solve_over="all"))


@pytest.fixture(scope="module")
def at_lower_solution():
    upper, lower, lower_batch, upper_batch = _data()
    omega = _minimise_lower(_flat(upper, BACKBONE), _flat(lower, OMEGA), lower_batch)
    return upper, _unflat(omega, OMEGA), lower_batch, upper_batch


def _dense_appendix_g(upper, lower, lower_batch, upper_batch):
    """``∇_θD L^D(θ_D, φ_D) + A B [∇_θ L^D(θ_P, φ_D); μ_G φ_P]`` with every block dense."""
    td, tp, fp = _flat(upper, BACKBONE), _flat(lower, BACKBONE), _flat(lower, HEAD)
    nb = td.numel()
    lp = lambda t, f: pretext_loss({**_unflat(t, BACKBONE), **_unflat(f, HEAD)},  # noqa: E731
                                   lower_batch)
    hess_omega = torch.autograd.functional.hessian(lambda w: lp(w[:nb], w[nb:]),
                                                   torch.cat([tp, fp]))
    joint = torch.autograd.functional.hessian(lambda z: lp(z[:nb], z[nb:]), torch.cat([td, fp]))
    mixed, head_block = joint[:nb, nb:], joint[nb:, nb:]  # ∇²_{θ_D φ_P}, ∇²_{φ_P} of L^P(θ_D, φ_P)
    eye = torch.eye(nb, dtype=td.dtype)
    # r = ½‖θ_D − θ_P‖²: ∇²_{θ_D θ_P} r = −I, ∇²_{θ_P} r = I
    a = -torch.cat([LAM * -eye, mixed], dim=1)
    b_inv = hess_omega + torch.block_diag(LAM * eye, head_block)
    phi_d = _flat(upper, HEAD)
    w = torch.func.grad(lambda tp_: _upper_objective(td, phi_d, torch.cat([tp_, fp]), upper_batch)
                        )(tp)
    rhs = torch.cat([w, MU_G * fp])
    explicit = torch.func.grad(lambda t: _upper_objective(t, phi_d, torch.cat([tp, fp]),
                                                          upper_batch))(td)
    return explicit + a @ torch.linalg.solve(b_inv, rhs), b_inv


@pytest.mark.parametrize("solver", ["minres", "dense"])
def test_hypergradient_matches_the_dense_appendix_g_formula(at_lower_solution, solver):
    upper, lower, lower_batch, upper_batch = at_lower_solution
    ij = MINRES(max_iter=60, tol=1e-13) if solver == "minres" else Dense()
    out = _problem(ij).upper_grad(upper, lower, upper_batch, lower_batch)
    expected, _ = _dense_appendix_g(upper, lower, lower_batch, upper_batch)
    torch.testing.assert_close(_flat(out.grads, BACKBONE), expected, rtol=1e-9, atol=1e-11)
    assert sorted(out.u) == sorted(OMEGA)


def test_hypergradient_matches_finite_differences_through_the_exact_lower_solution(
        at_lower_solution):
    upper, lower, lower_batch, upper_batch = at_lower_solution
    out = _problem(Dense()).upper_grad(upper, lower, upper_batch, lower_batch)
    td, phi_d, omega0 = _flat(upper, BACKBONE), _flat(upper, HEAD), _flat(lower, OMEGA)

    def big_f(t):
        return _upper_objective(t, phi_d, _solve_lower(t, omega0, lower_batch), upper_batch)

    eps, fd = 1e-5, torch.zeros_like(td)
    for i in range(td.numel()):
        e = torch.zeros_like(td)
        e[i] = eps
        fd[i] = (big_f(td + e) - big_f(td - e)) / (2 * eps)
    torch.testing.assert_close(_flat(out.grads, BACKBONE), fd, rtol=1e-6, atol=1e-8)
    # the upper level's explicit head gradient is untouched by the implicit part
    explicit = torch.func.grad(lambda f: _upper_objective(td, f, omega0, upper_batch))(phi_d)
    torch.testing.assert_close(_flat(out.grads, HEAD), explicit, rtol=1e-10, atol=1e-12)


def test_lower_gradient_gains_the_head_coupling(at_lower_solution):
    upper, lower, lower_batch, _ = at_lower_solution
    out = _problem(Dense()).lower_grad(upper, lower, lower_batch)
    td, omega = _flat(upper, BACKBONE), _flat(lower, OMEGA)
    expected = torch.func.grad(lambda w: _lower_objective(td, w, lower_batch))(omega)
    torch.testing.assert_close(_flat(out.grads, OMEGA), expected, rtol=1e-10, atol=1e-12)
    assert _flat(out.grads, OMEGA).norm() < 1e-10  # at the exactly solved lower level


def test_the_system_is_indefinite_away_from_the_solution():
    """Where MINRES is needed: B⁻¹ of appendix G has negative eigenvalues at this point."""
    upper, lower, lower_batch, upper_batch = _data()
    out = _problem(MINRES(max_iter=60, tol=1e-13)).upper_grad(upper, lower, upper_batch,
                                                              lower_batch)
    expected, b_inv = _dense_appendix_g(upper, lower, lower_batch, upper_batch)
    torch.testing.assert_close(_flat(out.grads, BACKBONE), expected, rtol=1e-8, atol=1e-10)
    assert torch.linalg.eigvalsh(b_inv).min() < 0


@pytest.mark.parametrize("recipe", ["vision", "gpt"])
def test_each_recipe_bissl_stage_runs_appendix_g(recipe):
    from tiny_stages import gpt_stage, vision_stage

    stage = vision_stage if recipe == "vision" else gpt_stage
    history = stage(variant="appendix-g", mu_g=0.1, lam=0.1, ij="minres")
    assert len(history) == 2 and all(math.isfinite(h["upper_loss"]) for h in history)
    with pytest.raises(ValueError, match="lam_schedule=constant"):
        stage(variant="appendix-g", lam_schedule="learnable")
