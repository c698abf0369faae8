"""Tests of :mod:`implicitbilevel.solvers.recycled` and :mod:`implicitbilevel.solvers.lanczos`.

Every system is ``A = D + H/μ`` as the library forms it (the real
:class:`~implicitbilevel.implicit_jacobian.IJSystem`), over a parameter dict of three tensors of
different shapes, in float64. ``H`` is either a dense symmetric matrix with a chosen spectrum
(:class:`DenseCurvature`, which counts its products) or the exact Hessian of a tiny tanh MLP
(:class:`~implicitbilevel.HessianOperator`). Every assertion is against an independent dense
oracle: ``torch.linalg.solve`` for solutions, ``numpy.linalg.eigh`` for eigenpairs, the dense
``M = D + VΛ₊Vᵀ/μ`` for the preconditioner.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from implicitbilevel import (
    CG,
    MINRES,
    HessianOperator,
    IJSystem,
    LanczosDeflation,
    LanczosPreconditioner,
    LanczosSolver,
    LinearSolver,
    RecycledCG,
    RecycledMINRES,
    lanczos_eigenpairs,
)
from implicitbilevel.tree import tree_flatten, tree_unflatten

F64 = torch.float64


class DenseCurvature:
    """``z ↦ H z`` for a dense symmetric ``H`` over a parameter dict; counts single and batched
    products (``calls`` counts every product, as the library's operators do)."""

    def __init__(self, h: torch.Tensor):
        n = h.shape[0]
        self.h = h
        self.params = {"weight": torch.zeros(2, 5, dtype=F64),
                       "bias": torch.zeros(n - 18, dtype=F64),
                       "conv": torch.zeros(2, 2, 2, dtype=F64)}
        self.names = list(self.params)
        self.memo: dict = {}
        self.calls = 0

    def __call__(self, t):
        self.calls += 1
        return tree_unflatten(self.h @ tree_flatten({n: t[n] for n in self.names}), self.params)

    def batched(self, ts):
        k = next(iter(ts.values())).shape[0]
        self.calls += k
        rows = torch.cat([ts[n].reshape(k, -1) for n in self.names], dim=1) @ self.h
        sizes = [p.numel() for p in self.params.values()]
        return {n: c.reshape(k, *self.params[n].shape)
                for n, c in zip(self.names, torch.split(rows, sizes, dim=1))}


def symmetric(spectrum, seed: int) -> torch.Tensor:
    """``Q diag(spectrum) Qᵀ`` with a random orthogonal ``Q``."""
    spectrum = torch.as_tensor(spectrum, dtype=F64)
    n = spectrum.shape[0]
    q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed),
                                    dtype=F64)).Q
    return 0.5 * ((q * spectrum) @ q.T + ((q * spectrum) @ q.T).T)


def system_of(h: torch.Tensor, mu: float = 1.0) -> tuple[IJSystem, DenseCurvature, torch.Tensor]:
    """The IJ system ``I + H/μ``, its curvature and the dense ``A``."""
    curvature = DenseCurvature(h)
    a = torch.eye(h.shape[0], dtype=F64) + h / mu
    return IJSystem(curvature, mu, identity=curvature.names), curvature, a


def curvature_for(a_spectrum, seed: int) -> torch.Tensor:
    """``H`` such that ``A = I + H`` (μ = 1) has the eigenvalues ``a_spectrum``."""
    return symmetric(torch.as_tensor(a_spectrum, dtype=F64) - 1.0, seed)


def tree(x: torch.Tensor, curvature: DenseCurvature) -> dict:
    return tree_unflatten(x.clone(), curvature.params)


def rel(x, y) -> float:
    return float((x - y).norm() / y.norm())


def spectra(n: int, kind: str) -> torch.Tensor:
    """``A``'s eigenvalues: positive definite (condition 820) or indefinite (condition 41)."""
    base = torch.linspace(1.0, 41.0, n, dtype=F64)
    if kind == "spd":
        return torch.cat([torch.tensor([0.05, 0.1, 0.15], dtype=F64), base[3:]])
    return torch.where(torch.arange(n) % 3 == 0, -0.3 * base, base)


# ----------------------------------------------------------------------------- solutions


@pytest.mark.parametrize("solver_cls,kind,preconditioned", [
    (RecycledCG, "spd", False), (RecycledMINRES, "spd", False),
    (RecycledMINRES, "indefinite", False), (RecycledCG, "spd", True),
    (RecycledMINRES, "indefinite", True)])
def test_recycled_solutions_match_a_dense_solve(solver_cls, kind, preconditioned):
    n = 60
    system, curvature, a = system_of(curvature_for(spectra(n, kind), seed=1))
    pre = LanczosPreconditioner(rank=4, products=20) if preconditioned else None
    solver = solver_cls(max_iter=400, tol=1e-14, recycle_dim=6, preconditioner=pre)
    assert isinstance(solver, LinearSolver)
    g = torch.Generator().manual_seed(2)
    for i in range(5):
        b = torch.randn(n, generator=g, dtype=F64)
        x, info = solver(system, tree(b, curvature))
        assert info.breakdown is None
        assert rel(tree_flatten(x), torch.linalg.solve(a, b)) < 1e-10
        assert info.iterations <= 400
        stats = solver.last_stats
        assert stats.solve_index == i and stats.deflated == (0 if i == 0 else 6)
        assert (stats.products_saved is None) == (i == 0)
    assert solver.state_dict() == {}  # the recycle space is per operator, never checkpointed


@pytest.mark.parametrize("n_c", [3, 5, 12])
def test_truncated_recycled_minres_reports_its_true_residual(n_c):
    """At a fixed budget (the thesis's N_c, tol = 0) the deflated solve spends exactly N_c
    products, and its reported residual (MINRES's recurrence, with the Galerkin part added
    without a product) is ‖b − A x‖."""
    n = 60
    system, curvature, a = system_of(curvature_for(spectra(n, "indefinite"), seed=1))
    g = torch.Generator().manual_seed(2)
    solver = RecycledMINRES(max_iter=n_c, recycle_dim=6, window=4)
    for _ in range(5):
        b = torch.randn(n, generator=g, dtype=F64)
        before = curvature.calls
        x, info = solver(system, tree(b, curvature))
        assert info.iterations == curvature.calls - before == n_c
        true = float((b - a @ tree_flatten(x)).norm())
        assert info.residual_norm == pytest.approx(true, rel=1e-9)
    assert solver.last_stats.deflated == 6


def test_warm_start_and_x0_count_their_product():
    system, curvature, a = system_of(curvature_for(spectra(40, "spd"), seed=3))
    b = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=F64)
    solver = RecycledMINRES(max_iter=200, tol=1e-13)
    x, _ = solver(system, tree(b, curvature))
    x2, info = solver(system, tree(b, curvature), x0=x)
    assert info.iterations >= 1 and rel(tree_flatten(x2), torch.linalg.solve(a, b)) < 1e-10


def _products(solver, system, curvature, a, rhs) -> list[int]:
    used = []
    for b in rhs:
        before = curvature.calls
        x, info = solver(system, tree(b, curvature))
        used.append(curvature.calls - before)
        assert info.iterations == used[-1]  # SolveInfo counts every product
        assert info.breakdown is None
        assert rel(a @ tree_flatten(x), b) < 1e-7  # the true residual, densely
    return used


@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_fewer_products_when_right_hand_sides_share_a_dominant_subspace(kind):
    """Right-hand sides mostly in the span of the eigenvectors of A's 5 eigenvalues nearest zero
    (1e-3 in magnitude): a Krylov solve must resolve them every time; the recycled space keeps
    them, and later solves on the same operator need far fewer products."""
    n = 80
    near_zero = torch.tensor([1e-3, 1.2e-3, 1.4e-3, 2e-3, 2.2e-3], dtype=F64)
    rest = torch.linspace(1.0, 60.0, n - 5, dtype=F64)
    if kind != "spd":
        near_zero[3:] *= -1
        rest = torch.where(torch.arange(n - 5) % 3 == 0, -rest, rest)
    h = curvature_for(torch.cat([near_zero, rest]), seed=4)
    eigenvalues, vectors = torch.linalg.eigh(torch.eye(n, dtype=F64) + h)
    dominant = vectors[:, eigenvalues.abs().argsort()[:5]]
    g = torch.Generator().manual_seed(5)
    rhs = [dominant @ torch.randn(5, generator=g, dtype=F64)
           + 1e-3 * torch.randn(n, generator=g, dtype=F64) for _ in range(6)]
    plain_cls, recycled_cls = (CG, RecycledCG) if kind == "spd" else (MINRES, RecycledMINRES)
    system, curvature, a = system_of(h)
    plain = _products(plain_cls(max_iter=500, tol=1e-8), system, curvature, a, rhs)
    recycled_solver = recycled_cls(max_iter=500, tol=1e-8, recycle_dim=8)
    recycled = _products(recycled_solver, system, curvature, a, rhs)
    assert recycled[0] == plain[0]  # the first solve is the plain one
    assert max(recycled[1:]) < 0.75 * min(plain[1:])
    assert sum(recycled) < 0.8 * sum(plain)
    assert recycled_solver.last_products_saved == recycled[0] - recycled[-1] > 0


def test_a_new_operator_invalidates_the_recycle_space():
    h1 = curvature_for(spectra(40, "spd"), seed=6)
    h2 = curvature_for(spectra(40, "spd"), seed=7)
    system1, c1, _ = system_of(h1)
    b = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=F64)
    solver = RecycledCG(max_iter=200, tol=1e-12, recycle_dim=4)
    solver(system1, tree(b, c1))
    solver(system1, tree(b, c1))
    assert solver.last_stats.deflated == 4
    # Another IJSystem on the same curvature and μ (as every upper step builds): same operator.
    solver(IJSystem(c1, 1.0, identity=c1.names), tree(b, c1))
    assert solver.last_stats.deflated == 4
    for system, a in [(IJSystem(c1, 2.0, identity=c1.names), torch.eye(40, dtype=F64) + h1 / 2),
                      system_of(h2)[0::2]]:
        solver.prepare(system)
        assert solver.recycled_dim == 0
        x, info = solver(system, tree(b, c1))
        assert solver.last_stats.deflated == 0 and solver.last_stats.solve_index == 0
        assert rel(tree_flatten(x), torch.linalg.solve(a, b)) < 1e-10
    # A plain callable is its own operator; reset() forgets the space explicitly.
    a = torch.eye(40, dtype=F64) + h2

    def matvec(v):
        return tree_unflatten(a @ tree_flatten(v), c1.params)

    solver(matvec, tree(b, c1))
    solver(matvec, tree(b, c1))
    assert solver.last_stats.deflated == 4
    solver.reset()
    assert solver.recycled_dim == 0


# ----------------------------------------------------------------------------- Lanczos


def test_lanczos_eigenpairs_against_eigh():
    n = 40
    spectrum = torch.cat([torch.tensor([-9.0, -7.5, 12.0, 10.0, 8.0], dtype=F64),
                          torch.linspace(-1.0, 1.0, n - 5, dtype=F64)])
    h = symmetric(spectrum, seed=8)
    curvature = DenseCurvature(h)
    pairs = lanczos_eigenpairs(curvature.batched, curvature.params, 5, products=30, block=3)
    assert pairs.products == 30 and curvature.calls == 30
    lam, vec = np.linalg.eigh(h.numpy())
    order = np.argsort(-np.abs(lam))[:5]
    expected = np.sort(lam[order])[::-1]
    np.testing.assert_allclose(pairs.eigenvalues.numpy(), expected, rtol=1e-8)
    basis = torch.stack([tree_flatten({k: t[i] for k, t in pairs.basis.items()})
                         for i in range(5)])
    np.testing.assert_allclose((basis @ basis.T).numpy(), np.eye(5), atol=1e-12)
    for i, j in enumerate(order[np.argsort(-lam[order])]):  # same eigenvectors up to sign
        assert abs(abs(float(basis[i] @ torch.from_numpy(vec[:, j]))) - 1) < 1e-8
    assert float(pairs.residual_norms.max()) < 1e-6
    assert pairs.smallest == pytest.approx(lam[0], rel=1e-10)
    assert pairs.largest == pytest.approx(lam[-1], rel=1e-10)


def test_lanczos_preconditioner_is_spd_and_keeps_minres_residual_monotone():
    n, mu = 60, 2.0
    spectrum = torch.cat([torch.tensor([400.0, 250.0, 150.0, 90.0, -1.5, -1.2], dtype=F64),
                          torch.linspace(-1.0, 4.0, n - 6, dtype=F64)])
    system, curvature, a = system_of(symmetric(spectrum, seed=9), mu)
    pre = LanczosPreconditioner(rank=6, products=40)
    apply = pre(system)
    eye = torch.eye(n, dtype=F64)
    m_inv = torch.stack([tree_flatten(apply(tree(eye[i], curvature))) for i in range(n)])
    pairs = pre.eigenpairs(system)
    v = torch.stack([tree_flatten({k: t[i] for k, t in pairs.basis.items()}) for i in range(6)])
    m = eye + (v.T * pairs.eigenvalues.clamp(min=0)) @ v / mu
    np.testing.assert_allclose(m_inv.numpy(), torch.linalg.inv(m).numpy(), atol=1e-12)
    assert float(torch.linalg.eigvalsh(0.5 * (m + m.T)).min()) >= 1.0 - 1e-12  # M ⪰ D = I
    b = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=F64)
    x_star = torch.linalg.solve(a, b)
    m_norm = []
    for k in range(1, 16):
        x, _ = MINRES(max_iter=k, preconditioner=pre)(system, tree(b, curvature))
        r = b - a @ tree_flatten(x)
        m_norm.append(float(r @ (m_inv @ r)) ** 0.5)
    assert all(later <= earlier * (1 + 1e-10) for earlier, later in zip(m_norm, m_norm[1:]))
    precond = MINRES(max_iter=200, tol=1e-12, preconditioner=pre)
    x, info = precond(system, tree(b, curvature))
    _, plain = MINRES(max_iter=200, tol=1e-12)(system, tree(b, curvature))
    assert rel(tree_flatten(x), x_star) < 1e-10 and info.iterations < plain.iterations


def test_lanczos_woodbury_and_deflation_and_their_refusals():
    n = 50
    spectrum = torch.cat([torch.tensor([30.0, -15.0, 9.0, -4.0], dtype=F64),
                          torch.zeros(n - 4, dtype=F64)])  # rank 4: Woodbury is exact
    h = symmetric(spectrum, seed=10)
    system, curvature, a = system_of(h, mu=20.0)
    b = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=F64)
    x, info = LanczosSolver(rank=4, products=12, measure_residual=True, tol=1e-10)(
        system, tree(b, curvature))
    assert rel(tree_flatten(x), torch.linalg.solve(a, b)) < 1e-10 and info.converged
    solver = RecycledMINRES(max_iter=50, tol=1e-13, deflation=LanczosDeflation(rank=4, products=12))
    x, info = solver(system, tree(b, curvature))
    assert solver.last_stats.deflated == 4 and info.iterations <= 2  # A is I off the deflated span
    assert rel(tree_flatten(x), torch.linalg.solve(a, b)) < 1e-10
    # μ = 10: 1 + λ_min/μ = −0.5, A indefinite: Woodbury and deflated CG refuse, naming λ_min.
    system10 = IJSystem(curvature, 10.0, identity=curvature.names)
    for refuse in (LanczosSolver(rank=4, products=12),
                   RecycledCG(deflation=LanczosDeflation(rank=4, products=12))):
        with pytest.raises(ValueError, match=r"λ_min = -15.*1 \+ λ_min/μ = -0.5"):
            refuse(system10, tree(b, curvature))
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        LanczosPreconditioner(rank=1, products=12)(
            system_of(symmetric(-spectrum.abs(), seed=11))[0])
    deflated = RecycledMINRES(max_iter=50, tol=1e-13, deflation=LanczosDeflation(rank=4,
                                                                                 products=12))
    x, _ = deflated(system10, tree(b, curvature))  # MINRES deflates either sign
    a10 = torch.eye(n, dtype=F64) + h / 10
    assert rel(tree_flatten(x), torch.linalg.solve(a10, b)) < 1e-10


def test_settings_are_validated():
    for bad in ({"recycle_dim": -1}, {"window": 0}, {"update": 1}, {"deflation": 3}):
        with pytest.raises((ValueError, TypeError)):
            RecycledMINRES(**bad)
    with pytest.raises(ValueError):
        LanczosPreconditioner(rank=0)
    with pytest.raises(ValueError):
        LanczosSolver(rank=4, products=2)
    with pytest.raises(ValueError, match="IJSystem"):
        LanczosPreconditioner(rank=2)(lambda v: v)
    system, curvature, _ = system_of(curvature_for(spectra(30, "spd"), seed=2))
    for solver_cls in (RecycledCG, RecycledMINRES):
        b = torch.full((30,), float("nan"), dtype=F64)
        _, info = solver_cls(max_iter=10)(system, tree(b, curvature))
        assert not info.converged and "non-finite" in info.breakdown


# ----------------------------------------------------------------------------- a real network


def _mlp():
    g = torch.Generator().manual_seed(0)
    shapes = {"w1": (6, 3), "b1": (6,), "w2": (2, 6), "b2": (2,), "x": (16, 3), "y": (16, 2)}
    params = {k: torch.randn(shape, generator=g, dtype=F64) for k, shape in shapes.items()}
    x, y = params.pop("x"), params.pop("y")

    def loss(p, x, y):
        return ((torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"] - y) ** 2).mean()

    return HessianOperator(loss, params, x, y), params


def test_tiny_tanh_mlp_hessian():
    op, params = _mlp()
    n = sum(p.numel() for p in params.values())
    eye = torch.eye(n, dtype=F64)
    h = torch.stack([tree_flatten(op(tree_unflatten(eye[i], params))) for i in range(n)])
    h = 0.5 * (h + h.T)
    lam = np.linalg.eigvalsh(h.numpy())
    mu = float(-lam[0]) / 1.5  # 1 + λ_min/μ = −0.5: the Hessian makes A indefinite
    assert lam[0] < 0 < lam[-1]
    system = IJSystem(op, mu, identity=list(params))
    a = eye + h / mu
    pairs = lanczos_eigenpairs(system.curvature_batched, op.params, 3, products=n)
    order = np.argsort(-np.abs(lam))[:3]
    np.testing.assert_allclose(pairs.eigenvalues.numpy(), np.sort(lam[order])[::-1], rtol=1e-8)
    g = torch.Generator().manual_seed(1)
    solver = RecycledMINRES(max_iter=200, tol=1e-13, recycle_dim=4)
    for _ in range(3):
        b = torch.randn(n, generator=g, dtype=F64)
        x, info = solver(system, tree_unflatten(b, params))
        assert info.breakdown is None
        assert rel(tree_flatten(x), torch.linalg.solve(a, b)) < 1e-10
    assert solver.last_stats.deflated == 4
    spd = IJSystem(op, float(max(abs(lam))) * 4, identity=list(params))  # A ≻ 0
    cg = RecycledCG(max_iter=200, tol=1e-13, recycle_dim=4,
                    deflation=LanczosDeflation(rank=3, products=n))
    for _ in range(2):
        b = torch.randn(n, generator=g, dtype=F64)
        x, info = cg(spd, tree_unflatten(b, params))
        assert rel(tree_flatten(x), torch.linalg.solve(eye + h / spd.mu, b)) < 1e-10


def test_one_operator_many_upper_steps_through_bilevel_problem():
    """An alternation: one lower Hessian, several upper batches, RecycledMINRES (one object,
    its space reused across the upper steps) against the dense solve of the same systems."""
    from implicitbilevel import BilevelProblem, Dense, ImplicitJacobian, ProximalL2
    from implicitbilevel.bissl import bissl_upper_loss

    g = torch.Generator().manual_seed(3)
    c = torch.randn(6, 2, generator=g, dtype=F64)

    def pretext(params, batch):
        return ((torch.tanh(batch[0] @ params["th"].reshape(6, 4).T) @ c - batch[1]) ** 2).mean()

    def downstream(params, batch):
        features = torch.tanh(batch[0] @ params["th"].reshape(6, 4).T)
        return ((features @ params["phi"] - batch[1]) ** 2).mean()

    def batch(n, outputs):
        return (torch.randn(n, 4, generator=g, dtype=F64),
                torch.randn(n, outputs, generator=g, dtype=F64))

    theta = torch.randn(24, generator=g, dtype=F64)
    upper = {"th": theta + 0.01 * torch.randn(24, generator=g, dtype=F64),
             "phi": torch.randn(6, 3, generator=g, dtype=F64)}
    lower = {"th": theta}
    lower_batch = batch(32, 2)

    def problem(solver):
        return BilevelProblem(bissl_upper_loss(downstream, ["th"]), pretext, lam=0.05,
                              regularizer=ProximalL2(["th"]),
                              ij=ImplicitJacobian(solver, damping=0.0))

    recycled, dense = problem(RecycledMINRES(max_iter=100, tol=1e-13, recycle_dim=4)), \
        problem(Dense())
    op = recycled.lower_hessian(upper, lower, lower_batch)
    for _ in range(3):
        b = batch(16, 3)
        out = recycled.upper_grad(upper, lower, b, lower_batch, lower_hessian=op)
        ref = dense.upper_grad(upper, lower, b, lower_batch)
        assert out.info.breakdown is None
        assert rel(out.grads["th"], ref.grads["th"]) < 1e-9
    assert recycled.solver.last_stats.deflated == 4 and recycled.solver.last_stats.solve_index == 2
