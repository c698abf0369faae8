"""``benchmarks/reuse_limits.py``: its spectrum against a dense eigendecomposition, the deflation
bound in closed form, and the Krylov floor read off its own residual histories."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks import reuse_limits
from benchmarks.recycled_upper_step import Settings as StepSettings
from benchmarks.recycled_upper_step import alternation_workload
from benchmarks.reference import flat
from implicitbilevel import CG
from implicitbilevel.tree import tree_unflatten

pytestmark = pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")


def test_deflation_factor_in_closed_form():
    largest, smallest = [9.0, 4.0, 1.0], [-5.0, -2.0, 0.0]
    d0 = reuse_limits.deflation_factor(largest, smallest, mu=10.0, r=0)
    assert (d0["a_min"], d0["a_max"]) == pytest.approx((0.5, 1.9))
    assert d0["kappa"] == pytest.approx(3.8)
    assert d0["rho"] == pytest.approx((math.sqrt(3.8) - 1) / (math.sqrt(3.8) + 1))
    d1 = reuse_limits.deflation_factor(largest, smallest, mu=10.0, r=1)
    assert d1["kappa"] == pytest.approx(1.4 / 0.8)
    # an indefinite A has no CG factor
    indefinite = reuse_limits.deflation_factor(largest, [-20.0], mu=10.0, r=0)
    assert indefinite["kappa"] == math.inf and math.isnan(indefinite["rho"])


def test_spectrum_floor_and_bound_on_a_tiny_cnn(tmp_path, one_thread):
    s = reuse_limits.Settings(arch="tiny-cnn", batch=4, top=4, bottom=3, repeats=1,
                              max_products=6, eig_tol=1e-8)
    results = reuse_limits.run(s, str(tmp_path), "test", "limits", log=lambda _: None)
    # the same alternation, rebuilt: the dense matrix of its curvature operator
    wl = alternation_workload(StepSettings(arch="tiny-cnn", batch=4, mu=s.mu), lambda _: None)
    names = wl["names"]
    problem = wl["problem"](CG(max_iter=5))
    hess = problem.lower_hessian(wl["upper"], wl["lower"], wl["lower_batch"])
    system = problem.system(wl["upper"], wl["lower"], hess, s.mu)
    like = {n: wl["lower"][n] for n in names}
    n = sum(t.numel() for t in like.values())
    columns = []
    for e in torch.eye(n):
        with torch.no_grad():
            columns.append(flat(system.curvature_product(tree_unflatten(e, like)),
                                names).double())
    dense = torch.stack(columns, 1).numpy()
    eig = np.linalg.eigvalsh((dense + dense.T) / 2)
    scale = np.abs(eig).max()
    sp = results["spectrum"]
    assert np.allclose(sp["largest"], eig[::-1][: s.top], atol=1e-4 * scale)
    assert np.allclose(sp["smallest"], eig[: s.bottom], atol=1e-4 * scale)
    # the deflation rows use the measured eigenvalues
    d0 = results["deflation"][0]
    assert d0["a_max"] == pytest.approx(1 + eig[-1] / s.mu, rel=1e-5)
    # MINRES's residual never grows with more products; k_min is its first k at tol
    minres = results["history"]["MINRES"]
    assert all(b <= a * (1 + 1e-3) for a, b in zip(minres, minres[1:]))
    expected = next((k for k, r in enumerate(minres, 1) if r <= results["tol"]), None)
    assert results["k_min"] == expected
    t = results["seconds"]
    assert results["affordable_products"] == pytest.approx(
        (s.target_ratio * t["original"] - t["upper_grad_0"]) / t["product"])
    assert json.loads((tmp_path / "limits.json").read_text())["k_min"] == results["k_min"]
    assert "Deflating r eigenvalues" in (tmp_path / "limits.md").read_text()


def test_earlier_span_residuals_against_least_squares():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    rhs = [base[:, 0], base[:, 1], base @ torch.tensor([2.0, -1.0], dtype=torch.float64),
           torch.randn(50, generator=gen, dtype=torch.float64)]
    got = reuse_limits.earlier_span_residuals(rhs)
    for i, value in enumerate(got, start=1):
        a = torch.stack(rhs[:i], 1).numpy()
        coef, *_ = np.linalg.lstsq(a, rhs[i].numpy(), rcond=None)
        expected = np.linalg.norm(rhs[i].numpy() - a @ coef) / np.linalg.norm(rhs[i].numpy())
        assert value == pytest.approx(expected, abs=1e-12)
    assert got[1] < 1e-12  # the third is a combination of the first two


def test_eigenvalue_counts_out_of_range_are_refused_and_uneven_ones_deflate_both_ends(one_thread):
    with pytest.raises(ValueError, match="must lie in"):
        reuse_limits.run(reuse_limits.Settings(arch="tiny-cnn", batch=4, top=900, repeats=1),
                         None, "test", "limits", log=lambda _: None)
    s = reuse_limits.Settings(arch="tiny-cnn", batch=4, top=2, bottom=5, repeats=1, max_products=2)
    results = reuse_limits.run(s, None, "test", "limits", log=lambda _: None)
    # the deepest deflation uses the (r + 1)-th eigenvalue at both ends, so r < min(top, bottom)
    assert [d["r"] for d in results["deflation"]] == [0, 1]
    assert results["deflation"][-1]["a_max"] == pytest.approx(
        1 + results["spectrum"]["largest"][1] / s.mu)
