"""Tests of :mod:`implicitbilevel.solvers.nystrom` on dense positive semi-definite curvatures.

The curvature is a dense symmetric matrix ``H = Q diag(s) Qᵀ`` (random orthogonal ``Q``, chosen
spectrum ``s``) acting on a parameter dict of three tensors of different shapes, wrapped in the
real :class:`~implicitbilevel.implicit_jacobian.IJSystem` with the identity over every name, so
the system is ``A = I + H/μ``. Everything runs in float64, and every assertion is against an
independent dense reference (``torch.linalg.eigh``, ``torch.linalg.solve``, matrix norms of
``H − Ĥ``):

- the approximation: eigenvalues ``>= 0`` and descending, an orthonormal basis, determinism in the
  seed, exactness when ``rank(H) <= k``, ``Ĥ ⪯ H`` in the Loewner order, the expected nuclear-norm
  error bound of Tropp et al. (2017) and the Eckart–Young lower bound;
- :class:`LowRank`'s ``project``/``expand``/``matvec`` against dense products;
- preconditioned CG needs fewer iterations than plain CG and reaches the dense solution;
- the Nyström–Woodbury solver: exact when ``rank(H) <= k``, error decreasing in ``k``, the
  measured residual;
- one batched product per alternation (the approximation is cached on the curvature operator);
- refusals: indefinite curvature, non-finite products, a system that is not ``I + H/μ``, bad
  ranks.
"""

from __future__ import annotations

import math

import pytest
import torch

from implicitbilevel.implicit_jacobian import IJSystem
from implicitbilevel.solvers import CG
from implicitbilevel.solvers.nystrom import (
    LowRank,
    NystromPreconditioner,
    NystromSolver,
    nystrom_approximation,
)
from implicitbilevel.tree import tree_flatten, tree_unflatten

DTYPE = torch.float64


# ----------------------------------------------------------------------------- builders


def shapes_for(n: int) -> dict[str, tuple[int, ...]]:
    """Three tensors of different shapes holding ``n >= 27`` unknowns."""
    return {"weight": (2, 5), "bias": (n - 26,), "conv": (2, 2, 4)}


class DenseCurvature:
    """``z ↦ H z`` for a dense matrix ``H`` over a parameter dict (the curvature protocol)."""

    psd = True

    def __init__(self, h: torch.Tensor, shapes: dict[str, tuple[int, ...]] | None = None):
        self.h = h
        shapes = shapes or shapes_for(h.shape[0])
        self.params = {name: torch.zeros(shape, dtype=h.dtype) for name, shape in shapes.items()}
        assert sum(p.numel() for p in self.params.values()) == h.shape[0]
        self.names = list(self.params)
        self.memo: dict = {}
        self.calls = 0
        self.batched_calls = 0

    def __call__(self, t):
        self.calls += 1
        return tree_unflatten(self.h @ tree_flatten({n: t[n] for n in self.names}), self.params)

    def batched(self, ts):
        self.batched_calls += 1
        k = next(iter(ts.values())).shape[0]
        # Row i of the stack is the flattened tangent i; H is symmetric, so rows of Z H are H z_i.
        rows = torch.cat([ts[n].reshape(k, -1) for n in self.names], dim=1) @ self.h
        sizes = [p.numel() for p in self.params.values()]
        return {
            n: chunk.reshape(k, *self.params[n].shape)
            for n, chunk in zip(self.names, torch.split(rows, sizes, dim=1))
        }


def random_psd(spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    """``Q diag(spectrum) Qᵀ`` with a random orthogonal ``Q``."""
    n = spectrum.shape[0]
    g = torch.Generator().manual_seed(1000 + seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    q = q * torch.sign(torch.diagonal(r))
    h = (q * spectrum) @ q.T
    return 0.5 * (h + h.T)


def random_tree(curvature: DenseCurvature, seed: int) -> dict[str, torch.Tensor]:
    n = curvature.h.shape[0]
    g = torch.Generator().manual_seed(seed)
    return tree_unflatten(torch.randn(n, generator=g, dtype=DTYPE), curvature.params)


def dense_basis(lr: LowRank) -> torch.Tensor:
    """``U`` as a dense ``n × k`` matrix (column ``i`` is the flattened basis vector ``u_i``)."""
    return torch.stack(
        [tree_flatten({n: u[i] for n, u in lr.basis.items()}) for i in range(lr.rank)], dim=1)


def dense_approximation(lr: LowRank) -> torch.Tensor:
    u = dense_basis(lr)
    return (u * lr.eigenvalues) @ u.T


def approximate(h: torch.Tensor, rank: int, seed: int = 0) -> LowRank:
    curvature = DenseCurvature(h)
    return nystrom_approximation(curvature.batched, curvature.params, rank, seed=seed)


# ----------------------------------------------------------------------------- the approximation


@pytest.mark.parametrize("n,rank", [(30, 1), (40, 7), (64, 20), (35, 35)])
def test_eigenvalues_basis_and_determinism(n, rank):
    spectrum = 10.0 * 0.8 ** torch.arange(n, dtype=DTYPE)
    h = random_psd(spectrum, seed=n)
    lr = approximate(h, rank, seed=3)
    assert lr.rank == rank and lr.eigenvalues.shape == (rank,)
    assert all(u.shape[0] == rank for u in lr.basis.values())
    assert {n_: u.shape[1:] for n_, u in lr.basis.items()} == {
        n_: torch.Size(s) for n_, s in shapes_for(n).items()}
    assert bool((lr.eigenvalues >= 0).all())
    assert bool((lr.eigenvalues[:-1] >= lr.eigenvalues[1:]).all())
    u = dense_basis(lr)
    torch.testing.assert_close(u.T @ u, torch.eye(rank, dtype=DTYPE), rtol=0, atol=1e-12)
    again = approximate(h, rank, seed=3)
    assert torch.equal(again.eigenvalues, lr.eigenvalues)
    assert all(torch.equal(again.basis[k], lr.basis[k]) for k in lr.basis)
    if rank < n:
        other = approximate(h, rank, seed=4)
        assert not torch.equal(other.eigenvalues, lr.eigenvalues)
    # The eigenvalues never exceed H's (Ĥ ⪯ H, so λ_i(Ĥ) <= λ_i(H) by Weyl's monotonicity).
    exact = torch.linalg.eigvalsh(h).flip(0)[:rank]
    assert bool((lr.eigenvalues <= exact * (1 + 1e-10) + 1e-12).all())


@pytest.mark.parametrize("true_rank,rank", [(1, 1), (5, 5), (5, 12), (20, 30)])
def test_exact_when_rank_of_h_at_most_k(true_rank, rank):
    n = 50
    spectrum = torch.zeros(n, dtype=DTYPE)
    spectrum[:true_rank] = torch.logspace(3, -1, true_rank, dtype=DTYPE)
    h = random_psd(spectrum, seed=true_rank)
    lr = approximate(h, rank, seed=1)
    err = torch.linalg.matrix_norm(dense_approximation(lr) - h, ord=2)
    assert float(err) <= 1e-10 * float(spectrum.max())
    evals, evecs = torch.linalg.eigh(h)
    expected = torch.zeros(rank, dtype=DTYPE)
    expected[:true_rank] = evals.flip(0)[:true_rank]
    torch.testing.assert_close(lr.eigenvalues, expected, rtol=1e-10, atol=1e-10 * 1e3)
    # The leading eigenvectors agree up to sign (the spectrum is simple).
    u = dense_basis(lr)[:, :true_rank]
    overlap = (u.T @ evecs.flip(1)[:, :true_rank]).abs()
    torch.testing.assert_close(overlap, torch.eye(true_rank, dtype=DTYPE), rtol=0, atol=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_never_over_estimates_loewner_order(seed):
    n = 45
    spectrum = torch.logspace(2, -3, n, dtype=DTYPE)
    h = random_psd(spectrum, seed=seed)
    for rank in (3, 10, 25):
        gap = torch.linalg.eigvalsh(h - dense_approximation(approximate(h, rank, seed=seed)))
        # ``0 ⪯ H − Ĥ`` up to the stabilising shift ν = sqrt(n)·eps·||HΩ|| (~1e-12 here).
        assert float(gap.min()) >= -1e-10 * float(spectrum.max())


@pytest.mark.parametrize("decay", [0.7, 0.85])
def test_expected_nuclear_error_bound(decay):
    """Mean over seeds of ``‖H − Ĥ‖_*`` below ``(1 + r/(k−r−1)) Σ_{j>r} λ_j`` for every ``r``."""
    n, rank, seeds = 60, 10, 16
    spectrum = decay ** torch.arange(n, dtype=DTYPE)
    h = random_psd(spectrum, seed=7)
    errors = [
        float(torch.linalg.matrix_norm(h - dense_approximation(approximate(h, rank, seed=s)),
                                       ord="nuc"))
        for s in range(seeds)
    ]
    mean = sum(errors) / seeds
    exact = torch.linalg.eigvalsh(h).flip(0)
    for r in range(rank - 1):
        bound = (1 + r / (rank - r - 1)) * float(exact[r:].sum())
        assert mean <= bound, (r, mean, bound)
    # Eckart–Young: no rank-k matrix does better than the truncated eigendecomposition.
    assert min(errors) >= float(exact[rank:].sum()) * (1 - 1e-10)


def test_low_rank_products_against_dense():
    n, rank = 40, 6
    h = random_psd(torch.logspace(1, -2, n, dtype=DTYPE), seed=2)
    curvature = DenseCurvature(h)
    lr = nystrom_approximation(curvature.batched, curvature.params, rank, seed=5)
    u = dense_basis(lr)
    v = random_tree(curvature, seed=11)
    c = torch.randn(rank, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    torch.testing.assert_close(lr.project(v), u.T @ tree_flatten(v), rtol=1e-12, atol=1e-12)
    expanded = lr.expand(c)
    assert {k: t.shape for k, t in expanded.items()} == {k: t.shape for k, t in v.items()}
    torch.testing.assert_close(tree_flatten(expanded), u @ c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        tree_flatten(lr.matvec(v)), (u * lr.eigenvalues) @ (u.T @ tree_flatten(v)),
        rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- solving


def few_large_eigenvalues(n: int, mu: float, seed: int) -> torch.Tensor:
    """8 eigenvalues from 1e5 down to 1e2, the rest in ``[0, μ)``: ``cond(I + H/μ) ≈ 2·10⁵``."""
    g = torch.Generator().manual_seed(seed)
    bulk = mu * torch.rand(n - 8, generator=g, dtype=DTYPE)
    return random_psd(torch.cat([torch.logspace(5, 2, 8, dtype=DTYPE), bulk]), seed=seed)


def test_preconditioned_cg_needs_fewer_iterations():
    n, mu, rank = 120, 0.5, 10
    h = few_large_eigenvalues(n, mu, seed=3)
    curvature = DenseCurvature(h)
    system = IJSystem(curvature, mu, identity=curvature.names)
    b = random_tree(curvature, seed=4)
    a = torch.eye(n, dtype=DTYPE) + h / mu
    reference = torch.linalg.solve(a, tree_flatten(b))
    x_cg, info_cg = CG(max_iter=1000, tol=1e-8)(system, b)
    x_pcg, info_pcg = CG(max_iter=1000, tol=1e-8,
                         preconditioner=NystromPreconditioner(rank))(system, b)
    assert info_cg.converged and info_pcg.converged
    assert info_pcg.breakdown is None and info_cg.breakdown is None
    # Measured: plain CG 48 iterations, Nyström-preconditioned CG 12.
    assert info_pcg.iterations < info_cg.iterations / 2, (info_pcg.iterations,
                                                           info_cg.iterations)
    for x in (x_cg, x_pcg):
        flat = tree_flatten(x)
        assert float((flat - reference).norm() / reference.norm()) < 1e-7
        assert float((tree_flatten(b) - a @ flat).norm()) <= 2e-8 * float(tree_flatten(b).norm())


def test_preconditioner_is_the_documented_spd_matrix():
    n, mu, rank = 40, 0.3, 6
    h = few_large_eigenvalues(n, mu, seed=8)
    curvature = DenseCurvature(h)
    system = IJSystem(curvature, mu, identity=curvature.names)
    preconditioner = NystromPreconditioner(rank, seed=2)
    apply = preconditioner(system)
    lr, _ = preconditioner.low_rank(system)  # the approximation its prepare step built
    u, lam = dense_basis(lr), lr.eigenvalues
    eye = torch.eye(n, dtype=DTYPE)
    expected = (lam[-1] + mu) * (u / (lam + mu)) @ u.T + (eye - u @ u.T)
    columns = torch.stack(
        [tree_flatten(apply(tree_unflatten(eye[:, j].clone(), curvature.params)))
         for j in range(n)], dim=1)
    torch.testing.assert_close(columns, expected, rtol=1e-12, atol=1e-12)
    assert float(torch.linalg.eigvalsh(0.5 * (columns + columns.T)).min()) > 0


@pytest.mark.parametrize("true_rank,rank", [(4, 4), (10, 16)])
def test_woodbury_solver_exact_for_low_rank_h(true_rank, rank):
    n, mu = 48, 0.2
    spectrum = torch.zeros(n, dtype=DTYPE)
    spectrum[:true_rank] = torch.logspace(4, 0, true_rank, dtype=DTYPE)
    h = random_psd(spectrum, seed=true_rank)
    curvature = DenseCurvature(h)
    system = IJSystem(curvature, mu, identity=curvature.names)
    b = random_tree(curvature, seed=9)
    x, info = NystromSolver(rank)(system, b)
    reference = torch.linalg.solve(torch.eye(n, dtype=DTYPE) + h / mu, tree_flatten(b))
    assert float((tree_flatten(x) - reference).norm() / reference.norm()) < 1e-10
    assert info.iterations == 0 and math.isnan(info.residual_norm) and not info.converged
    assert info.breakdown is None
    assert info.rhs_norm == pytest.approx(float(tree_flatten(b).norm()), rel=1e-14)
    assert {k: t.shape for k, t in x.items()} == {k: t.shape for k, t in b.items()}


def test_woodbury_error_decreases_with_rank():
    n, mu = 80, 0.1
    h = random_psd(100.0 * 0.75 ** torch.arange(n, dtype=DTYPE), seed=5)
    curvature = DenseCurvature(h)
    system = IJSystem(curvature, mu, identity=curvature.names)
    b = random_tree(curvature, seed=6)
    eye = torch.eye(n, dtype=DTYPE)
    reference = torch.linalg.solve(eye + h / mu, tree_flatten(b))
    errors = []
    for rank in (2, 6, 12, 24, 48, 70):
        solver = NystromSolver(rank)
        x, _ = solver(system, b)
        flat = tree_flatten(x)
        errors.append(float((flat - reference).norm() / reference.norm()))
        # x is the exact solution of the approximate system I + Ĥ/μ (the Woodbury identity).
        approximate_system = eye + dense_approximation(solver.low_rank(system)[0]) / mu
        woodbury = torch.linalg.solve(approximate_system, tree_flatten(b))
        torch.testing.assert_close(flat, woodbury, rtol=1e-10, atol=1e-10)
    # Measured: 0.77, 0.71, 0.49, 0.13, 2.0e-3, 3.4e-6.
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 0.5 and errors[-1] < 1e-4, errors


def test_woodbury_measured_residual():
    n, mu, true_rank = 60, 0.5, 10
    spectrum = torch.zeros(n, dtype=DTYPE)
    spectrum[:true_rank] = torch.logspace(2, -1, true_rank, dtype=DTYPE)
    h = random_psd(spectrum, seed=4)
    curvature = DenseCurvature(h)
    system = IJSystem(curvature, mu, identity=curvature.names)
    b = random_tree(curvature, seed=1)
    a = torch.eye(n, dtype=DTYPE) + h / mu
    rhs_norm = float(tree_flatten(b).norm())
    # rank 5 < rank(H): a visible residual; rank 12 >= rank(H): exact up to rounding.
    for rank, tol, converged in ((5, 1e-6, False), (12, 1e-10, True)):
        before = system.products
        x, info = NystromSolver(rank, measure_residual=True, tol=tol)(system, b)
        true = float((tree_flatten(b) - a @ tree_flatten(x)).norm())
        assert info.residual_norm == pytest.approx(true, rel=1e-8, abs=1e-14 * rhs_norm)
        assert info.iterations == 1 and info.breakdown is None
        assert info.rhs_norm == pytest.approx(rhs_norm, rel=1e-14)
        assert system.products - before == rank + 1  # building it, then one measuring product
        assert info.converged == (true <= tol * rhs_norm) == converged


# ----------------------------------------------------------------------------- reuse


def test_approximation_built_once_and_reused():
    n, mu, rank = 50, 0.4, 8
    h = few_large_eigenvalues(n, mu, seed=2)
    curvature = DenseCurvature(h)
    system = IJSystem(curvature, mu, identity=curvature.names)
    solver = NystromSolver(rank, seed=1)
    pcg = CG(max_iter=200, tol=1e-8, preconditioner=NystromPreconditioner(rank, seed=1))
    for step in range(4):
        solver(system, random_tree(curvature, seed=step))
    assert curvature.batched_calls == 1 and curvature.calls == 0
    assert system.products == rank
    _, info = pcg(system, random_tree(curvature, seed=9))
    # The preconditioner prepares its own approximation (each solver holds its own preparation).
    assert curvature.batched_calls == 2
    assert system.products == 2 * rank + info.iterations == 2 * rank + curvature.calls
    # Another rank or seed is another approximation; a new curvature operator starts afresh.
    solver_other = NystromSolver(rank, seed=2)
    solver_other(system, random_tree(curvature, seed=0))
    assert curvature.batched_calls == 3
    fresh = DenseCurvature(h)
    solver(IJSystem(fresh, mu, identity=fresh.names), random_tree(fresh, seed=0))
    assert fresh.batched_calls == 1


# ----------------------------------------------------------------------------- refusals


def test_indefinite_curvature_is_refused():
    n = 40
    g = torch.Generator().manual_seed(0)
    mixed = torch.logspace(2, -1, n, dtype=DTYPE) * torch.where(
        torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(DTYPE)
    mixed[0] = 100.0
    mixed[1] = -50.0
    cases = [
        (random_psd(-torch.logspace(1, -1, n, dtype=DTYPE), seed=1), 5),  # negative definite
        (random_psd(mixed, seed=2), n),  # Ω spans everything: the core is similar to H
    ]
    for h, rank in cases:
        assert float(torch.linalg.eigvalsh(h).min()) < 0  # the reference says: indefinite
        with pytest.raises(ValueError, match="not positive definite") as err:
            approximate(h, rank)
        assert "Gauss-Newton" in str(err.value) and "MINRES" in str(err.value)
        curvature = DenseCurvature(h)
        system = IJSystem(curvature, 1.0, identity=curvature.names)
        with pytest.raises(ValueError, match="indefinite"):
            NystromSolver(rank)(system, random_tree(curvature, seed=0))
        with pytest.raises(ValueError, match="indefinite"):
            CG(max_iter=5, preconditioner=NystromPreconditioner(rank))(
                system, random_tree(curvature, seed=0))


def test_non_finite_products_are_refused():
    h = random_psd(torch.ones(30, dtype=DTYPE), seed=0)
    h[0, 0] = math.nan
    with pytest.raises(ValueError, match="not finite"):
        approximate(h, 4)


def test_system_not_identity_plus_curvature_is_refused():
    n = 30
    h = random_psd(torch.logspace(1, -1, n, dtype=DTYPE), seed=0)
    curvature = DenseCurvature(h)
    partial = IJSystem(curvature, 1.0, identity=curvature.names[:1])
    general = IJSystem(curvature, 1.0, identity=None, lower_hvp=lambda z: dict(z))
    ridged = IJSystem(curvature, 1.0, identity=curvature.names, ridge=0.1,
                      ridge_names=curvature.names[-1:])
    plain = DenseCurvature(h)  # a bare callable matvec, not an IJSystem
    b = random_tree(curvature, seed=0)
    for matvec in (partial, general, plain):
        with pytest.raises(ValueError, match="I \\+ H/μ"):
            NystromSolver(4)(matvec, b)
        with pytest.raises(ValueError, match="I \\+ H/μ"):
            NystromPreconditioner(4)(matvec)
    with pytest.raises(ValueError, match="ridge"):
        NystromSolver(4)(ridged, b)
    assert curvature.batched_calls == 0 and plain.batched_calls == 0


@pytest.mark.parametrize("rank", [0, -2, 2.5, True, "3", None])
def test_bad_rank_raised_early(rank):
    h = random_psd(torch.ones(30, dtype=DTYPE), seed=0)
    curvature = DenseCurvature(h)
    with pytest.raises(ValueError, match="rank"):
        nystrom_approximation(curvature.batched, curvature.params, rank)
    with pytest.raises(ValueError, match="rank"):
        NystromSolver(rank)
    with pytest.raises(ValueError, match="rank"):
        NystromPreconditioner(rank)
    assert curvature.batched_calls == 0


def test_rank_above_dimension_and_bad_tol_refused():
    h = random_psd(torch.ones(30, dtype=DTYPE), seed=0)
    curvature = DenseCurvature(h)
    with pytest.raises(ValueError, match="n = 30"):
        nystrom_approximation(curvature.batched, curvature.params, 31)
    assert curvature.batched_calls == 0
    with pytest.raises(ValueError, match="tol"):
        NystromSolver(4, tol=-1.0)
    with pytest.raises(ValueError, match="tol"):
        NystromSolver(4, tol=math.nan)
