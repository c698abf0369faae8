"""The thesis-exact preset against an independent transcription of the original BiSSL code's
implicit-Jacobian computation, on a small BatchNorm network: on a positive definite system and on
an indefinite one, where plain CG stops and the original scheme runs on."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from implicitbilevel import (
    CG,
    BilevelProblem,
    ImplicitJacobian,
    OriginalBiSSLCG,
    ProximalL2,
    SolverBreakdownError,
    functional_module,
)
from implicitbilevel.bissl import bissl_upper_loss

F64 = torch.float64


def _setup(seed: int):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(),
                             nn.Linear(6, 5)).double()
    pretext_head = nn.Linear(5, 3).double()
    down_head = nn.Linear(5, 2).double()
    pretext = nn.Sequential(backbone, pretext_head)
    downstream = nn.Sequential(copy.deepcopy(backbone), down_head)
    x_p, y_p = torch.randn(16, 4, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g)
    x_d, y_d = torch.randn(12, 4, generator=g, dtype=F64), torch.randint(0, 2, (12,), generator=g)
    f_pre, f_down = functional_module(pretext), functional_module(downstream)

    def pretext_loss(p, batch):
        return nn.functional.cross_entropy(f_pre(p, x_p), y_p)

    def downstream_loss(p, batch):
        return nn.functional.cross_entropy(f_down(p, x_d), y_d)

    names = [f"0.{n}" for n, _ in backbone.named_parameters()]
    lower = {n: p.detach().clone().requires_grad_() for n, p in pretext.named_parameters()}
    upper = {n: p.detach().clone().requires_grad_() for n, p in downstream.named_parameters()}
    with torch.no_grad():  # θ_D a little away from θ_P, as after some upper steps
        for n in names:
            upper[n].add_(0.05 * torch.randn(upper[n].shape, generator=g, dtype=F64))
    return pretext_loss, downstream_loss, names, upper, lower


def _transcription(pretext_loss, names, lower, v, mu, n_c=5):
    """The original scheme written out: forward and double backward recomputed per product,
    α and β per tensor with 1e-12 in both denominators, N_c iterations, nan_to_num."""
    fixed = {n: t.detach() for n, t in lower.items()}
    params = [fixed[n].clone().requires_grad_(True) for n in names]

    def matvec(vec):
        loss = pretext_loss({**fixed, **dict(zip(names, params))}, None)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        products = torch.autograd.grad(grads, params, grad_outputs=vec)
        return [vi + hi / mu for vi, hi in zip(vec, products)]

    b = [v[n].detach().clone() for n in names]
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    for _ in range(n_c):
        ap = matvec(p)
        for i in range(len(names)):
            rs = torch.sum(r[i] * r[i])
            alpha = rs / (torch.sum(p[i] * ap[i]) + 1e-12)
            x[i] = x[i] + alpha * p[i]
            r_new = r[i] - alpha * ap[i]
            beta = torch.sum(r_new * r_new) / (rs + 1e-12)
            p[i] = r_new + beta * p[i]
            r[i] = r_new
    return {n: torch.nan_to_num(t) for n, t in zip(names, x)}


@pytest.mark.parametrize("lam, damping", [(1e-3, 10.0), (1e-3, 0.0)])
def test_preset_matches_the_transcription(lam, damping):
    pretext_loss, downstream_loss, names, upper, lower = _setup(seed=4)
    problem = BilevelProblem(bissl_upper_loss(downstream_loss, names), pretext_loss, lam=lam,
                             regularizer=ProximalL2(names),
                             ij=ImplicitJacobian(OriginalBiSSLCG(5), damping=damping,
                                                 on_breakdown="ignore"))
    out = problem.upper_grad(upper, lower, None, None)
    expected = _transcription(pretext_loss, names, lower, out.rhs, lam + damping)
    for n in names:
        torch.testing.assert_close(out.u[n], expected[n], rtol=1e-6, atol=1e-9)
    assert out.info.iterations == 5


def test_on_an_indefinite_system_plain_cg_stops_and_the_preset_runs_on():
    pretext_loss, downstream_loss, names, upper, lower = _setup(seed=4)
    mu = 1e-3  # λ = 0.001, no damping: I + H/μ is far from definite at initialisation

    def problem(solver):
        return BilevelProblem(bissl_upper_loss(downstream_loss, names), pretext_loss, lam=mu,
                              regularizer=ProximalL2(names), ij=ImplicitJacobian(solver))

    with pytest.raises(SolverBreakdownError, match="non-positive curvature"):
        problem(CG(max_iter=5)).upper_grad(upper, lower, None, None)
    out = problem(OriginalBiSSLCG(5)).upper_grad(upper, lower, None, None)
    expected = _transcription(pretext_loss, names, lower, out.rhs, mu)
    for n in names:
        torch.testing.assert_close(out.u[n], expected[n], rtol=1e-6, atol=1e-9)


def test_non_finite_entries_are_replaced_and_reported():
    def matvec(z):  # A d = 0 on block "b": α = rᵀr / ε there, then ∞ · 0 = NaN
        return {"a": 2 * z["a"], "b": torch.zeros_like(z["b"]) * float("inf")}

    b = {"a": torch.ones(3, dtype=F64), "b": torch.ones(2, dtype=F64)}
    x, info = OriginalBiSSLCG(3)(matvec, b)
    assert info.breakdown is not None and "'b'" in info.breakdown
    assert torch.isfinite(x["b"]).all()
    torch.testing.assert_close(x["a"], b["a"] / 2)
