"""``implicitbilevel.argmin`` against hypergradients computed without the library: closed forms
(autograd through an explicit linear solve) and dense float64 implicit-function-theorem
references (``torch.autograd.functional.hessian`` / ``jacobian``)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitbilevel as ib
from implicitbilevel import (
    CG,
    MINRES,
    Dense,
    GaussNewton,
    ImplicitJacobian,
    Neumann,
    NystromPreconditioner,
    NystromSolver,
    SolverBreakdownError,
    argmin,
)

F64 = torch.float64
TIGHT = CG(max_iter=200, tol=1e-13)


def _spd(n: int, gen: torch.Generator, floor: float = 1.0) -> torch.Tensor:
    a = torch.randn(n, n, generator=gen, dtype=F64)
    return a @ a.T + floor * torch.eye(n, dtype=F64)


# -- random strongly convex quadratics ---------------------------------------------------------


class Quadratic:
    """``g(y, x) = ½ yᵀQy − yᵀ B tanh(x) + c·‖x‖² Σy``: ``y*(x) = Q⁻¹(B tanh x − c‖x‖² 1)``."""

    def __init__(self, n: int, m: int, coupling: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.q = _spd(n, gen)
        self.b = coupling * torch.randn(n, m, generator=gen, dtype=F64)
        self.c = coupling
        self.n, self.m = n, m
        self.x0 = torch.randn(m, generator=gen, dtype=F64)
        self.target = torch.randn(n, generator=gen, dtype=F64)

    def g(self, y: dict, x: dict) -> torch.Tensor:
        w = y["w"]
        return 0.5 * w @ self.q @ w - w @ (self.b @ torch.tanh(x["a"])) \
            + self.c * (x["a"] ** 2).sum() * w.sum()

    def solve(self, a: torch.Tensor) -> torch.Tensor:
        """Differentiable in ``a`` when ``a`` requires grad: the closed-form reference."""
        ones = torch.ones(self.n, dtype=F64)
        return torch.linalg.solve(self.q, self.b @ torch.tanh(a) - self.c * (a ** 2).sum() * ones)

    def upper(self, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return ((w - self.target) ** 2).sum() + (w ** 3).sum() + (a * w[: self.m].sum()).sum()

    def reference(self) -> torch.Tensor:
        a = self.x0.clone().requires_grad_(True)
        self.upper(self.solve(a), a).backward()
        return a.grad

    def implicit(self, ij: ImplicitJacobian, **kwargs) -> torch.Tensor:
        a = self.x0.clone().requires_grad_(True)
        w = argmin(self.g, {"w": self.solve(a.detach())}, {"a": a}, ij=ij, **kwargs)["w"]
        self.upper(w, a).backward()
        return a.grad


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 7), m=st.integers(1, 5), coupling=st.floats(0.05, 3.0),
       seed=st.integers(0, 10_000))
def test_quadratic_hypergradient_matches_closed_form(n, m, coupling, seed):
    quad = Quadratic(n, m, coupling, seed)
    expected = quad.reference()
    for solver in (TIGHT, Dense()):
        torch.testing.assert_close(quad.implicit(ImplicitJacobian(solver)), expected, rtol=1e-8,
                                   atol=1e-10)


def test_every_solver_agrees_with_the_closed_form():
    quad = Quadratic(6, 3, 1.0, seed=1)
    expected = quad.reference()
    eig = torch.linalg.eigvalsh(quad.q)
    alpha = float(1.0 / eig.max())
    solvers = [TIGHT, MINRES(max_iter=200, tol=1e-13), Dense(),
               Neumann(max_iter=20_000, alpha=alpha, tol=1e-14)]
    for solver in solvers:
        torch.testing.assert_close(quad.implicit(ImplicitJacobian(solver)), expected, rtol=1e-7,
                                   atol=1e-9, msg=lambda m, s=solver: f"{type(s).__name__}: {m}")


def test_damping_solves_the_ridged_system_and_enables_the_nystrom_solvers():
    quad = Quadratic(6, 3, 1.0, seed=2)
    delta = 0.7
    # Dense reference for the damped gradient: −Jᵀ(Q + δI)⁻¹ w with J = ∂(∇_y g)/∂a.
    a = quad.x0.clone()
    w_star = quad.solve(a)
    w_leaf = w_star.clone().requires_grad_(True)
    a_leaf = a.clone().requires_grad_(True)
    quad.upper(w_leaf, a_leaf).backward()
    cot, direct = w_leaf.grad, a_leaf.grad

    def grad_y(aa):
        return torch.func.grad(lambda ww: quad.g({"w": ww}, {"a": aa}))(w_star)

    mixed = torch.autograd.functional.jacobian(grad_y, a)  # (n, m)
    u = torch.linalg.solve(quad.q + delta * torch.eye(quad.n, dtype=F64), cot)
    expected = direct - mixed.T @ u
    for solver in (TIGHT, Dense(), NystromSolver(rank=6, measure_residual=True),
                   CG(max_iter=50, tol=1e-13, preconditioner=NystromPreconditioner(rank=3))):
        got = quad.implicit(ImplicitJacobian(solver, damping=delta))
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    # Undamped, the system is ∇²g, not I + H/μ: the Nyström solvers refuse it.
    with pytest.raises(ValueError, match="I \\+ H/μ"):
        quad.implicit(ImplicitJacobian(NystromSolver(rank=6)))


def test_gradcheck_through_the_inner_solve():
    quad = Quadratic(4, 3, 0.8, seed=3)

    def y_star(a):
        return argmin(quad.g, {"w": quad.solve(a.detach())}, {"a": a},
                      ij=ImplicitJacobian(Dense()))["w"]

    a = quad.x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(y_star, (a,), eps=1e-6, atol=1e-7, rtol=1e-6)


# -- a small tanh network solved to stationarity -----------------------------------------------


class TanhNet:
    """``g(y, x) = mean((tanh(Z W + b) v − t)²) + ½ e^s (‖W‖² + ‖v‖²)`` with ``x = {b, s}``."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.z = torch.randn(12, 3, generator=gen, dtype=F64)
        self.t = torch.randn(12, generator=gen, dtype=F64)
        self.z_val = torch.randn(10, 3, generator=gen, dtype=F64)
        self.t_val = torch.randn(10, generator=gen, dtype=F64)
        self.x = {"b": 0.3 * torch.randn(4, generator=gen, dtype=F64),
                  "s": torch.tensor(-1.0, dtype=F64)}
        self.y0 = {"W": 0.3 * torch.randn(3, 4, generator=gen, dtype=F64),
                   "v": 0.3 * torch.randn(4, generator=gen, dtype=F64)}

    def g(self, y: dict, x: dict) -> torch.Tensor:
        pred = torch.tanh(self.z @ y["W"] + x["b"]) @ y["v"]
        decay = 0.5 * torch.exp(x["s"]) * ((y["W"] ** 2).sum() + (y["v"] ** 2).sum())
        return ((pred - self.t) ** 2).mean() + decay

    def upper(self, y: dict, x: dict) -> torch.Tensor:
        pred = torch.tanh(self.z_val @ y["W"] + x["b"]) @ y["v"]
        return ((pred - self.t_val) ** 2).mean()

    def flat(self, y: dict) -> torch.Tensor:
        return torch.cat([y["W"].reshape(-1), y["v"]])

    def unflat(self, f: torch.Tensor) -> dict:
        return {"W": f[:12].reshape(3, 4), "v": f[12:]}

    def solve(self) -> dict:
        """L-BFGS, then Newton's method on the dense Hessian to ``‖∇g‖ < 1e-12``."""
        f = self.flat(self.y0).clone().requires_grad_(True)

        def obj(ff):
            return self.g(self.unflat(ff), self.x)

        opt = torch.optim.LBFGS([f], max_iter=500, tolerance_grad=1e-10, tolerance_change=0,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = obj(f)
            value.backward()
            return value

        opt.step(closure)
        f = f.detach()
        for _ in range(5):
            hess = torch.autograd.functional.hessian(obj, f)
            assert torch.linalg.eigvalsh(hess).min() > 1e-3  # a strict local minimum
            f = f - torch.linalg.solve(hess, torch.func.grad(obj)(f))
        assert torch.func.grad(obj)(f).norm() < 1e-12
        return self.unflat(f)

    def reference(self, y: dict) -> dict:
        """``dF/dx = ∇_x f − (∂∇_y g/∂x)ᵀ H⁻¹ ∇_y f``, all dense."""
        fy = self.flat(y)
        names = list(self.x)
        sizes = [self.x[n].numel() for n in names]
        fx = torch.cat([self.x[n].reshape(-1) for n in names])

        def unx(ff):
            parts = torch.split(ff, sizes)
            return {n: p.reshape(self.x[n].shape) for n, p in zip(names, parts)}

        hess = torch.autograd.functional.hessian(lambda yy: self.g(self.unflat(yy), self.x), fy)
        mixed = torch.autograd.functional.jacobian(
            lambda xx: torch.func.grad(lambda yy: self.g(self.unflat(yy), unx(xx)))(fy), fx)
        grad_fy, grad_fx = torch.autograd.functional.jacobian(
            lambda yy, xx: self.upper(self.unflat(yy), unx(xx)), (fy, fx))
        total = grad_fx - mixed.T @ torch.linalg.solve(hess, grad_fy)
        return unx(total)


@pytest.fixture(scope="module")
def tanh_net():
    net = TanhNet()
    return net, net.solve()


def _implicit_grads(net: TanhNet, y: dict, ij: ImplicitJacobian, **kwargs) -> dict:
    x = {n: t.clone().requires_grad_(True) for n, t in net.x.items()}
    y_star = argmin(net.g, y, x, ij=ij, **kwargs)
    net.upper(y_star, x).backward()
    return {n: t.grad for n, t in x.items()}


def test_tanh_network_matches_the_dense_reference(tanh_net):
    net, y = tanh_net
    expected = net.reference(y)
    # The Hessian at this minimum is positive definite (Newton converged): CG applies.
    got = _implicit_grads(net, y, ImplicitJacobian(TIGHT))
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-8, atol=1e-11)


def test_every_hvp_mode_and_the_kept_graph_agree(tanh_net):
    net, y = tanh_net
    expected = net.reference(y)
    variants = [dict(reuse_graph=True)] + [
        dict(reuse_graph=False, hvp_mode=m)
        for m in ("auto", "forward-over-reverse", "reverse-over-reverse")
    ]
    for kwargs in variants:
        got = _implicit_grads(net, y, ImplicitJacobian(MINRES(max_iter=200, tol=1e-13), **kwargs))
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-8, atol=1e-11,
                                       msg=lambda m, k=kwargs: f"{k}: {m}")


def test_solve_record_reaches_the_caller(tanh_net):
    net, y = tanh_net
    records = []
    got = _implicit_grads(net, y, ImplicitJacobian(TIGHT), on_solve=records.append)
    (record,) = records
    assert record.info.converged and record.info.breakdown is None
    assert record.info.iterations == record.system.products >= 1  # one product per CG step
    assert record.true_relative_residual() < 1e-10
    assert record.system.products == record.info.iterations + 1
    assert set(record.u) == {"W", "v"}
    # The record's gradients are the implicit part only; b also enters f directly.
    torch.testing.assert_close(record.grads["s"], got["s"])


def test_gauss_newton_curvature_equals_the_hessian_for_linear_outputs():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(15, 4, generator=gen, dtype=F64)
    t = torch.randn(15, 2, generator=gen, dtype=F64)

    def outputs(y, x):  # linear in y: Gauss–Newton = Hessian
        return torch.cat([(z @ y["w"]).reshape(-1), torch.exp(0.5 * x["s"]) * y["w"].reshape(-1)])

    def output_loss(o, x):
        return 0.5 * ((o[:45] - (t @ x["m"]).reshape(-1)) ** 2).sum() + 0.5 * (o[45:] ** 2).sum()

    def g(y, x):
        return output_loss(outputs(y, x), x)

    s, m = torch.tensor(0.2, dtype=F64), torch.randn(2, 3, generator=gen, dtype=F64)

    def closed(s_, m_):  # (ZᵀZ + e^s I) W = Zᵀ T M
        return torch.linalg.solve(z.T @ z + torch.exp(s_) * torch.eye(4, dtype=F64), z.T @ t @ m_)

    def upper(w):
        return (torch.sin(w) ** 2).sum()

    s_ref, m_ref = s.clone().requires_grad_(True), m.clone().requires_grad_(True)
    upper(closed(s_ref, m_ref)).backward()
    x = {"s": s.clone().requires_grad_(True), "m": m.clone().requires_grad_(True)}
    w = argmin(g, {"w": closed(s, m)}, x,
               ij=ImplicitJacobian(TIGHT, curvature=GaussNewton(outputs, output_loss)))["w"]
    upper(w).backward()
    torch.testing.assert_close(x["s"].grad, s_ref.grad, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(x["m"].grad, m_ref.grad, rtol=1e-8, atol=1e-11)


# -- composition ------------------------------------------------------------------------------


def test_two_chained_inner_problems():
    gen = torch.Generator().manual_seed(5)
    q1, q2 = _spd(4, gen), _spd(3, gen)
    b1, b2 = torch.randn(4, 2, generator=gen, dtype=F64), torch.randn(3, 4, generator=gen,
                                                                         dtype=F64)
    x0 = torch.randn(2, generator=gen, dtype=F64)

    def g1(y, x):  # y1* = Q1⁻¹ B1 sin(x)
        return 0.5 * y["y1"] @ q1 @ y["y1"] - y["y1"] @ (b1 @ torch.sin(x["x"]))

    def g2(y, x):  # y2* = Q2⁻¹ B2 y1³
        return 0.5 * y["y2"] @ q2 @ y["y2"] - y["y2"] @ (b2 @ x["y1"] ** 3)

    def upper(y2, x):
        return (y2 ** 2).sum() * x.sum()

    x_ref = x0.clone().requires_grad_(True)
    y1_ref = torch.linalg.solve(q1, b1 @ torch.sin(x_ref))
    upper(torch.linalg.solve(q2, b2 @ y1_ref ** 3), x_ref).backward()

    x = x0.clone().requires_grad_(True)
    y1_star = argmin(g1, {"y1": torch.linalg.solve(q1, b1 @ torch.sin(x0))}, {"x": x},
                     ij=ImplicitJacobian(TIGHT))["y1"]
    y1_val = y1_star.detach()
    y2_star = argmin(g2, {"y2": torch.linalg.solve(q2, b2 @ y1_val ** 3)}, {"y1": y1_star},
                     ij=ImplicitJacobian(TIGHT))["y2"]
    upper(y2_star, x).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12)


def test_several_inner_problems_and_y_star_used_twice_with_torch_optim():
    quad_a, quad_b = Quadratic(5, 3, 1.0, seed=6), Quadratic(4, 3, 0.5, seed=7)
    x0 = quad_a.x0.clone()

    def loss_ref(a):
        wa, wb = quad_a.solve(a), quad_b.solve(a)
        return (wa ** 2).sum() * wa.sum() + torch.cos(wb).sum() + (wb * wb.flip(0)).sum()

    a_ref = x0.clone().requires_grad_(True)
    loss_ref(a_ref).backward()

    a = x0.clone().requires_grad_(True)
    opt = torch.optim.SGD([a], lr=0.01)
    opt.zero_grad()
    wa = argmin(quad_a.g, {"w": quad_a.solve(a.detach())}, {"a": a},
                ij=ImplicitJacobian(TIGHT))["w"]
    wb = argmin(quad_b.g, {"w": quad_b.solve(a.detach())}, {"a": a},
                ij=ImplicitJacobian(Dense()))["w"]
    loss = (wa ** 2).sum() * wa.sum() + torch.cos(wb).sum() + (wb * wb.flip(0)).sum()
    loss.backward()
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-9, atol=1e-12)
    opt.step()
    torch.testing.assert_close(a.detach(), x0 - 0.01 * a_ref.grad, rtol=1e-12, atol=1e-14)


def test_upper_loss_of_any_shape_through_torch_autograd_grad():
    quad = Quadratic(5, 3, 1.0, seed=8)
    a = quad.x0.clone().requires_grad_(True)
    w = argmin(quad.g, {"w": quad.solve(a.detach())}, {"a": a},
               ij=ImplicitJacobian(Dense()))["w"]
    cot = torch.randn(2, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = torch.stack([w, w ** 2])  # a (2, 5) "loss"
    (got,) = torch.autograd.grad(out, a, grad_outputs=cot)
    a_ref = quad.x0.clone().requires_grad_(True)
    w_ref = quad.solve(a_ref)
    (expected,) = torch.autograd.grad(torch.stack([w_ref, w_ref ** 2]), a_ref, grad_outputs=cot)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_reducer_sees_the_rhs_every_product_and_the_mixed_term():
    quad = Quadratic(5, 3, 1.0, seed=9)
    seen = []

    def double(tree):  # a stand-in for an all-reduce over two ranks that sum instead of average
        seen.append(sorted(tree))
        return {k: 2 * v for k, v in tree.items()}

    # A ← 2A, v ← 2v, mixed ← 2·mixed: the implicit part doubles relative to the plain one.
    records = []
    # The stationarity check (a gradient and a product, reduced too) is off here so that the
    # count below is that of the solve alone; tests/test_argmin_premises.py covers it.
    quad.implicit(ImplicitJacobian(Dense()), reducer=double, on_solve=records.append,
                  on_nonstationary="ignore")
    quad.implicit(ImplicitJacobian(Dense()), on_solve=records.append)
    torch.testing.assert_close(records[0].grads["a"], 2 * records[1].grads["a"], rtol=1e-9,
                               atol=1e-12)
    torch.testing.assert_close(records[0].u["w"], records[1].u["w"], rtol=1e-9, atol=1e-12)
    assert seen[0] == ["w"] and seen[-1] == ["a"] and len(seen) == 2 + 5  # rhs, 5 columns, mixed


# -- breakdowns and errors --------------------------------------------------------------------


def _saddle():
    """An indefinite inner Hessian: ``y`` is a saddle point of ``g`` (still a stationary point,
    so the implicit function theorem holds and MINRES recovers the gradient)."""
    q = torch.diag(torch.tensor([2.0, 1.0, -1.5, 3.0], dtype=F64))
    b = torch.arange(12, dtype=F64).reshape(4, 3) / 10 - 0.5
    x0 = torch.tensor([0.3, -0.2, 0.5], dtype=F64)

    def g(y, x):
        return 0.5 * y["w"] @ q @ y["w"] - y["w"] @ (b @ x["a"])

    def solve(a):
        return torch.linalg.solve(q, b @ a)

    return g, solve, x0


def _saddle_grad(ij: ImplicitJacobian):
    g, solve, x0 = _saddle()
    a = x0.clone().requires_grad_(True)
    w = argmin(g, {"w": solve(x0)}, {"a": a}, ij=ij)["w"]
    (w.sum() + w[2] * 3).backward()
    return a.grad


def test_breakdown_policy_on_an_indefinite_inner_hessian():
    g, solve, x0 = _saddle()
    a_ref = x0.clone().requires_grad_(True)
    w_ref = solve(a_ref)
    (w_ref.sum() + w_ref[2] * 3).backward()

    cg = CG(max_iter=20, tol=1e-12)
    with pytest.raises(SolverBreakdownError, match="argmin implicit solve broke down") as err:
        _saddle_grad(ImplicitJacobian(cg))
    assert err.value.info.breakdown is not None
    with pytest.warns(RuntimeWarning, match="broke down"):
        _saddle_grad(ImplicitJacobian(cg, on_breakdown="warn"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _saddle_grad(ImplicitJacobian(cg, on_breakdown="ignore"))
        got = _saddle_grad(ImplicitJacobian(MINRES(max_iter=50, tol=1e-13)))
    torch.testing.assert_close(got, a_ref.grad, rtol=1e-9, atol=1e-12)


def test_clear_errors():
    quad = Quadratic(3, 2, 1.0, seed=10)
    a = quad.x0.clone().requires_grad_(True)
    y = {"w": quad.solve(a.detach())}
    with pytest.raises(ValueError, match="scalar tensor, got \\(3,\\)"):
        argmin(lambda y_, x_: y_["w"] * 2, y, {"a": a})
    with pytest.raises(TypeError, match="non-empty dict"):
        argmin(quad.g, y["w"], {"a": a})
    with pytest.raises(TypeError, match="non-empty dict"):
        argmin(quad.g, y, {})
    with pytest.raises(TypeError, match="floating-point"):
        argmin(quad.g, {"w": torch.ones(3, dtype=torch.long)}, {"a": a})
    with pytest.raises(TypeError, match="LinearSolver"):
        argmin(quad.g, y, {"a": a}, ij=ImplicitJacobian(torch.linalg.solve))
    with pytest.raises(TypeError, match="curvature"):
        argmin(quad.g, y, {"a": a}, ij=ImplicitJacobian(curvature="fisher"))
    with pytest.raises(ValueError, match="on_breakdown"):
        argmin(quad.g, y, {"a": a}, ij=ImplicitJacobian(on_breakdown="retry"))
    with pytest.raises(ValueError, match="damping"):
        argmin(quad.g, y, {"a": a}, ij=ImplicitJacobian(damping=-1.0))
    with pytest.raises(ValueError, match="pass such tensors in x"):
        argmin(lambda y_, x_, s: quad.g(y_, x_) * s, y, {"a": a}, a.sum())
    with pytest.raises(ib.NonFiniteError, match="inner objective"):
        argmin(lambda y_, x_: quad.g(y_, x_) * float("nan"), y, {"a": a})
    # The value is y itself and x without grad gives outputs without grad.
    out = argmin(quad.g, y, {"a": a.detach()})
    assert not out["w"].requires_grad and torch.equal(out["w"], y["w"])


def test_readme_argmin_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "argmin(" in b]
    assert blocks, "the README's Usage section shows implicitbilevel.argmin"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    X, t, Xv, tv = (namespace[k] for k in ("X", "t", "Xv", "tv"))
    log_lam = torch.zeros((), requires_grad=True)
    n, d = X.shape
    w = torch.linalg.solve(X.T @ X / n + log_lam.exp() * torch.eye(d), X.T @ t / n)
    ((Xv @ w - tv) ** 2).mean().backward()
    torch.testing.assert_close(namespace["x"]["log_lam"].grad, log_lam.grad, rtol=1e-4,
                               atol=1e-6)
    assert namespace["records"][0].info.converged
