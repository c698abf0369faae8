"""Every stochastic method's step against a hand transcription of its paper's update, on a tiny
non-quadratic problem in float64 (to 1e-12): from two callables, and from a
:class:`~implicitbilevel.BilevelProblem` whose inner objective is ``ℓ(y) + λ r(x, y)``."""

from __future__ import annotations

import pytest
import torch
from stochastic_tiny import F64, Dense, close, tiny

import implicitbilevel as ib
from benchmarks.bilevel_problems import rows
from implicitbilevel.stochastic import BOME, F2SA, SABA, SOBA, AmIGO, BilevelOracles, StocBiO


def test_soba_step_is_the_papers_update():
    f, g, x, y, v, inner, outer = tiny()
    d = Dense(f, g)
    x0, z0 = x["x"].clone(), y["z"].clone()
    method = SOBA.from_functions(f, g, x, y, lr_inner=0.3, lr_outer=0.2)
    method.v["z"].copy_(v)
    method.step(outer, inner)
    fx, fz = d.fgrads(x0, z0, outer)
    close(y["z"], z0 - 0.3 * d.gy(x0, z0, inner))
    close(method.v["z"], v - 0.3 * (d.hyy(x0, z0, inner) @ v - fz))
    close(x["x"], x0 - 0.2 * (fx - d.hxy(x0, z0, inner).T @ v))


def test_saba_two_steps_are_the_papers_update():
    f, g, x, y, v, inner, outer = tiny()
    d = Dense(f, g)
    method = SABA.from_functions(f, g, x, y, n_inner=6, n_outer=5, lr_inner=0.3, lr_outer=0.2)
    method.v["z"].copy_(v)
    batches = [(torch.tensor([0, 1]), torch.tensor([0, 1, 2])),
               (torch.tensor([1, 3]), torch.tensor([2, 3, 4]))]
    xs, zs, vs = x["x"].clone(), y["z"].clone(), v.clone()
    mem = {k: {} for k in ("grad", "hvp", "cross", "fx", "fy")}
    means = {"grad": 0 * zs, "hvp": 0 * zs, "cross": 0 * xs, "fx": 0 * xs, "fy": 0 * zs}
    for i_out, i_in in batches:
        method.step(rows(outer, i_out), rows(inner, i_in))
        fresh = {"grad": {}, "hvp": {}, "cross": {}, "fx": {}, "fy": {}}
        for i in i_in.tolist():
            b = rows(inner, torch.tensor([i]))
            fresh["grad"][i] = d.gy(xs, zs, b)
            fresh["hvp"][i] = d.hyy(xs, zs, b) @ vs
            fresh["cross"][i] = d.hxy(xs, zs, b).T @ vs
        for j in i_out.tolist():
            fresh["fx"][j], fresh["fy"][j] = d.fgrads(xs, zs, rows(outer, torch.tensor([j])))
        dirs = {}
        for k, values in fresh.items():  # D = mean(φ_i − w_i) + w̄; w̄ += Σ(φ_i − w_i)/n
            n = 5 if k in ("fx", "fy") else 6
            diffs = [values[i] - mem[k].get(i, 0 * values[i]) for i in values]
            dirs[k] = torch.stack(diffs).mean(0) + means[k]
            means[k] = means[k] + torch.stack(diffs).sum(0) / n
            mem[k].update(values)
        zs, vs, xs = (zs - 0.3 * dirs["grad"], vs - 0.3 * (dirs["hvp"] - dirs["fy"]),
                      xs - 0.2 * (dirs["fx"] - dirs["cross"]))
        close(y["z"], zs)
        close(method.v["z"], vs)
        close(x["x"], xs)
    close(method.memory["cross"].mean["x"], means["cross"])


def test_stocbio_step_is_the_papers_update():
    f, g, x, y, _, inner, outer = tiny()
    d = Dense(f, g)
    x0, z = x["x"].clone(), y["z"].clone()
    method = StocBiO.from_functions(f, g, x, y, lr_inner=0.3, lr_outer=0.2, neumann_lr=0.4,
                                    inner_steps=2, neumann_steps=3)
    method.step(outer, inner)
    for _ in range(2):
        z = z - 0.3 * d.gy(x0, z, inner)
    fx, fz = d.fgrads(x0, z, outer)
    eye = torch.eye(3, dtype=F64) - 0.4 * d.hyy(x0, z, inner)
    v = 0.4 * sum(torch.linalg.matrix_power(eye, q) @ fz for q in range(4))  # q = −1, …, Q−1
    close(y["z"], z)
    close(method.v["z"], v)
    close(x["x"], x0 - 0.2 * (fx - d.hxy(x0, z, inner).T @ v))


def test_amigo_step_is_the_papers_update():
    f, g, x, y, v, inner, outer = tiny()
    d = Dense(f, g)
    x0, z = x["x"].clone(), y["z"].clone()
    method = AmIGO.from_functions(f, g, x, y, lr_inner=0.3, lr_outer=0.2, lr_v=0.25,
                                  inner_steps=2, v_steps=3)
    method.v["z"].copy_(v)
    method.step(outer, inner)
    for _ in range(2):
        z = z - 0.3 * d.gy(x0, z, inner)
    fx, fz = d.fgrads(x0, z, outer)
    for _ in range(3):
        v = v - 0.25 * (d.hyy(x0, z, inner) @ v - fz)
    close(y["z"], z)
    close(method.v["z"], v)
    close(x["x"], x0 - 0.2 * (fx - d.hxy(x0, z, inner).T @ v))


def test_f2sa_step_is_the_papers_update():
    f, g, x, y, _, inner, outer = tiny()
    d = Dense(f, g)
    x0, z = x["x"].clone(), y["z"].clone()
    penalty = z.clone()
    method = F2SA.from_functions(f, g, x, y, lr_inner=0.3, lr_outer=0.2, lam0=2.0,
                                 inner_steps=2)
    method.step(outer, inner)
    lam = 2.0
    for _ in range(2):
        z_new = z - 0.3 * d.gy(x0, z, inner)
        penalty = penalty - 0.3 / lam * (d.fgrads(x0, penalty, outer)[1]
                                         + lam * d.gy(x0, penalty, inner))
        z = z_new
    fx = d.fgrads(x0, penalty, outer)[0]
    close(y["z"], z)
    close(method.penalty["z"], penalty)
    close(x["x"], x0 - 0.2 * (fx + lam * (d.gx(x0, penalty, inner) - d.gx(x0, z, inner))))


def test_bome_step_is_the_papers_update():
    f, g, x, y, _, inner, outer = tiny()
    d = Dense(f, g)
    x0, z0 = x["x"].clone(), y["z"].clone()
    method = BOME.from_functions(f, g, x, y, lr_inner=0.3, lr_outer=0.2, eta=0.5,
                                 inner_steps=2)
    info = method.step(outer, inner)
    theta = z0
    for _ in range(2):
        theta = theta - 0.3 * d.gy(x0, theta, inner)
    qx, qz = d.gx(x0, z0, inner) - d.gx(x0, theta, inner), d.gy(x0, z0, inner)
    fx, fz = d.fgrads(x0, z0, outer)
    q2 = qx @ qx + qz @ qz
    lam = torch.clamp(0.5 * q2 - (fx @ qx + fz @ qz), min=0) / q2
    assert info.extra["lam"] == pytest.approx(float(lam), abs=1e-12)
    close(y["z"], z0 - 0.2 * (fz + lam * qz))
    close(x["x"], x0 - 0.2 * (fx + lam * qx))


# -- a BilevelProblem: G = ℓ(y) + λ r(x, y) ------------------------------------------------------


def _bilevel(regularizer):
    f, g, x, y, v, inner, outer = tiny()

    def lower_loss(lower, b):  # ℓ(y): the loss of the tiny problem, and a head read by f only
        return torch.nn.functional.softplus(-b["t"] * (b["a"] @ lower["w"])).mean() + 0.3 * (
            lower["head"] ** 2).sum()

    def upper_loss(upper, lower, b):
        return (torch.nn.functional.softplus(-b["t"] * (b["a"] @ lower["w"])).mean()
                + 0.05 * (upper["w"] ** 2).sum() + (upper["s"] * lower["head"]).sum())

    gen = torch.Generator().manual_seed(5)
    upper = {"w": torch.randn(3, generator=gen, dtype=F64), "s": torch.randn(2, generator=gen,
                                                                              dtype=F64)}
    lower = {"w": y["z"].clone(), "head": torch.randn(2, generator=gen, dtype=F64)}
    problem = ib.BilevelProblem(upper_loss, lower_loss, lam=0.7, regularizer=regularizer)
    return problem, upper, lower, inner, outer


def _flat(p):
    return torch.cat([t.reshape(-1) for t in p.values()])


def _unflat(flat, like):
    out, i = {}, 0
    for n, t in like.items():
        out[n] = flat[i:i + t.numel()].view_as(t)
        i += t.numel()
    return out


@pytest.mark.parametrize("kind", ["proximal", "general"])
@pytest.mark.parametrize("cls", [SOBA, SABA])
def test_a_bilevel_problem_step_is_the_papers_update(kind, cls):
    """``G = ℓ(y) + λ r(x, y)`` with ``ProximalL2`` (closed-form terms, exact in SABA) or a
    general ``Regularizer`` (``torch.func``), a lower name ``r`` does not couple."""
    if kind == "proximal":
        reg, r = ib.ProximalL2(["w"]), lambda u, l: 0.5 * ((u["w"] - l["w"]) ** 2).sum()
    else:
        def r(u, l):
            return 0.5 * (u["w"].exp() * l["w"] ** 2).sum() + (u["s"] * l["w"][:2]).sum()
        reg = ib.Regularizer(r, ["w"])
    problem, upper, lower, inner, outer = _bilevel(reg)
    x0, y0 = _flat(upper), _flat(lower)
    v0 = torch.linspace(-0.5, 0.5, y0.numel(), dtype=F64)
    extra = {"n_inner": 6, "n_outer": 5} if cls is SABA else {}
    method = cls(problem, upper, lower, lr_inner=0.3, lr_outer=0.2, **extra)
    for n, t in _unflat(v0, lower).items():
        method.v[n].copy_(t)
    method.step(outer, inner)

    def big_g(xf, yf):
        xx, yy = _unflat(xf, upper), _unflat(yf, lower)
        return problem.lower_loss(yy, inner) + 0.7 * r(xx, yy)

    gy = torch.func.grad(big_g, argnums=1)(x0, y0)
    hyy = torch.autograd.functional.hessian(lambda yf: big_g(x0, yf), y0)
    hxy = torch.autograd.functional.jacobian(
        lambda xf: torch.func.grad(big_g, argnums=1)(xf, y0), x0)
    fx, fy = torch.func.grad(lambda xf, yf: problem.upper_loss(
        _unflat(xf, upper), _unflat(yf, lower), outer), argnums=(0, 1))(x0, y0)
    close(_flat(lower), y0 - 0.3 * gy)
    close(_flat(method.v), v0 - 0.3 * (hyy @ v0 - fy))
    close(_flat(upper), x0 - 0.2 * (fx - hxy.T @ v0))


def test_a_bilevel_problem_that_damps_or_learns_lambda_is_refused():
    problem, upper, lower, _, _ = _bilevel(ib.ProximalL2(["w"]))
    damped = ib.BilevelProblem(problem.upper_loss, problem.lower_loss, lam=0.7,
                               ij=ib.ImplicitJacobian(damping=1.0))
    with pytest.raises(ValueError, match="undamped"):
        SOBA(damped, upper, lower, lr_inner=0.1, lr_outer=0.1)
    with pytest.raises(ValueError, match="learnable"):
        BilevelOracles(problem.upper_loss, problem.lower_loss, lam=ib.LearnableLambda(0.5))
    with pytest.raises(TypeError, match="BilevelProblem or BilevelOracles"):
        SOBA(object(), upper, lower, lr_inner=0.1, lr_outer=0.1)
