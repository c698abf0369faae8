"""The examples in ``examples/``: each hypergradient against a dense float64 reference computed
without the library, and each headline claim at a reduced size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import implicitbilevel as ib

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
F64 = torch.float64


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def logreg():
    return _load("logreg_feature_penalties")


@pytest.fixture(scope="module")
def cleaning():
    return _load("hyper_cleaning")


@pytest.fixture(scope="module")
def imaml():
    return _load("imaml_sinusoid")


# -- HOAG: per-feature penalties of a logistic regression -------------------------------------


def test_logreg_hypergradient_matches_the_closed_form(logreg):
    data = logreg.make_data()
    gen = torch.Generator().manual_seed(0)
    a = torch.empty(30, dtype=F64).uniform_(-5, 0, generator=gen)
    w = logreg.solve_inner(a, data)
    _, got = logreg.hypergradient(a, data, w)
    # dF/da_i = −e^{a_i} w_i [H⁻¹ ∇_w F]_i, H = Xᵀ diag(p(1−p)) X / n + diag(e^a, 0).
    x, t = data["x_tr"], data["t_tr"]
    p = torch.sigmoid(x @ w)
    penalty = torch.cat([a.exp(), torch.zeros(1, dtype=F64)])
    hess = (x.T * (p * (1 - p))) @ x / len(t) + torch.diag(penalty)
    xv, tv = data["x_val"], data["t_val"]
    grad_f = xv.T @ (torch.sigmoid(xv @ w) - tv) / len(tv)
    expected = -(a.exp() * w[:-1]) * torch.linalg.solve(hess, grad_f)[:-1]
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-12)


def test_logreg_held_out_loss_falls_and_beats_random_search(logreg, capsys):
    result = logreg.main(steps=15)
    history = result["history"]
    print(capsys.readouterr().out)
    assert history[-1] < 0.6 * history[0]
    assert all(b <= a + 1e-3 for a, b in zip(history, history[1:]))  # Adam, but nearly monotone
    assert result["hyper_best_val"] < result["search_best_val"]


# -- data hyper-cleaning ----------------------------------------------------------------------


def test_cleaning_hypergradient_matches_the_dense_reference(cleaning):
    data = cleaning.make_data(n_train=40, n_val=30)
    gen = torch.Generator().manual_seed(1)
    omega = torch.randn(40, generator=gen, dtype=F64)
    w = cleaning.solve_inner(omega, data)
    _, got = cleaning.hypergradient(omega, w, data, solver=ib.CG(max_iter=2000, tol=1e-12))

    d = w.shape[0]

    def g_flat(wf):
        return cleaning.inner_objective({"W": wf.reshape(d, 10)}, {"omega": omega}, data)

    hess = torch.autograd.functional.hessian(g_flat, w.reshape(-1))
    w_leaf = w.clone().requires_grad_(True)
    (grad_f,) = torch.autograd.grad(cleaning.val_loss(w_leaf, data), w_leaf)
    u = torch.linalg.solve(hess, grad_f.reshape(-1)).reshape(d, 10)
    # ∂(∇_W g)/∂ω_i = σ'(ω_i)/n · x_i (p_i − e_{t_i})ᵀ
    x, t = data["x_tr"], data["t_tr"]
    resid = torch.softmax(x @ w, 1) - torch.nn.functional.one_hot(t, 10).to(F64)
    sig = torch.sigmoid(omega)
    expected = -(sig * (1 - sig) / len(t)) * ((x @ u) * resid).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-12)


def test_cleaning_down_weights_the_corrupted_examples(cleaning, capsys):
    result = cleaning.main(n_train=200, steps=20)
    print(capsys.readouterr().out)
    assert result["corrupted_down"] > 0.8 and result["clean_down"] < 0.25
    assert result["acc_cleaned"] > result["acc_all"] + 0.15
    assert result["history"][-1] < 0.75 * result["history"][0]


# -- iMAML --------------------------------------------------------------------------------------


def _imaml_task(imaml, lam: float):
    theta = imaml.init_params(hidden=8, seed=0, dtype=F64)
    task = imaml.sample_task(torch.Generator().manual_seed(3), 10, F64)
    psi = imaml.adapt(theta, task, 300, 0.02, lam)

    def g_flat(f):
        return imaml.inner_objective(_unflat(f, psi), theta, task, lam)

    flat = _flat(psi)
    for _ in range(8):  # Newton's method to stationarity (97 unknowns)
        hess = torch.autograd.functional.hessian(g_flat, flat)
        flat = flat - torch.linalg.solve(hess, torch.func.grad(g_flat)(flat))
    psi = _unflat(flat, psi)
    grad = torch.func.grad(lambda q: imaml.inner_objective(q, theta, task, lam))(psi)
    assert sum(float(v.norm() ** 2) for v in grad.values()) ** 0.5 < 1e-10
    return theta, task, psi


def _flat(p):
    return torch.cat([v.reshape(-1) for v in p.values()])


def _unflat(f, like):
    out, i = {}, 0
    for n, v in like.items():
        out[n] = f[i:i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
def test_imaml_meta_gradient_matches_the_dense_reference(imaml, curvature):
    lam = 2.0
    theta, task, psi = _imaml_task(imaml, lam)
    x = {n: p.clone().requires_grad_(True) for n, p in theta.items()}
    ij = ib.ImplicitJacobian(ib.Dense(), curvature=imaml.GAUSS_NEWTON
                             if curvature == "gauss-newton" else "hessian")
    psi_star = ib.argmin(imaml.inner_objective, psi, x, task, lam, ij=ij)
    imaml.mse(psi_star, task["s_q"], task["t_q"]).backward()

    flat = _flat(psi)
    n = flat.numel()

    def support(f):
        return imaml.mse(_unflat(f, psi), task["s"], task["t"])

    if curvature == "hessian":
        curv = torch.autograd.functional.hessian(support, flat)
    else:  # Jᵀ (2/K) J: the Gauss–Newton matrix of the mean squared error
        jac = torch.autograd.functional.jacobian(lambda f: imaml.forward(_unflat(f, psi),
                                                                         task["s"]), flat)
        curv = jac.T @ jac * 2 / task["t"].shape[0]
    grad_f = torch.func.grad(lambda f: imaml.mse(_unflat(f, psi), task["s_q"], task["t_q"]))(flat)
    # The proximal term's mixed partial is −λI: dF/dθ = λ (C + λI)⁻¹ ∇_ψ F.
    expected = lam * torch.linalg.solve(curv + lam * torch.eye(n, dtype=F64), grad_f)
    torch.testing.assert_close(_flat({k: v.grad for k, v in x.items()}), expected, rtol=1e-7,
                               atol=1e-11)


def test_imaml_against_first_order_maml(imaml, capsys):
    result = imaml.main(steps=60, eval_tasks=20, tasks_per_step=4)
    print(capsys.readouterr().out)
    assert result["breakdowns"] == 0  # Gauss–Newton curvature: CG never meets negative curvature
    assert result["imaml"] < 0.8 * result["init_imaml"]
    assert result["fomaml"] < 0.8 * result["init_fomaml"]
    assert result["imaml"] < 1.25 * result["fomaml"]
