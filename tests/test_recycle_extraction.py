"""The recycle-space extraction (``implicitbilevel.solvers.subspaces``) against dense references:
Rayleigh–Ritz and harmonic Ritz pairs on the span of recorded vectors, computed here from an
explicit orthonormal basis with numpy/scipy, including rank-deficient and zero rows."""

import numpy as np
import pytest
import scipy.linalg
import torch

from implicitbilevel.solvers import subspaces


def _problem(seed: int, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, m = 120, 10
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.concatenate([np.linspace(-2.0, -0.05, 15), np.linspace(0.02, 4.0, n - 15)])
    a = q @ np.diag(ev) @ q.T
    z = rng.standard_normal((m, n))
    if kind == "zero-row":
        z[2] = 0.0
    if kind == "dependent":
        z[4] = 3.0 * z[1] - z[0]
    return a, z, z @ a


def _basis(z: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the row span of ``z`` (rows), by SVD."""
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    return vt[s > 1e-10 * s.max()]


def _check_space(space, a: np.ndarray, span: np.ndarray) -> None:
    w, aw, theta = (t.numpy() for t in space)
    assert np.allclose(w @ w.T, np.eye(len(w)), atol=1e-12)  # orthonormal rows
    assert np.allclose(w @ a, aw, atol=1e-12)  # AW is the product of W
    assert np.allclose(w @ aw.T, np.diag(theta), atol=1e-12)  # Ritz pairs on span(W)
    assert np.allclose(w - (w @ span.T) @ span, 0.0, atol=1e-12)  # W lies in span(Z)


@pytest.mark.parametrize("kind", ["plain", "zero-row", "dependent"])
def test_ritz_smallest_against_a_dense_rayleigh_ritz(kind):
    a, z, az = _problem(0, kind)
    span = _basis(z)
    theta_ref = np.linalg.eigvalsh(span @ a @ span.T)
    k = 3
    space = subspaces.ritz_smallest(torch.from_numpy(z), torch.from_numpy(az), k)
    _check_space(space, a, span)
    expected = np.sort(theta_ref[theta_ref > 0])[:k]  # the smallest positive Ritz values
    assert np.allclose(np.sort(space[2].numpy()), expected, atol=1e-10)


@pytest.mark.parametrize("kind", ["plain", "zero-row", "dependent"])
def test_harmonic_ritz_vectors_nearest_zero_against_scipy(kind):
    a, z, az = _problem(1, kind)
    span = _basis(z)
    f, g = span @ a @ span.T, (span @ a) @ (span @ a).T
    # harmonic Ritz values θ: F y = θ G y ⇔ G y = (1/θ) F y; nearest zero = largest |1/θ|
    nu, y = scipy.linalg.eigh(f, g)
    k = 3
    chosen = y[:, np.argsort(-np.abs(nu))[:k]]
    ref = scipy.linalg.orth((chosen.T @ span).T).T  # the span of the harmonic Ritz vectors
    space = subspaces.harmonic_nearest_zero(torch.from_numpy(z), torch.from_numpy(az), k)
    _check_space(space, a, span)
    w = space[0].numpy()
    assert np.allclose(w.T @ w, ref.T @ ref, atol=1e-8)  # the same k-dimensional space


def test_no_direction_gives_no_space():
    z = torch.zeros(3, 20, dtype=torch.float64)
    assert subspaces.ritz_smallest(z, z, 2) is None
    assert subspaces.harmonic_nearest_zero(z, z, 2) is None
    w, aw, theta = subspaces.rayleigh_ritz(z, z, False)
    assert w.shape == (0, 20) and aw.shape == (0, 20) and theta.shape == (0,)
    x = torch.randn(3, 20, dtype=torch.float64)
    assert subspaces.ritz_smallest(x, 0 * x, 2) is None  # A = 0 on the span: nothing positive
