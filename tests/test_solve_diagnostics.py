"""The per-alternation IJ diagnostics: the residual on the solved system and on the exact-Hessian
system, and the cosine between u and v, against dense float64 computations."""

from __future__ import annotations

import math

import torch

from implicitbilevel import CG, BilevelProblem, GaussNewton, ImplicitJacobian, ProximalL2
from implicitbilevel.bissl import BiSSLConfig, BiSSLTrainer, bissl_upper_loss
from implicitbilevel.bissl.diagnostics import solve_diagnostics

F64 = torch.float64


def _parts(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(8, 4, generator=g, dtype=F64)
    c = torch.randn(3, 4, generator=g, dtype=F64)

    def outputs(p, batch):  # the sine term as an output in which the loss is linear
        return torch.cat([a @ p["th"], torch.sin(p["th"]).sum()[None]])

    def output_loss(z, batch):  # convex in z: softplus, and linear in the last output
        return torch.nn.functional.softplus(z[:-1]).sum() / 8 + 0.1 * z[-1]

    def pretext(p, batch):
        return output_loss(outputs(p, batch), batch)

    def downstream(p, batch):
        return ((c @ p["th"]).tanh() * p["s"]).pow(2).sum()

    upper = {"th": torch.randn(4, generator=g, dtype=F64).requires_grad_(),
             "s": torch.ones(1, dtype=F64, requires_grad=True)}
    lower = {"th": torch.randn(4, generator=g, dtype=F64).requires_grad_()}
    return pretext, downstream, GaussNewton(outputs, output_loss), upper, lower


def test_exact_residual_is_that_of_the_exact_hessian_system():
    # The sine's curvature is outside the Gauss-Newton matrix: its system is not the exact one.
    pretext, downstream, split, upper, lower = _parts()
    lam, damping = 0.5, 0.5
    problem = BilevelProblem(bissl_upper_loss(downstream, ["th"]), pretext, lam=lam,
                             regularizer=ProximalL2(["th"]),
                             ij=ImplicitJacobian(CG(max_iter=2), damping=damping, curvature=split))
    out = problem.upper_grad(upper, lower, None, None)
    found = solve_diagnostics(problem, out, upper, lower, None, residual=True, exact=True)
    th = lower["th"].detach()
    h = torch.autograd.functional.hessian(lambda t: pretext({"th": t}, None), th)
    mu = lam + damping
    u, v = out.u["th"], out.rhs["th"]
    exact = float((v - (u + h @ u / mu)).norm() / v.norm())
    assert math.isclose(found["ij_exact_relative_residual"], exact, rel_tol=1e-10)
    assert abs(found["ij_exact_relative_residual"] - found["ij_relative_residual"]) > 1e-6
    cosine = float(u @ v / (u.norm() * v.norm()))
    assert math.isclose(found["ij_cosine_u_v"], cosine, rel_tol=1e-12)


def test_the_trainer_logs_all_three_and_can_switch_the_products_off(tmp_path):
    pretext, downstream, split, upper, lower = _parts(1)
    problem = BilevelProblem(bissl_upper_loss(downstream, ["th"]), pretext, lam=0.5,
                             regularizer=ProximalL2(["th"]),
                             ij=ImplicitJacobian(CG(max_iter=3), damping=0.5, curvature=split))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)),
                                       batch_size=2)

    def run(**settings):
        trainer = BiSSLTrainer(problem, upper, lower,
                               torch.optim.SGD(list(upper.values()), lr=0.01),
                               torch.optim.SGD(list(lower.values()), lr=0.01), data, data,
                               BiSSLConfig(alternations=2, lower_steps=1, upper_steps=2,
                                           progress=False, **settings))
        return trainer.run()

    history = run()
    assert all(0 <= h["ij_exact_relative_residual"] < 10 and -1 <= h["ij_cosine_u_v"] <= 1
               and math.isfinite(h["ij_relative_residual"]) for h in history)
    off = run(measure_residual=False, measure_exact_residual=False)
    assert all(math.isnan(h["ij_relative_residual"]) and math.isnan(h["ij_exact_relative_residual"])
               for h in off)
