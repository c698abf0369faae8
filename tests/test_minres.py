"""Tests of :class:`implicitbilevel.solvers.minres.MINRES` on random symmetric indefinite systems.

The systems are ``A = Q diag(λ) Qᵀ`` with a random orthogonal ``Q`` and a drawn spectrum: magnitudes
log-uniform in ``[1, κ]`` (both ends attained), signs random with at least one of each (``n >= 2``),
so the condition number is ``κ`` and ``A`` is indefinite. hypothesis draws the dimension (1..40),
dtype (float32/float64), ``κ`` and a seed. Vectors are split into a parameter dict of 1-3 tensors of
different shapes.

References, all independent of the solver's recurrences:

- ``torch.linalg.solve`` / ``numpy.linalg.pinv`` for converged solves;
- the Krylov least-squares minimiser ``argmin ||b − A x||`` over ``x0 + K_k(A, r0)``
  (preconditioned: ``argmin ||b − A x||_{M⁻¹}`` over ``x0 + K_k(M⁻¹A, M⁻¹r0)``), computed in
  float64 numpy from an explicitly orthonormalised Krylov basis, for truncated solves;
- the true residual ``||b − A x||`` computed in float64 from the returned iterate;
- :class:`~implicitbilevel.solvers.CG` on positive definite systems.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import make_matvec, rel_err, split_shapes, to_flat, to_tree, to_tree_t

from implicitbilevel.solvers import CG
from implicitbilevel.solvers.minres import MINRES

SETTINGS = settings(max_examples=30, deadline=None)
F64 = torch.float64


# ----------------------------------------------------------------------------- system builders


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def indefinite_spectrum(n: int, kappa: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` eigenvalues with magnitudes in ``[1, κ]`` (both attained) and both signs."""
    mags = np.exp(rng.uniform(0.0, math.log(kappa), size=n))
    signs = rng.choice([-1.0, 1.0], size=n)
    if n >= 2:
        mags[:2] = [1.0, kappa]
        signs[:2] = [-1.0, 1.0] if rng.random() < 0.5 else [1.0, -1.0]
    return signs * mags


def from_spectrum(eig: np.ndarray, q: np.ndarray) -> np.ndarray:
    a = (q * eig) @ q.T
    return 0.5 * (a + a.T)


def diagonal_preconditioner(d: np.ndarray, shapes, dtype=F64):
    """``r ↦ diag(d) r``, i.e. ``M⁻¹ = diag(d)``."""
    d_t = torch.tensor(d, dtype=dtype)

    def build(matvec):
        def apply(r):
            flat = torch.cat([r[f"block{i}"].reshape(-1) for i in range(len(shapes))])
            return to_tree_t(d_t * flat, shapes)

        return apply

    return build


@st.composite
def systems(draw, dtypes=(torch.float32, torch.float64), n_max: int = 40):
    n = draw(st.integers(1, n_max))
    dtype = draw(st.sampled_from(dtypes))
    log_kappa = draw(st.floats(0.0, 3.0 if dtype == F64 else 2.0, allow_subnormal=False))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    a = from_spectrum(indefinite_spectrum(n, 10.0**log_kappa, rng), random_orthogonal(n, rng))
    return {"n": n, "dtype": dtype, "a": a, "b": rng.standard_normal(n),
            "shapes": split_shapes(n, rng), "rng": rng}


def rounding_floor(a: np.ndarray, b: np.ndarray, x: np.ndarray, kappa: float | None = None
                   ) -> float:
    """``100·n·eps·κ·(||b|| + ||A||·||x||)``: how far MINRES's residual recurrence may drift from
    the true residual in float64 (the gap grows with ``κ = cond(A)``, Sleijpen, van der Vorst and
    Modersitzki 2000, as the search directions ``w_k`` come from a three-term recurrence)."""
    kappa = float(np.linalg.cond(a)) if kappa is None else kappa
    scale = np.linalg.norm(b) + np.linalg.norm(a, 2) * np.linalg.norm(x)
    return 100 * a.shape[0] * float(np.finfo(np.float64).eps) * kappa * float(scale)


# ----------------------------------------------------------------------------- references


def krylov_minimizer(a, b, k, x0=None, m_inv=None):
    """``argmin ||b − A x||_{M⁻¹}`` over ``x0 + K_k(M⁻¹A, M⁻¹r0)``, float64, explicit basis.

    The basis is orthonormalised by twice-repeated Gram-Schmidt; it stops growing when the Krylov
    space is invariant (then the minimiser is the exact solution there).
    """
    n = a.shape[0]
    x0 = np.zeros(n) if x0 is None else x0
    m_inv = np.eye(n) if m_inv is None else m_inv
    r0 = b - a @ x0
    basis: list[np.ndarray] = []
    vec = m_inv @ r0
    for _ in range(min(k, n)):
        before = np.linalg.norm(vec)
        for _ in range(2):
            for q in basis:
                vec = vec - (q @ vec) * q
        norm = np.linalg.norm(vec)
        if norm <= 1e-10 * before:  # invariant Krylov space
            break
        basis.append(vec / norm)
        vec = m_inv @ (a @ basis[-1])
    kb = np.stack(basis, axis=1)
    c = np.linalg.cholesky(m_inv)  # ||r||²_{M⁻¹} = ||Cᵀ r||²
    y = np.linalg.lstsq(c.T @ a @ kb, c.T @ r0, rcond=None)[0]
    return x0 + kb @ y


# ----------------------------------------------------------------------------- full solves


@SETTINGS
@given(systems())
def test_solves_random_indefinite_systems(sys):
    n, dtype, a, b, shapes = sys["n"], sys["dtype"], sys["a"], sys["b"], sys["shapes"]
    f64 = dtype == F64
    b_tree = to_tree(b, shapes, dtype)
    counter: list = []
    max_iter = 3 * n + 10  # loss of orthogonality in floating point costs up to ~3n products
    x, info = MINRES(max_iter=max_iter, tol=1e-12 if f64 else 1e-5)(
        make_matvec(a, shapes, dtype, counter), b_tree)
    assert list(x) == list(b_tree)
    assert all(x[k].shape == b_tree[k].shape and x[k].dtype == dtype for k in x)
    assert info.converged and info.breakdown is None
    assert info.iterations == len(counter) <= max_iter
    ref = torch.linalg.solve(torch.tensor(a), torch.tensor(b)).numpy()
    assert rel_err(to_flat(x), ref) < (1e-8 if f64 else 1e-3)
    # The recurrence's residual is the true one up to rounding. In float32 the matrix the solver
    # sees is A rounded to float32, so the true residual is measured against that matrix.
    a_used = a if f64 else a.astype(np.float32).astype(np.float64)
    b_used = b if f64 else b.astype(np.float32).astype(np.float64)
    xf = to_flat(x)
    true_res = float(np.linalg.norm(b_used - a_used @ xf))
    eps = torch.finfo(dtype).eps
    floor = rounding_floor(a_used, b_used, xf) * eps / np.finfo(np.float64).eps
    assert abs(info.residual_norm - true_res) <= floor
    assert info.rhs_norm == pytest.approx(float(np.linalg.norm(b_used)), rel=10 * eps)


@settings(max_examples=20, deadline=None)
@given(systems(dtypes=(F64,), n_max=30), st.integers(1, 8))
def test_truncated_iterates_are_krylov_minimizers(sys, k):
    """``max_iter = j`` gives the residual minimiser over ``K_j``; ``φ_j`` is its residual norm and
    is non-increasing in ``j``."""
    a, b, shapes = sys["a"], sys["b"], sys["shapes"]
    mv = make_matvec(a, shapes)
    previous = math.inf
    for j in range(1, k + 1):
        x, info = MINRES(max_iter=j)(mv, to_tree(b, shapes))
        xf = to_flat(x)
        true_res = float(np.linalg.norm(b - a @ xf))
        floor = rounding_floor(a, b, xf)
        assert info.residual_norm == pytest.approx(true_res, rel=1e-8, abs=floor)
        assert info.residual_norm <= previous  # exactly: φ_j = s_j·φ_{j−1} with 0 <= s_j <= 1
        previous = info.residual_norm
        if info.iterations < j:  # converged (residual floor or an invariant Krylov space)
            assert info.converged and info.breakdown is None
            assert true_res <= floor
            break
        assert info.iterations == j
        if j < sys["n"]:  # at j = n the exact minimiser is A⁻¹b, which rounding delays
            ref = krylov_minimizer(a, b, j)
            assert float(np.linalg.norm(b - a @ ref)) == pytest.approx(true_res, rel=1e-7,
                                                                        abs=floor)
            assert rel_err(xf, ref) < 1e-6


def test_tol_stops_at_the_first_iterate_below_it():
    rng = np.random.default_rng(7)
    n = 60  # well-conditioned and larger than the steps needed: no loss of orthogonality yet
    a = from_spectrum(indefinite_spectrum(n, 3.0, rng), random_orthogonal(n, rng))
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    tol = 1e-4
    refs = [float(np.linalg.norm(b - a @ krylov_minimizer(a, b, j))) for j in range(1, n)]
    first = next(j for j, r in enumerate(refs, start=1) if r <= tol * np.linalg.norm(b))
    assert first < n // 2
    thr = tol * np.linalg.norm(b)
    assert refs[first - 1] < 0.9 * thr and refs[first - 2] > 1.02 * thr  # no near-tie
    counter: list = []
    x, info = MINRES(max_iter=3 * n, tol=tol)(make_matvec(a, shapes, F64, counter),
                                              to_tree(b, shapes))
    assert info.converged and info.iterations == first == len(counter)
    assert info.relative_residual <= tol
    assert float(np.linalg.norm(b - a @ to_flat(x))) == pytest.approx(refs[first - 1], rel=1e-6)


# ----------------------------------------------------------------------------- against CG


@pytest.mark.parametrize("seed", range(3))
def test_spd_system_minres_and_cg_agree(seed):
    rng = np.random.default_rng(seed)
    n = 25
    eig = np.exp(rng.uniform(0.0, math.log(200.0), size=n))
    a = from_spectrum(eig, random_orthogonal(n, rng))
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    mv = make_matvec(a, shapes)
    x_m, info_m = MINRES(max_iter=4 * n, tol=1e-12)(mv, to_tree(b, shapes))
    x_c, info_c = CG(max_iter=4 * n, tol=1e-12)(mv, to_tree(b, shapes))
    assert info_m.converged and info_c.converged
    assert rel_err(to_flat(x_m), to_flat(x_c)) < 1e-9
    assert rel_err(to_flat(x_m), np.linalg.solve(a, b)) < 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_minres_converges_where_cg_meets_negative_curvature(seed):
    rng = np.random.default_rng(20 + seed)
    n = 20
    eig = rng.uniform(0.5, 3.0, size=n)
    eig[:4] *= -1.0  # A = I + H/μ with four eigenvalues of H below −μ
    a = from_spectrum(eig, random_orthogonal(n, rng))
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    mv = make_matvec(a, shapes)
    _, info_c = CG(max_iter=4 * n, tol=1e-10)(mv, to_tree(b, shapes))
    assert info_c.breakdown is not None and "non-positive curvature" in info_c.breakdown
    x, info = MINRES(max_iter=4 * n, tol=1e-10)(mv, to_tree(b, shapes))
    assert info.converged and info.breakdown is None
    assert rel_err(to_flat(x), np.linalg.solve(a, b)) < 1e-8


# ----------------------------------------------------------------------------- x0, warm start


def test_x0_at_the_solution_costs_one_product():
    rng = np.random.default_rng(6)
    n = 12
    a = from_spectrum(indefinite_spectrum(n, 10.0, rng), random_orthogonal(n, rng))
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    exact = np.linalg.solve(a, b)
    counter: list = []
    x0 = to_tree(exact, shapes)
    x, info = MINRES(max_iter=10, tol=1e-10)(make_matvec(a, shapes, F64, counter),
                                             to_tree(b, shapes), x0=x0)
    assert info.iterations == 1 == len(counter)
    assert info.converged and info.breakdown is None
    assert np.array_equal(to_flat(x), exact)
    assert info.residual_norm == pytest.approx(np.linalg.norm(b - a @ exact), abs=1e-15)
    assert all(x[k] is not x0[k] for k in x)  # a copy, not the caller's tensors


@pytest.mark.parametrize("j", [1, 2, 3, 6])
def test_x0_solves_for_the_correction(j):
    """With ``x0``, ``max_iter = j + 1`` is one product for ``r0`` and ``j`` Lanczos steps."""
    rng = np.random.default_rng(8)
    n = 15
    a = from_spectrum(indefinite_spectrum(n, 30.0, rng), random_orthogonal(n, rng))
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    x0 = rng.standard_normal(n)
    counter: list = []
    x, info = MINRES(max_iter=j + 1)(make_matvec(a, shapes, F64, counter), to_tree(b, shapes),
                                     x0=to_tree(x0, shapes))
    assert info.iterations == j + 1 == len(counter)
    ref = krylov_minimizer(a, b, j, x0=x0)
    assert rel_err(to_flat(x), ref) < 1e-9
    assert info.residual_norm == pytest.approx(np.linalg.norm(b - a @ ref), rel=1e-9)
    assert info.rhs_norm == pytest.approx(np.linalg.norm(b))


def test_warm_start_needs_fewer_iterations():
    rng = np.random.default_rng(5)
    n = 60
    q = random_orthogonal(n, rng)
    eig = indefinite_spectrum(n, 300.0, rng)
    a = from_spectrum(eig, q)
    e = rng.standard_normal((n, n)) * 1e-4
    a2 = a + 0.5 * (e + e.T)
    b = rng.standard_normal(n)
    b2 = b + 1e-4 * rng.standard_normal(n)
    shapes = split_shapes(n, rng)

    warm = MINRES(max_iter=500, tol=1e-9, warm_start=True)
    _, info1 = warm(make_matvec(a, shapes), to_tree(b, shapes))
    assert info1.converged
    x2, info_warm = warm(make_matvec(a2, shapes), to_tree(b2, shapes))
    cold = MINRES(max_iter=500, tol=1e-9)
    x3, info_cold = cold(make_matvec(a2, shapes), to_tree(b2, shapes))
    assert info_warm.converged and info_cold.converged
    assert info_warm.iterations < info_cold.iterations
    ref = np.linalg.solve(a2, b2)
    assert rel_err(to_flat(x2), ref) < 1e-6 and rel_err(to_flat(x3), ref) < 1e-6
    _, again = cold(make_matvec(a2, shapes), to_tree(b2, shapes))
    assert again.iterations == info_cold.iterations  # no memory without warm_start

    # Other parameter names: the previous solution is not used.
    renamed = {f"other{i}": t for i, t in enumerate(to_tree(b2, shapes).values())}

    def mv_renamed(v):
        out = make_matvec(a2, shapes)({f"block{i}": t for i, t in enumerate(v.values())})
        return {f"other{i}": t for i, t in enumerate(out.values())}

    _, info_renamed = warm(mv_renamed, renamed)
    assert info_renamed.iterations == info_cold.iterations


# ----------------------------------------------------------------------------- preconditioning


@settings(max_examples=20, deadline=None)
@given(systems(dtypes=(F64,), n_max=25), st.integers(1, 6),
       st.floats(0.0, 1.0, allow_subnormal=False))
def test_preconditioned_iterates_minimize_the_m_inverse_norm(sys, k, log_spread):
    """``M⁻¹ = diag(d)``, ``d`` log-uniform in ``[10^-s, 10^s]``: the iterate after ``j`` products
    minimises ``||b − A x||_{M⁻¹}`` over ``K_j(M⁻¹A, M⁻¹b)``; that norm is non-increasing in ``j``;
    ``residual_norm`` is the true 2-norm."""
    a, b, shapes, rng, n = sys["a"], sys["b"], sys["shapes"], sys["rng"], sys["n"]
    d = 10.0 ** rng.uniform(-log_spread, log_spread, size=n)
    pre = diagonal_preconditioner(d, shapes)
    mv = make_matvec(a, shapes)
    root_d = np.sqrt(d)
    kappa = float(np.linalg.cond(root_d[:, None] * a * root_d[None, :]))  # of M^{-1/2} A M^{-1/2}
    previous = math.inf
    for j in range(1, k + 1):
        x, info = MINRES(max_iter=j, preconditioner=pre)(mv, to_tree(b, shapes))
        xf = to_flat(x)
        r = b - a @ xf
        floor = rounding_floor(a, b, xf, kappa) * float(root_d.max() / root_d.min())
        # residual_norm is the 2-norm of the residual (the stopping test's), not its M⁻¹-norm.
        assert info.residual_norm == pytest.approx(np.linalg.norm(r), rel=1e-8, abs=floor)
        m_norm = float(np.sqrt(r @ (d * r)))
        assert m_norm <= previous * (1 + 1e-12) + floor
        previous = m_norm
        if info.iterations < j:
            assert info.converged and info.breakdown is None
            break
        if j < n:  # at j = n the exact minimiser is A⁻¹b, which rounding delays
            ref = krylov_minimizer(a, b, j, m_inv=np.diag(d))
            ref_r = b - a @ ref
            assert m_norm == pytest.approx(float(np.sqrt(ref_r @ (d * ref_r))), rel=1e-7,
                                           abs=floor)
            if m_norm > 1e3 * floor:
                assert rel_err(xf, ref) < 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_preconditioner_cuts_iterations_on_an_ill_conditioned_indefinite_system(seed):
    rng = np.random.default_rng(40 + seed)
    n = 40
    q = random_orthogonal(n, rng)
    eig = indefinite_spectrum(n, 1e4, rng)
    a = from_spectrum(eig, q)
    # M ≈ |A|: the absolute-value spectral approximation, eigenvalues perturbed by up to 30%.
    m_inv = from_spectrum(1.0 / (np.abs(eig) * rng.uniform(0.7, 1.3, size=n)), q)
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    m_inv_t = torch.tensor(m_inv)

    def pre(matvec):
        def apply(r):
            flat = torch.cat([r[f"block{i}"].reshape(-1) for i in range(len(shapes))])
            return to_tree_t(m_inv_t @ flat, shapes)

        return apply

    calls: list = []
    x_p, info_p = MINRES(max_iter=400, tol=1e-10, preconditioner=pre)(
        make_matvec(a, shapes, F64, calls), to_tree(b, shapes))
    x_u, info_u = MINRES(max_iter=400, tol=1e-10)(make_matvec(a, shapes), to_tree(b, shapes))
    ref = np.linalg.solve(a, b)
    assert info_p.converged and info_u.converged
    assert info_p.breakdown is None
    assert rel_err(to_flat(x_p), ref) < 1e-6 and rel_err(to_flat(x_u), ref) < 1e-6
    assert info_p.iterations == len(calls) < info_u.iterations / 3
    assert info_p.residual_norm == pytest.approx(np.linalg.norm(b - a @ to_flat(x_p)), rel=1e-3)


@pytest.mark.parametrize("kind", ["negative", "indefinite", "zero"])
def test_non_positive_definite_preconditioner_is_reported(kind):
    rng = np.random.default_rng(0)
    n = 10
    a = from_spectrum(rng.uniform(0.5, 3.0, n) * rng.choice([-1, 1], n), random_orthogonal(n, rng))
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    d = {"negative": -np.ones(n), "zero": np.zeros(n),
         "indefinite": np.where(np.arange(n) < 5, -0.3, 1.0)}[kind]
    counter: list = []
    mv = make_matvec(a, shapes, F64, counter)
    x, info = MINRES(max_iter=30, tol=1e-10, preconditioner=diagonal_preconditioner(d, shapes))(
        mv, to_tree(b, shapes))
    assert info.breakdown is not None and "not positive definite" in info.breakdown
    assert not info.converged
    assert info.iterations == len(counter)
    if kind == "indefinite":
        assert b @ (d * b) > 0 and info.iterations >= 1  # found during the iteration
    else:
        assert info.iterations == 0
    # The returned iterate is the last good one: the same solver stopped one product earlier.
    x_prev, _ = MINRES(max_iter=info.iterations, preconditioner=diagonal_preconditioner(
        d, shapes))(make_matvec(a, shapes), to_tree(b, shapes))
    np.testing.assert_array_equal(to_flat(x), to_flat(x_prev))
    assert info.residual_norm == pytest.approx(np.linalg.norm(b - a @ to_flat(x)), rel=1e-9)


# ----------------------------------------------------------------------------- termination


@pytest.mark.parametrize("case", ["identity", "scaled-identity", "diagonal", "eigenvector"])
def test_lanczos_termination_converges_in_one_product(case):
    rng = np.random.default_rng(9)
    n = 12
    shapes = split_shapes(n, rng)
    if case == "eigenvector":
        a = from_spectrum(indefinite_spectrum(n, 20.0, rng), random_orthogonal(n, rng))
        w, vecs = np.linalg.eigh(a)
        j = int(np.argmax(np.abs(w)))
        b, lam = 3.0 * vecs[:, j], w[j]
    else:
        lam = {"identity": 1.0, "scaled-identity": -2.5, "diagonal": -4.0}[case]
        a = lam * np.eye(n)
        b = rng.standard_normal(n)
        if case == "diagonal":
            a = np.diag(np.linspace(-3.0, 5.0, n))
            a[4, 4] = lam
            b = np.zeros(n)
            b[4] = 2.0
    counter: list = []
    x, info = MINRES(max_iter=10)(make_matvec(a, shapes, F64, counter), to_tree(b, shapes))
    assert info.iterations == 1 == len(counter)
    assert info.converged and info.breakdown is None
    np.testing.assert_allclose(to_flat(x), b / lam, rtol=1e-13, atol=1e-15)
    assert info.residual_norm <= 1e-14 * np.linalg.norm(b)


# ----------------------------------------------------------------------------- singular systems


def singular_system(n: int, nz: int, rng):
    q = random_orthogonal(n, rng)
    eig = rng.uniform(0.5, 5.0, n) * rng.choice([-1.0, 1.0], n)
    eig[:nz] = 0.0
    return from_spectrum(eig, q), q[:, :nz]


@pytest.mark.parametrize("seed", range(4))
def test_singular_consistent_system_converges_to_the_minimum_norm_solution(seed):
    rng = np.random.default_rng(60 + seed)
    n = 20
    a, null = singular_system(n, 2, rng)
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    b -= null @ (null.T @ b)  # b in the range of A
    x, info = MINRES(max_iter=5 * n, tol=1e-12)(make_matvec(a, shapes), to_tree(b, shapes))
    assert info.converged and info.breakdown is None
    assert rel_err(to_flat(x), np.linalg.pinv(a) @ b) < 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_singular_inconsistent_system_is_reported(seed):
    """A small system whose Lanczos process terminates cleanly: the recurrence sees ``γ̄ = 0``."""
    rng = np.random.default_rng(70 + seed)
    n = 6
    a, null = singular_system(n, 1, rng)
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    b_null = float(np.linalg.norm(null.T @ b))
    counter: list = []
    x, info = MINRES(max_iter=5 * n, tol=1e-10)(make_matvec(a, shapes, F64, counter),
                                                 to_tree(b, shapes))
    assert info.breakdown is not None and "singular" in info.breakdown
    assert not info.converged
    assert info.iterations == len(counter) <= n + 1
    r = b - a @ to_flat(x)
    # x is a least-squares solution: its residual is b's null-space component.
    assert info.residual_norm == pytest.approx(b_null, rel=1e-9)
    assert float(np.linalg.norm(r)) == pytest.approx(b_null, rel=1e-9)
    assert float(np.linalg.norm(a @ r)) <= 1e-10 * np.linalg.norm(b)


@pytest.mark.parametrize("seed", [1, 2, 3, 18])
def test_numerically_singular_growth_is_refused(seed):
    """Loss of orthogonality hides ``γ̄ = 0`` here; the solver's singularity checks still catch it
    before ``x`` is ruined (the plain recurrence moves ``x`` to ~1e15 and reports a residual of
    order 0.1 while the true one is ~1e15). Which check fires first depends on rounding (the BLAS
    build): a refused step leaves ``x`` untouched; an iterate found too far is rolled back, to
    rounding; a residual found in the numerical null space of ``A`` ends the solve there."""
    rng = np.random.default_rng(seed)
    n = 30
    a, null = singular_system(n, 2, rng)
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    mv = make_matvec(a, shapes)
    x, info = MINRES(max_iter=5 * n, tol=1e-12)(mv, to_tree(b, shapes))
    assert info.breakdown is not None and "singular" in info.breakdown
    assert not info.converged and info.iterations < 5 * n
    true_res = float(np.linalg.norm(b - a @ to_flat(x)))
    b_null = float(np.linalg.norm(null.T @ b))
    assert info.residual_norm == pytest.approx(true_res, rel=1e-3)
    # ‖b − Ax‖ ≥ ‖P(b − Ax)‖ ≥ ‖Pb‖ − ‖AP‖‖x‖ for the projector P on the null space: the
    # constructed null space is exact only to rounding (‖AP‖ ~ 1e-15), and an iterate of size
    # ~1e9 along it may take off up to ‖AP‖‖x‖ (seed 2 with numpy 2.4's OpenBLAS: 1.5e-7).
    slack = float(np.linalg.norm(a @ null, 2) * np.linalg.norm(to_flat(x)))
    assert (1 - 1e-9) * b_null - slack <= true_res <= 1.01 * b_null
    x_prev, info_prev = MINRES(max_iter=info.iterations - 1, tol=1e-12)(mv, to_tree(b, shapes))
    assert info_prev.breakdown is None
    if "the step would move x" in info.breakdown:
        assert info.residual_norm == info_prev.residual_norm
        np.testing.assert_array_equal(to_flat(x), to_flat(x_prev))
    elif "numerically singular" in info.breakdown:
        assert info.residual_norm == info_prev.residual_norm
        assert rel_err(to_flat(x), to_flat(x_prev)) < 1e-9
    else:
        assert "numerical null space" in info.breakdown


@pytest.mark.parametrize("seed", range(6))
def test_preconditioned_singular_inconsistent_system_is_reported(seed):
    rng = np.random.default_rng(80 + seed)
    n = 6 if seed < 4 else 25  # n = 25: found by the growth bound after loss of orthogonality
    a, _ = singular_system(n, 1, rng)
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    d = 10.0 ** rng.uniform(-1.0, 1.0, n)
    counter: list = []
    x, info = MINRES(max_iter=5 * n, tol=1e-10, preconditioner=diagonal_preconditioner(
        d, shapes))(make_matvec(a, shapes, F64, counter), to_tree(b, shapes))
    assert info.breakdown is not None and "singular" in info.breakdown
    assert not info.converged and info.iterations == len(counter) < 5 * n
    r = b - a @ to_flat(x)
    assert np.isfinite(r).all()
    if n == 6:
        # A least-squares solution in the M⁻¹-norm: A M⁻¹ r = 0; residual_norm is its 2-norm.
        assert info.residual_norm == pytest.approx(np.linalg.norm(r), rel=1e-9)
        assert float(np.linalg.norm(a @ (d * r))) <= 1e-10 * np.linalg.norm(b)
    else:
        assert info.residual_norm == pytest.approx(np.linalg.norm(r), rel=1e-2)


def test_rhs_in_the_null_space_is_reported_at_the_first_product():
    shapes = [(3,), (2, 2)]
    a = np.diag([1.0, -2.0, 0.0, 3.0, 0.5, -1.0, 2.0])
    b = np.zeros(7)
    b[2] = 2.0  # A b = 0 exactly
    x, info = MINRES(max_iter=10)(make_matvec(a, shapes), to_tree(b, shapes))
    assert info.breakdown is not None and "singular" in info.breakdown
    assert info.iterations == 1 and not info.converged
    assert np.all(to_flat(x) == 0.0)
    assert info.residual_norm == 2.0


# ----------------------------------------------------------------------------- failures, edges


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("after", [0, 2])
def test_non_finite_matvec_is_reported(bad, after):
    rng = np.random.default_rng(4)
    n = 9
    a = from_spectrum(indefinite_spectrum(n, 10.0, rng), random_orthogonal(n, rng))
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    good = make_matvec(a, shapes)
    calls: list = []

    def matvec(v):
        calls.append(1)
        out = good(v)
        if len(calls) > after:
            out = {k: t.clone() for k, t in out.items()}
            out["block0"].view(-1)[0] = bad
        return out

    x, info = MINRES(max_iter=10)(matvec, to_tree(b, shapes))
    assert info.breakdown is not None and "non-finite" in info.breakdown
    assert not info.converged and info.iterations == after + 1
    x_ref, _ = MINRES(max_iter=after)(good, to_tree(b, shapes))
    np.testing.assert_array_equal(to_flat(x), to_flat(x_ref))  # the last good iterate


def test_non_finite_preconditioner_and_rhs_are_reported():
    shapes = [(3,), (2, 2)]
    b = to_tree(np.arange(1.0, 8.0), shapes)
    mv = make_matvec(np.diag(np.linspace(-2.0, 3.0, 7)), shapes)

    def pre(matvec):
        return lambda r: {k: torch.full_like(t, math.nan) for k, t in r.items()}

    x, info = MINRES(max_iter=5, preconditioner=pre)(mv, b)
    assert "non-finite" in info.breakdown and info.iterations == 0 and not info.converged
    assert np.all(to_flat(x) == 0.0)
    b_bad = {k: t.clone() for k, t in b.items()}
    b_bad["block1"][0, 0] = math.inf
    x, info = MINRES(max_iter=5)(mv, b_bad)
    assert "non-finite" in info.breakdown and info.iterations == 0 and not info.converged


@pytest.mark.parametrize("with_x0", [False, True])
def test_zero_rhs_gives_zero_without_products(with_x0):
    shapes = [(3,), (2, 2)]
    counter: list = []
    mv = make_matvec(np.diag(np.linspace(-2.0, 3.0, 7)), shapes, F64, counter)
    x0 = to_tree(np.ones(7), shapes) if with_x0 else None
    x, info = MINRES(max_iter=5, tol=1e-6)(mv, to_tree(np.zeros(7), shapes), x0=x0)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in x.values())
    assert info.iterations == 0 == len(counter)
    assert info.converged and info.breakdown is None
    assert info.residual_norm == 0.0 == info.rhs_norm == info.relative_residual


def test_max_iter_zero():
    shapes = [(3,), (2, 2)]
    counter: list = []
    mv = make_matvec(np.diag(np.linspace(-2.0, 3.0, 7)), shapes, F64, counter)
    b = to_tree(np.arange(1.0, 8.0), shapes)
    x, info = MINRES(max_iter=0)(mv, b)
    assert np.all(to_flat(x) == 0.0) and info.iterations == 0 and not info.converged
    assert info.residual_norm == pytest.approx(np.linalg.norm(np.arange(1.0, 8.0)))
    x, info = MINRES(max_iter=0)(mv, b, x0=to_tree(np.ones(7), shapes))
    assert np.all(to_flat(x) == 1.0) and info.iterations == 0 and math.isnan(info.residual_norm)
    assert counter == []


@pytest.mark.parametrize(
    "kwargs",
    [{"max_iter": 2.5}, {"max_iter": -1}, {"max_iter": True}, {"max_iter": "5"},
     {"tol": -1e-3}, {"tol": math.nan}, {"atol": -1.0}],
)
def test_invalid_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        MINRES(**kwargs)


def test_defaults_and_float32_preconditioned_solve():
    solver = MINRES()
    assert (solver.max_iter, solver.tol, solver.atol, solver.warm_start) == (5, 0.0, 0.0, False)
    assert solver.preconditioner is None
    rng = np.random.default_rng(11)
    n = 16
    a = from_spectrum(indefinite_spectrum(n, 20.0, rng), random_orthogonal(n, rng))
    shapes = split_shapes(n, rng)
    b = rng.standard_normal(n)
    d = rng.uniform(0.5, 2.0, n)
    x, info = MINRES(max_iter=60, tol=1e-5, preconditioner=diagonal_preconditioner(
        d, shapes, torch.float32))(make_matvec(a, shapes, torch.float32),
                                   to_tree(b, shapes, torch.float32))
    assert all(t.dtype == torch.float32 for t in x.values())
    assert info.converged and info.breakdown is None
    assert rel_err(to_flat(x), np.linalg.solve(a, b)) < 1e-3
