"""Implicit-Jacobian solves where the textbook assumptions fail: indefinite systems, real network.

A small conv net with train-mode BatchNorm (tanh, smooth pretext loss, float64):

- at the thesis's μ = λ + λ_damp = 10.001 the concatenated-head system ``diag(I, 0) + H_ω/μ``
  (eq. 5.14) is indefinite (its dense matrix has negative eigenvalues, asserted); CG stops on
  non-positive curvature, while MINRES, the default for ``solve_over="all"``, matches the dense
  block solve, built independently with ``torch.autograd.functional.hessian`` over the flattened ω,
  to 1e-8 relative;
- a BiSSL trainer run (undamped, μ = 1) where plain CG breaks down: the robust configurations
  (MINRES on the exact Hessian; CG and Nyström-preconditioned CG on the Gauss–Newton curvature) log
  a measured relative residual ``‖v − A u‖/‖v‖ ≤ 0.1`` at every alternation and no breakdown, and
  the logged residual equals a dense recomputation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from implicitbilevel import (
    CG,
    MINRES,
    BilevelProblem,
    GaussNewton,
    ImplicitJacobian,
    NystromPreconditioner,
    ProximalL2,
    SolverBreakdownError,
    functional_module,
)
from implicitbilevel.bissl import BiSSLConfig, BiSSLTrainer, bissl_upper_loss

D = torch.float64
LAM, DAMPING = 0.001, 10.0
MU = LAM + DAMPING


class Net(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(),
            nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _models(seed: int = 0) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    pretext = Net(5).to(D).train()
    downstream = Net(3).to(D).train()
    downstream.backbone.load_state_dict(pretext.backbone.state_dict())
    with torch.no_grad():
        for p in pretext.parameters():  # a lower point away from the upper one, as in BiSSL
            p.mul_(3.0)
    return pretext, downstream


def _data(seed: int, n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=D), torch.randint(0, classes, (n,),
                                                                         generator=g)


def _losses(pretext: Net, downstream: Net):
    pre_fn, down_fn = functional_module(pretext), functional_module(downstream)

    def pretext_outputs(p, batch):
        return pre_fn(p, batch[0])

    def output_loss(z, batch):
        return F.cross_entropy(z, batch[1])

    def pretext_loss(p, batch):
        return output_loss(pretext_outputs(p, batch), batch)

    def downstream_loss(p, batch):
        return F.cross_entropy(down_fn(p, batch[0]), batch[1])

    return pretext_loss, downstream_loss, GaussNewton(pretext_outputs, output_loss)


def _backbone(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith("backbone.")]


def _dense_concat_solution(pretext: Net, downstream: Net, lower_batch, upper_batch):
    """u = (A⁻¹)_θθ v with A = diag(I, 0) + H_ω/μ, everything materialised (eq. 5.14)."""
    names = [n for n, _ in pretext.named_parameters()]
    backbone = _backbone(pretext)
    params = {n: p.detach() for n, p in pretext.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    buffers = {n: b.clone() for n, b in pretext.named_buffers() if b.is_floating_point()}

    def unflat(vec):
        return {n: t.view(s) for n, t, s in zip(names, vec.split(sizes), shapes)}

    def loss_of(vec):
        out = functional_call(pretext, ({**unflat(vec), **buffers},), (lower_batch[0],))
        return F.cross_entropy(out, lower_batch[1])

    flat = torch.cat([params[n].reshape(-1) for n in names])
    hessian = torch.autograd.functional.hessian(loss_of, flat)
    n_theta = sum(params[n].numel() for n in backbone)
    assert names[:len(backbone)] == backbone  # the backbone block comes first
    a = hessian / MU
    a[:n_theta, :n_theta] += torch.eye(n_theta, dtype=D)

    # v = ∇_θP L^D(θ_P, φ_D), independently: the downstream model with θ_P substituted.
    substituted = copy.deepcopy(downstream)
    substituted.backbone.load_state_dict(pretext.backbone.state_dict())
    loss = F.cross_entropy(substituted(upper_batch[0]), upper_batch[1])
    v = torch.autograd.grad(loss, [dict(substituted.named_parameters())[n] for n in backbone])
    rhs = torch.cat([g.reshape(-1) for g in v] + [torch.zeros(flat.numel() - n_theta, dtype=D)])
    u = torch.linalg.solve(a, rhs)[:n_theta]
    return a, u


def test_concatenated_head_on_an_indefinite_batchnorm_net_matches_the_dense_block_solve():
    pretext, downstream = _models()
    lower_batch, upper_batch = _data(1, 32, 5), _data(2, 16, 3)
    a, u_dense = _dense_concat_solution(pretext, downstream, lower_batch, upper_batch)
    eigenvalues = torch.linalg.eigvalsh(a)
    assert eigenvalues.min() < -1e-6 < 1e-6 < eigenvalues.max()  # the hard case: indefinite
    pretext_loss, downstream_loss, _ = _losses(pretext, downstream)
    backbone = _backbone(downstream)
    upper = {n: p.detach() for n, p in downstream.named_parameters()}
    lower = {n: p.detach() for n, p in pretext.named_parameters()}
    kwargs = dict(lam=LAM, regularizer=ProximalL2(backbone))
    upper_loss = bissl_upper_loss(downstream_loss, backbone)
    cg = BilevelProblem(upper_loss, pretext_loss, **kwargs,
                        ij=ImplicitJacobian(CG(max_iter=400, tol=1e-12), damping=DAMPING,
                                            solve_over="all"))
    with pytest.raises(SolverBreakdownError, match="non-positive curvature"):
        cg.upper_grad(upper, lower, upper_batch, lower_batch)
    minres = BilevelProblem(upper_loss, pretext_loss, **kwargs,
                            ij=ImplicitJacobian(damping=DAMPING, solve_over="all"))
    assert isinstance(minres.solver, MINRES)
    minres.solver.max_iter, minres.solver.tol = 2 * a.shape[0], 1e-13
    running = pretext.backbone[1].running_mean.clone()
    out = minres.upper_grad(upper, lower, upper_batch, lower_batch)
    u = torch.cat([out.u[n].reshape(-1) for n in backbone])
    assert out.info.breakdown is None and out.info.converged
    assert float((u - u_dense).norm() / u_dense.norm()) < 1e-8
    assert out.true_relative_residual() < 1e-9
    assert torch.equal(pretext.backbone[1].running_mean, running)  # products leave BN alone


def _trainer(solver, curvature, seed=0, lam=1.0, damping=0.0):
    pretext, downstream = _models(seed)
    pretext_loss, downstream_loss, gauss_newton = _losses(pretext, downstream)
    backbone = _backbone(downstream)
    problem = BilevelProblem(
        bissl_upper_loss(downstream_loss, backbone), pretext_loss, lam=lam,
        regularizer=ProximalL2(backbone),
        ij=ImplicitJacobian(solver, damping=damping, on_breakdown="ignore",
                            curvature=gauss_newton if curvature == "gauss-newton" else "hessian"),
    )
    lower_data = DataLoader(TensorDataset(*_data(3, 96, 5)), batch_size=32, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
    upper_data = DataLoader(TensorDataset(*_data(4, 48, 3)), batch_size=16, shuffle=True,
                            generator=torch.Generator().manual_seed(1))
    upper = dict(downstream.named_parameters())
    lower = dict(pretext.named_parameters())
    trainer = BiSSLTrainer(
        problem, upper, lower,
        torch.optim.SGD(upper.values(), lr=0.05), torch.optim.SGD(lower.values(), lr=0.05),
        upper_data, lower_data,
        BiSSLConfig(alternations=4, lower_steps=2, upper_steps=2, progress=False),
    )
    return trainer


def test_plain_cg_breaks_down_where_the_robust_configurations_solve():
    # Undamped, μ = λ = 1 (the λ_damp = 0 runs of Table F.8): the backbone Hessian of this lower
    # point has eigenvalues down to about −3.4, so I + H/μ is indefinite.
    history = _trainer(CG(max_iter=10), "hessian").run()
    assert sum(h["solver_breakdowns"] for h in history) > 0

    robust = {
        "minres": (MINRES(max_iter=60), "hessian"),
        "gauss-newton-cg": (CG(max_iter=20), "gauss-newton"),
        "gauss-newton-nystrom-pcg": (CG(max_iter=10, preconditioner=NystromPreconditioner(8)),
                                     "gauss-newton"),
    }
    for name, (ij, curvature) in robust.items():
        trainer = _trainer(ij, curvature)
        history = trainer.run()
        residuals = [h["ij_relative_residual"] for h in history]
        assert all(r <= 0.1 for r in residuals), (name, residuals)
        assert sum(h["solver_breakdowns"] for h in history) == 0, name


def test_logged_residual_equals_a_dense_recomputation():
    trainer = _trainer(MINRES(max_iter=5), "hessian")
    trainer.config.alternations = 1
    captured = {}
    original = trainer.problem.upper_grad

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        captured["out"] = out
        return out

    trainer.problem.upper_grad = spy
    history = trainer.run()
    out = captured["out"]
    system = out.system
    names = list(out.u)
    columns = []
    for name in names:
        for i in range(out.u[name].numel()):
            e = {n: torch.zeros_like(out.u[n]) for n in names}
            e[name].view(-1)[i] = 1.0
            columns.append(torch.cat([c.reshape(-1) for c in system(e).values()]))
    a = torch.stack(columns, dim=1)
    assert torch.allclose(a, a.T, atol=1e-10)  # one fixed symmetric operator across products
    u = torch.cat([out.u[n].reshape(-1) for n in names])
    v = torch.cat([out.rhs[n].reshape(-1) for n in names])
    expected = float((v - a @ u).norm() / v.norm())
    assert history[0]["ij_relative_residual"] == pytest.approx(expected, rel=1e-8)
    assert 0.0 < expected < 1.0  # five MINRES products: a partial, monotone solve
