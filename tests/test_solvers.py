"""Tests of :mod:`implicitbilevel.solvers` on random implicit-Jacobian systems.

The systems have the form ``A = I + H/(λ + λ_damp)`` (thesis eq. 4.8-4.9) with ``H`` a random
symmetric PSD matrix (or an indefinite one that still leaves ``A`` SPD), drawn by hypothesis over
the dimension (1..30), dtype (float32/float64), ``λ ∈ (1e-3, 10)`` and ``λ_damp ∈ [0, 10]``.
``H`` is ``(λ + λ_damp) Q diag(s) Qᵀ`` with a random orthogonal ``Q`` and a drawn spectrum ``s``,
so ``A``'s condition number is controlled and the tolerances are meaningful. Vectors are split
into a parameter dict of 2-3 tensors of different shapes.

Checked:

- ``CG(max_iter=n+10, tol=1e-12)`` and ``Dense()`` against ``torch.linalg.solve``;
- truncated ``CG(max_iter=k, tol=0)`` against a numpy implementation of thesis Algorithm 1 on flat
  vectors (``k`` matrix-vector products, ``x0 = 0``; fewer only once the residual is at the
  documented rounding floor ``10·eps·||b||``);
- ``CG(blockwise=True)`` against a numpy per-block reference (per-tensor α and β, all blocks
  coupled through ``A``, ``x0 = 0``, exactly ``k`` iterations);
- ``Neumann(max_iter=K, alpha)`` against ``α Σ_{k=0}^{K} (I − αA)^k b`` computed with numpy matrix
  powers, ``info.residual_norm == ‖(I − αA)^K b‖``, convergence for large ``K`` and contracting α,
  and the divergence report otherwise;
- warm starts need fewer iterations on a perturbed system than a cold start;
- breakdown reports (non-positive curvature, non-finite values) without raising, ``b = 0``,
  ``Dense``'s ``max_dim`` refusal, constructor validation and
  ``SolveInfo.relative_residual``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import make_matvec, rel_err, split_shapes, to_flat, to_tree

from implicitbilevel.solvers import CG, Dense, Neumann, SolveInfo

SETTINGS = settings(max_examples=25, deadline=None)
DTYPES = [torch.float32, torch.float64]
NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


# ----------------------------------------------------------------------------- system builders


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def ij_system(
    n: int, lam: float, lam_damp: float, rng: np.random.Generator, kappa: float,
    indefinite: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(A, H)`` with ``A = I + H/(λ+λ_damp)`` SPD and ``cond(A) <= kappa``.

    ``H = μ Q diag(s) Qᵀ`` with ``μ = λ + λ_damp``; ``s ∈ [0, κ−1]`` (PSD ``H``) or, when
    ``indefinite``, ``s ∈ [−0.9, κ−1]`` with at least one negative entry (``H`` indefinite, ``A``'s
    eigenvalues ``1 + s`` still in ``[0.1, κ]``).
    """
    mu = lam + lam_damp
    low = -0.9 if indefinite else 0.0
    s = rng.uniform(low, kappa - 1.0, size=n)
    if indefinite:
        s[rng.integers(n)] = rng.uniform(-0.9, -0.1)
    q = random_orthogonal(n, rng)
    h = mu * (q * s) @ q.T
    h = 0.5 * (h + h.T)
    a = np.eye(n) + h / mu
    return 0.5 * (a + a.T), h


@st.composite
def systems(draw, kappa_max: float | None = None, allow_indefinite: bool = True):
    n = draw(st.integers(1, 30))
    dtype = draw(st.sampled_from(DTYPES))
    lam = draw(st.floats(1e-3, 10.0, exclude_min=True, exclude_max=True))
    lam_damp = draw(st.floats(0.0, 10.0, allow_subnormal=False))
    indefinite = draw(st.booleans()) if allow_indefinite else False
    if kappa_max is None:
        kappa_max = 1e3 if dtype == torch.float64 else 50.0
    kappa = draw(st.floats(1.5, kappa_max))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    a, _ = ij_system(n, lam, lam_damp, rng, kappa, indefinite=indefinite)
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    return {"n": n, "dtype": dtype, "a": a, "b": b, "shapes": shapes, "rng": rng}


def test_system_builder_is_spd_and_of_ij_form():
    rng = np.random.default_rng(0)
    for indefinite in (False, True):
        a, h = ij_system(12, 0.5, 2.0, rng, kappa=30.0, indefinite=indefinite)
        np.testing.assert_allclose(a, np.eye(12) + h / 2.5, atol=1e-12)
        eig_a = np.linalg.eigvalsh(a)
        assert eig_a.min() > 0.05 and eig_a.max() <= 30.0 + 1e-9
        assert (np.linalg.eigvalsh(h).min() < 0) == indefinite
    assert [int(np.prod(s)) for s in split_shapes(17, rng)].count(0) == 0
    assert sum(int(np.prod(s)) for s in split_shapes(17, rng)) == 17


# ----------------------------------------------------------------------------- references


def algorithm1(a: np.ndarray, v: np.ndarray, n_iter: int) -> tuple[np.ndarray, list[float]]:
    """Thesis Algorithm 1 on flat float64 vectors, with ``n_iter`` matrix-vector products.

    Returns the iterate and ``||r||`` before each product.
    """
    x = np.zeros_like(v)
    r = v.copy()
    d = v.copy()
    norms = []
    for _ in range(n_iter):
        r_norm = r @ r
        if r_norm == 0.0:  # exact solution reached: further steps would divide 0 by 0
            break
        norms.append(float(np.sqrt(r_norm)))
        md = a @ d
        alpha = r_norm / (d @ md)
        x = x + alpha * d
        r = r - alpha * md
        r_new_norm = r @ r
        beta = r_new_norm / r_norm
        d = r + beta * d
    return x, norms


def blockwise_reference(a: np.ndarray, b: np.ndarray, sizes: list[int], n_iter: int):
    """Block-wise CG: α_j, β_j per block j, ``A`` applied to the whole direction; x0 = 0.

    A block with zero curvature (resp. zero residual norm) takes a zero step (resp. β = 0).
    Returns the iterate and the final residual norm (recursive residual over all blocks).
    """
    bounds = np.cumsum([0] + sizes)
    blocks = [slice(bounds[j], bounds[j + 1]) for j in range(len(sizes))]
    x = np.zeros_like(b)
    r = b.copy()
    d = b.copy()
    for _ in range(n_iter):
        ad = a @ d
        r_new = r.copy()
        d_new = d.copy()
        for blk in blocks:
            rs = r[blk] @ r[blk]
            curv = d[blk] @ ad[blk]
            alpha = rs / curv if curv != 0 else 0.0
            x[blk] = x[blk] + alpha * d[blk]
            r_new[blk] = r[blk] - alpha * ad[blk]
            rs_new = r_new[blk] @ r_new[blk]
            beta = rs_new / rs if rs != 0 else 0.0
            d_new[blk] = r_new[blk] + beta * d[blk]
        r, d = r_new, d_new
    return x, float(np.linalg.norm(r))


# ----------------------------------------------------------------------------- exact solves


@SETTINGS
@given(systems())
def test_cg_converges_to_dense_solution(sys):
    n, dtype, a, b, shapes = sys["n"], sys["dtype"], sys["a"], sys["b"], sys["shapes"]
    b_tree = to_tree(b, shapes, dtype)
    x, info = CG(max_iter=n + 10, tol=1e-12)(make_matvec(a, shapes, dtype), b_tree)
    assert list(x.keys()) == list(b_tree.keys())
    assert all(x[k].shape == b_tree[k].shape and x[k].dtype == dtype for k in x)
    ref = torch.linalg.solve(torch.tensor(a), torch.tensor(b)).numpy()
    err = rel_err(to_flat(x), ref)
    if dtype == torch.float64:
        assert err < 1e-6
        assert info.breakdown is None
        assert info.converged
    else:
        assert err < 5e-3
    assert info.iterations <= n + 10
    assert info.rhs_norm == pytest.approx(float(np.linalg.norm(b)), rel=1e-5)


@SETTINGS
@given(systems())
def test_dense_matches_linalg_solve(sys):
    n, dtype, a, b, shapes = sys["n"], sys["dtype"], sys["a"], sys["b"], sys["shapes"]
    counter: list = []
    solver = Dense()
    matvec = make_matvec(a, shapes, dtype, counter)
    x, info = solver(matvec, to_tree(b, shapes, dtype))
    ref = torch.linalg.solve(torch.tensor(a), torch.tensor(b)).numpy()
    assert rel_err(to_flat(x), ref) < (1e-10 if dtype == torch.float64 else 1e-3)
    assert info.iterations == n == len(counter)
    assert info.converged and info.breakdown is None
    true_res = float(np.linalg.norm(b - a @ to_flat(x)))
    assert info.residual_norm == pytest.approx(
        true_res, rel=1e-2, abs=(1e-12 if dtype == torch.float64 else 1e-4) * np.linalg.norm(b)
    )
    # The materialised matrix is A itself.
    m = solver.matrix(make_matvec(a, shapes, dtype), to_tree(b, shapes, dtype))
    np.testing.assert_allclose(m.numpy(), a, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- truncated CG


@SETTINGS
@given(systems(), st.integers(1, 8))
def test_truncated_cg_matches_algorithm1(sys, k):
    n, dtype, a, b, shapes = sys["n"], sys["dtype"], sys["a"], sys["b"], sys["shapes"]
    k = min(k, n)  # beyond n iterations Algorithm 1 divides by ~0 in exact arithmetic
    counter: list = []
    x, info = CG(max_iter=k, tol=0.0)(make_matvec(a, shapes, dtype, counter), to_tree(b, shapes,
                                                                                     dtype))
    ref, norms = algorithm1(a, b, k)
    err = rel_err(to_flat(x), ref)
    assert err < (1e-8 if dtype == torch.float64 else 2e-3)
    # With tol=0 CG spends exactly k products, unless the residual reaches the documented rounding
    # floor 10·eps·||b|| first (then the iterate is already the solution to rounding accuracy).
    floor = 10 * torch.finfo(dtype).eps * float(np.linalg.norm(b))
    assert len(counter) == info.iterations <= k
    if min(norms) > 3 * floor:
        assert info.iterations == k
    # The tracked residual is the recursive one, which equals b - A x_k in exact arithmetic.
    true_res = float(np.linalg.norm(b - a @ ref))
    scale = float(np.linalg.norm(b))
    tol = 1e-7 if dtype == torch.float64 else 2e-3
    assert info.residual_norm == pytest.approx(true_res, rel=tol * 100, abs=tol * scale)
    assert info.relative_residual == pytest.approx(info.residual_norm / info.rhs_norm)


@SETTINGS
@given(systems(kappa_max=20.0, allow_indefinite=False), st.integers(1, 4), st.booleans())
def test_blockwise_cg_matches_block_reference(sys, k, zero_block):
    dtype, a, b, shapes = sys["dtype"], sys["a"], sys["b"], sys["shapes"]
    sizes = [int(np.prod(s)) for s in shapes]
    if zero_block and len(sizes) > 1:
        b = b.copy()
        b[: sizes[0]] = 0.0  # a block with exactly zero residual keeps a zero step
    b = b.astype(NP_DTYPE[dtype]).astype(np.float64)
    counter: list = []
    x, info = CG(max_iter=k, blockwise=True, tol=1e-3)(
        make_matvec(a, shapes, dtype, counter), to_tree(b, shapes, dtype)
    )
    ref, ref_res = blockwise_reference(a, b, sizes, k)
    err = rel_err(to_flat(x), ref)
    # Per-block α can be large when a block's curvature is small; keep to well-posed draws.
    assume(np.all(np.isfinite(ref)) and np.linalg.norm(ref) < 1e6 * np.linalg.norm(b) + 1)
    assert err < (1e-8 if dtype == torch.float64 else 1e-2)
    assert len(counter) == k == info.iterations
    assert info.converged is False
    assert info.residual_norm == pytest.approx(
        ref_res, rel=(1e-6 if dtype == torch.float64 else 1e-2), abs=1e-6 * np.linalg.norm(b)
    )
    if zero_block and len(sizes) > 1:
        assert np.all(to_flat(x)[: sizes[0]] == 0.0)


def test_blockwise_differs_from_full_cg_when_blocks_couple():
    # Sanity: the block-wise heuristic is not CG on the full system (the reference above would
    # also pass for plain CG if the blocks never interacted).
    rng = np.random.default_rng(3)
    a, _ = ij_system(6, 1.0, 0.0, rng, kappa=10.0)
    shapes = [(3,), (3,)]
    b = rng.standard_normal(6)
    mv = make_matvec(a, shapes, torch.float64)
    xb, _ = CG(max_iter=2, blockwise=True)(mv, to_tree(b, shapes, torch.float64))
    xf, _ = CG(max_iter=2)(mv, to_tree(b, shapes, torch.float64))
    assert rel_err(to_flat(xb), to_flat(xf)) > 1e-3
    np.testing.assert_allclose(to_flat(xf), algorithm1(a, b, 2)[0], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- Neumann


def neumann_reference(a: np.ndarray, b: np.ndarray, alpha: float, K: int):
    m = np.eye(a.shape[0]) - alpha * a
    total = sum(np.linalg.matrix_power(m, k) @ b for k in range(K + 1))
    return alpha * total, float(np.linalg.norm(np.linalg.matrix_power(m, K) @ b))


@SETTINGS
@given(systems(kappa_max=20.0), st.integers(0, 12), st.floats(0.05, 0.95))
def test_neumann_matches_explicit_series(sys, K, frac):
    dtype, a, b, shapes = sys["dtype"], sys["a"], sys["b"], sys["shapes"]
    lam_max = float(np.linalg.eigvalsh(a).max())
    alpha = frac * 2.0 / lam_max  # contracting: eigenvalues of I - αA inside (-1, 1)
    counter: list = []
    x, info = Neumann(max_iter=K, alpha=alpha)(
        make_matvec(a, shapes, dtype, counter), to_tree(b, shapes, dtype)
    )
    ref, ref_res = neumann_reference(a, b, alpha, K)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel_err(to_flat(x), ref) < tol
    assert len(counter) == K == info.iterations
    assert info.residual_norm == pytest.approx(ref_res, rel=tol * 10, abs=tol * np.linalg.norm(b))
    assert info.rhs_norm == pytest.approx(float(np.linalg.norm(b)), rel=1e-6)
    assert info.breakdown is None


def test_neumann_converges_for_large_K():
    rng = np.random.default_rng(11)
    a, _ = ij_system(15, 0.3, 1.0, rng, kappa=8.0)
    shapes = split_shapes(15, rng)
    b = rng.standard_normal(15)
    alpha = 1.0 / float(np.linalg.eigvalsh(a).max())
    x, info = Neumann(max_iter=400, alpha=alpha)(
        make_matvec(a, shapes, torch.float64), to_tree(b, shapes, torch.float64)
    )
    assert rel_err(to_flat(x), np.linalg.solve(a, b)) < 1e-8
    assert info.relative_residual < 1e-8


def test_neumann_tol_stops_early_and_reports_converged():
    rng = np.random.default_rng(12)
    a, _ = ij_system(10, 1.0, 0.0, rng, kappa=4.0)
    shapes = split_shapes(10, rng)
    b = rng.standard_normal(10)
    alpha = 1.0 / float(np.linalg.eigvalsh(a).max())
    x, info = Neumann(max_iter=1000, alpha=alpha, tol=1e-6)(
        make_matvec(a, shapes, torch.float64), to_tree(b, shapes, torch.float64)
    )
    assert info.converged and info.iterations < 1000
    m = np.eye(10) - alpha * a
    norms = [np.linalg.norm(np.linalg.matrix_power(m, k) @ b) for k in range(1000)]
    first = next(k for k, v in enumerate(norms) if v <= 1e-6 * np.linalg.norm(b))
    assert info.iterations == first
    assert rel_err(to_flat(x), neumann_reference(a, b, alpha, first)[0]) < 1e-10


def test_neumann_divergence_is_reported():
    rng = np.random.default_rng(13)
    a, _ = ij_system(8, 1.0, 0.0, rng, kappa=10.0)
    shapes = split_shapes(8, rng)
    b = rng.standard_normal(8)
    alpha = 3.0 / float(np.linalg.eigvalsh(a).max())  # spectral radius of I - αA is 2
    _, info = Neumann(max_iter=30, alpha=alpha)(
        make_matvec(a, shapes, torch.float64), to_tree(b, shapes, torch.float64)
    )
    assert info.breakdown is not None and "diverge" in info.breakdown
    assert not info.converged


# ----------------------------------------------------------------------------- warm start


def test_warm_start_needs_fewer_iterations():
    rng = np.random.default_rng(5)
    n = 60
    a, _ = ij_system(n, 0.01, 0.0, rng, kappa=2000.0)
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    e = rng.standard_normal((n, n)) * 1e-3
    a2 = a + 0.5 * (e + e.T)
    assert np.linalg.eigvalsh(a2).min() > 0
    b2 = b + 1e-3 * rng.standard_normal(n)
    dtype = torch.float64

    warm = CG(max_iter=500, tol=1e-8, warm_start=True)
    x1, info1 = warm(make_matvec(a, shapes, dtype), to_tree(b, shapes, dtype))
    assert info1.converged
    x2, info_warm = warm(make_matvec(a2, shapes, dtype), to_tree(b2, shapes, dtype))
    cold = CG(max_iter=500, tol=1e-8)
    x3, info_cold = cold(make_matvec(a2, shapes, dtype), to_tree(b2, shapes, dtype))
    assert info_warm.converged and info_cold.converged
    assert info_warm.iterations < info_cold.iterations
    ref = np.linalg.solve(a2, b2)
    assert rel_err(to_flat(x2), ref) < 1e-5
    assert rel_err(to_flat(x3), ref) < 1e-5
    # A cold solver with warm_start=False gives the same count the second time (no memory).
    _, again = cold(make_matvec(a2, shapes, dtype), to_tree(b2, shapes, dtype))
    assert again.iterations == info_cold.iterations


def test_explicit_x0_is_used():
    rng = np.random.default_rng(6)
    a, _ = ij_system(10, 1.0, 0.0, rng, kappa=10.0)
    shapes = split_shapes(10, rng)
    b = rng.standard_normal(10)
    exact = np.linalg.solve(a, b)
    x, info = CG(max_iter=10, tol=1e-10)(
        make_matvec(a, shapes, torch.float64), to_tree(b, shapes, torch.float64),
        x0=to_tree(exact, shapes, torch.float64),
    )
    assert info.iterations == 1 and info.converged  # the residual of x0
    np.testing.assert_allclose(to_flat(x), exact, rtol=1e-12)


# ----------------------------------------------------------------------------- breakdowns


def algorithm1_until_breakdown(a: np.ndarray, v: np.ndarray, n_iter: int):
    x = np.zeros_like(v)
    r = v.copy()
    d = v.copy()
    for k in range(n_iter):
        md = a @ d
        curv = d @ md
        if curv <= 0:
            return x, k
        alpha = (r @ r) / curv
        x = x + alpha * d
        r_new = r - alpha * md
        d = r_new + (r_new @ r_new) / (r @ r) * d
        r = r_new
    return x, None


@pytest.mark.parametrize("seed", range(5))
def test_indefinite_matrix_reports_non_positive_curvature(seed):
    rng = np.random.default_rng(100 + seed)
    n = 12
    q = random_orthogonal(n, rng)
    eig = rng.uniform(0.5, 3.0, size=n)
    eig[:3] = -rng.uniform(0.5, 3.0, size=3)
    a = (q * eig) @ q.T
    a = 0.5 * (a + a.T)
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    counter: list = []
    x, info = CG(max_iter=3 * n, tol=1e-14)(
        make_matvec(a, shapes, torch.float64, counter), to_tree(b, shapes, torch.float64)
    )
    assert info.breakdown is not None and "non-positive curvature" in info.breakdown
    assert not info.converged
    ref_x, stop = algorithm1_until_breakdown(a, b, 3 * n)
    assert stop is not None
    # The iterate before the breaking step is returned; the breaking product was spent.
    assert info.iterations == stop + 1 == len(counter)
    np.testing.assert_allclose(to_flat(x), ref_x, rtol=1e-8, atol=1e-8 * np.abs(ref_x).max())


def test_negative_definite_breaks_at_first_iteration():
    shapes = [(2,), (1, 3)]
    a = -np.eye(5)
    b = np.arange(1.0, 6.0)
    x, info = CG(max_iter=5)(make_matvec(a, shapes, torch.float64), to_tree(b, shapes,
                                                                          torch.float64))
    assert "non-positive curvature" in info.breakdown
    assert info.iterations == 1
    assert np.all(to_flat(x) == 0.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_matvec_is_reported(bad):
    shapes = [(3,), (2, 2)]

    def matvec(v):
        return {k: torch.full_like(t, bad) for k, t in v.items()}

    b = to_tree(np.ones(7), shapes, torch.float64)
    x, info = CG(max_iter=5)(matvec, b)
    assert info.breakdown is not None and "non-finite" in info.breakdown
    assert not info.converged
    assert all(torch.isfinite(t).all() for t in x.values())

    _, info_bw = CG(max_iter=3, blockwise=True)(matvec, b)
    assert info_bw.breakdown is not None and "non-finite" in info_bw.breakdown

    _, info_n = Neumann(max_iter=3)(matvec, b)
    assert info_n.breakdown is not None and "non-finite" in info_n.breakdown


@pytest.mark.parametrize(
    "solver",
    [CG(max_iter=5), CG(max_iter=5, tol=1e-6), CG(max_iter=3, blockwise=True), Dense(),
     Neumann(max_iter=4)],
    ids=["cg", "cg-tol", "blockwise", "dense", "neumann"],
)
def test_zero_rhs_gives_zero(solver):
    shapes = [(3,), (2, 2)]
    a, _ = ij_system(7, 1.0, 0.0, np.random.default_rng(1), kappa=5.0)
    x, info = solver(make_matvec(a, shapes, torch.float64), to_tree(np.zeros(7), shapes,
                                                                     torch.float64))
    assert all(torch.equal(t, torch.zeros_like(t)) for t in x.values())
    assert info.rhs_norm == 0.0
    assert info.relative_residual == 0.0
    assert info.breakdown is None
    if not (isinstance(solver, CG) and solver.blockwise):
        assert info.converged


# ----------------------------------------------------------------------------- Dense, arguments


def test_dense_refuses_large_systems():
    shapes = [(3,), (2, 2)]
    counter: list = []
    matvec = make_matvec(np.eye(7), shapes, torch.float64, counter)
    with pytest.raises(ValueError, match="max_dim"):
        Dense(max_dim=6)(matvec, to_tree(np.ones(7), shapes, torch.float64))
    assert counter == []  # refused before any product
    x, _ = Dense(max_dim=7)(matvec, to_tree(np.ones(7), shapes, torch.float64))
    np.testing.assert_allclose(to_flat(x), np.ones(7))


def test_dense_singular_matrix_is_reported():
    shapes = [(2,)]
    x, info = Dense()(make_matvec(np.zeros((2, 2)), shapes, torch.float64),
                      to_tree(np.ones(2), shapes, torch.float64))
    assert info.breakdown is not None and "singular" in info.breakdown
    assert not info.converged


@pytest.mark.parametrize(
    "make",
    [
        lambda: CG(max_iter=-1),
        lambda: CG(tol=-1e-3),
        lambda: CG(atol=-1.0),
        lambda: CG(max_iter=2.5),
        lambda: Neumann(max_iter=3.0),
        lambda: Neumann(max_iter=-1),
        lambda: Neumann(tol=-0.1),
        lambda: Neumann(alpha=0.0),
        lambda: Neumann(alpha=-1.0),
        lambda: Neumann(alpha=math.nan),
    ],
)
def test_invalid_constructor_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_nan_tolerance_is_rejected():
    with pytest.raises(ValueError):
        CG(tol=math.nan)


def test_dense_negative_max_dim_is_rejected():
    with pytest.raises(ValueError):
        Dense(max_dim=-1)


def test_solve_info_relative_residual():
    assert SolveInfo(3, 2.0, 8.0, False).relative_residual == 0.25
    assert SolveInfo(0, 0.0, 0.0, True).relative_residual == 0.0
    assert SolveInfo(1, 1e-3, 1e3, True, None).relative_residual == pytest.approx(1e-6)
    assert SolveInfo(1, 1.0, 2.0, False, "x").breakdown == "x"
