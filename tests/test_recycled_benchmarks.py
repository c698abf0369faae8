"""The reuse benchmarks run and count what they say: ``benchmarks/recycled_upper_step.py`` on a
tiny CNN, and the per-alternation table of ``benchmarks/recycled_recipe_ij.py``."""

from __future__ import annotations

import json

import pytest

from benchmarks import recycled_recipe_ij, recycled_upper_step

pytestmark = pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")


def test_upper_step_benchmark_on_a_tiny_cnn(tmp_path, one_thread):
    s = recycled_upper_step.Settings(arch="tiny-cnn", batch=4, upper_steps=3, cap=6)
    results = recycled_upper_step.run(s, str(tmp_path), "test", "step")
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == set(recycled_upper_step.METHODS)
    assert rows["original"]["vs_original"] == 1.0
    assert rows["original"]["products_per_solve"] == [5, 5, 5]
    assert rows["cg-5"]["products_per_step"] <= 5
    for key in ("cg", "recycled-cg", "recycled-minres"):
        assert all(1 <= p <= s.cap for p in rows[key]["products_per_solve"])
        # at μ = 1000 on this network every solve lands on the converged solution
        assert rows[key]["error_max"] < 1e-4
    # the tiny CNN's largest eigenvalues are negative: the Lanczos preconditioner refuses
    lanczos = rows["lanczos-minres"]
    assert "error" in lanczos or lanczos["error_max"] < 1e-4
    markdown = (tmp_path / "step.md").read_text()
    assert "original BiSSL scheme" in markdown and "RecycledCG" in markdown
    assert json.loads((tmp_path / "step.json").read_text())["tol"] == results["tol"]


def test_recipe_table_counts_alternations_and_amortised_products(tmp_path):
    lines = [
        {"ij_relative_residual": 0.05, "ij_exact_relative_residual": 2.0, "hessian_products": 11,
         "solver_iterations": 5.0, "solver_breakdowns": 0, "seconds": 3.0},
        {"ij_relative_residual": 0.2, "ij_exact_relative_residual": 1.0, "hessian_products": 11,
         "solver_iterations": 5.0, "solver_breakdowns": 1, "seconds": 5.0},
        {"ij_relative_residual": 0.1, "ij_exact_relative_residual": 3.0, "hessian_products": 15,
         "solver_iterations": 3.0, "solver_breakdowns": 0, "seconds": 4.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = recycled_recipe_ij.summarise("photos", "CG", str(path), upper_steps=2)
    assert (run["alternations"], run["met"]) == (3, 2)  # 0.05 and 0.1 are at most 0.1
    assert run["residual_median"] == 0.1 and run["residual_max"] == 0.2
    assert run["exact_median"] == 2.0 and run["breakdowns"] == 1
    # (11 − 1)/2, (11 − 1)/2, (15 − 1)/2: one product per alternation measures the residual
    assert run["products_per_upper_step"] == pytest.approx((5 + 5 + 7) / 3)
    assert run["seconds_per_alternation"] == 4.0
    results = recycled_recipe_ij.main(["--run", f"photos|CG|{path}", "--out", str(tmp_path),
                                       "--name", "table"])
    assert "2/3 (67%)" in (tmp_path / "table.md").read_text()
    assert results["runs"][0]["met"] == 2
