"""The facts of "Reusing the matrix across an alternation" (``docs/choosing_recycled.inc``), read
from the recycled benchmarks' results; ``facts.substitutions`` states them as
``|recycled_<name>|``."""

from __future__ import annotations

import json

from facts_format import RESULTS, _sci

#: The IJ labels of the recipe runs in ``recycled_recipe_ij-cpu.json``.
RECIPE_LABELS = {
    "cg": "GN + CG, N_c = 5 (today's default)",
    "recycled_cg": "GN + RecycledCG, N_c = 5",
    "nystrom_pcg": "GN + Nyström-PCG, rank 4, N_c = 3",
}

# -- Reusing the matrix across an alternation (docs/choosing_recycled.inc) ----------------------
# Read from benchmarks/results/: recycled_upper_step-vision-cpu.json (python
# benchmarks/recycled_upper_step.py --arch vision ...), recycled_ij-mu10-tol-cpu.json and
# recycled_ij-full-mu1000-cpu.json (python benchmarks/recycled_ij.py ...) and
# recycled_recipe_ij-cpu.json (python benchmarks/recycled_recipe_ij.py over recipe runs),
# reuse_limits-resnet18-cpu.json (python benchmarks/reuse_limits.py --arch resnet18 ...).

def _results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


_REC_STEP = _results("recycled_upper_step-vision-cpu")
_REC_PAIRED = _results("recycled_upper_step-vision-paired-cpu")
_REC_STEP18 = _results("recycled_upper_step-resnet18-cpu")
_REC_MU10_RUN = _results("recycled_ij-mu10-tol-cpu")
_REC_MU10 = _REC_MU10_RUN["systems"][0]
_REC_GRID = _results("robust_ij-recycled-cpu")
_REC_MU1000 = json.loads(
    (RESULTS / "recycled_ij-full-mu1000-cpu.json").read_text())["systems"][0]
_REUSE18 = _results("reuse_limits-resnet18-cpu")
_REC_RECIPE = {(r["data"], r["label"]): r for r in json.loads(
    (RESULTS / "recycled_recipe_ij-cpu.json").read_text())["runs"]}


def _rec_row(system: dict, method: str, tol: bool, n_c: int | None = None) -> dict:
    return next(r for r in system["rows"] if r["method"] == method and (r["tol"] > 0) == tol
                and (n_c is None or r["n_c"] == n_c))


def _rec_mu10(method: str) -> dict[str, str]:
    row = _rec_row(_REC_MU10, method, True)
    met = sum(x["residual"] <= 0.1 for x in row["solves"])
    return {"products": f"{row['products_mean']:.1f}", "met": f"{met} of {len(row['solves'])}",
            "residual": f"{row['residual_median']:.2g}",
            "later": f"{row['products_later']:.1f}", "seconds": f"{row['seconds']:.0f}",
            "error": f"{row['error_median']:.2f}"}


def _rec_recipe(data: str, label: str) -> dict[str, str]:
    run = _REC_RECIPE[(data, label)]
    return {"met": f"{run['met']} of {run['alternations']}",
            "median": f"{run['residual_median']:.2g}", "max": f"{run['residual_max']:.2g}",
            "products": f"{run['products_per_upper_step']:.0f}"}


def _step(prefix: str, run: dict, products: str) -> dict[str, str]:
    """Per method of a ``recycled_upper_step`` run: its cost over the original scheme's and its
    products per upper step (``products``: their format)."""
    out = {}
    for r in run["rows"]:
        key = f"{prefix}_{r['method'].replace('-', '_')}"
        if "vs_original" in r:
            out[f"{key}_ratio"] = f"{r['vs_original']:.2f}"
        if "products_per_step" in r:
            out[f"{key}_products"] = format(r["products_per_step"], products)
    return out


def _limits(run: dict) -> dict[str, str]:
    """What a ``reuse_limits`` run says any reuse can save: the spectrum's ends, the deflation
    bound, the per-tensor scales, the Krylov floor and its cost."""
    sp, deflated = run["spectrum"], run["deflation"][-1]
    return {"largest": f"{sp['largest'][0]:.0f}", "top_last": f"{sp['largest'][-1]:.0f}",
            "top_count": str(len(sp["largest"])), "smallest": f"{sp['smallest'][0]:.0f}",
            "a_min": f"{run['deflation'][0]['a_min']:.2f}",
            "a_max": f"{run['deflation'][0]['a_max']:.2f}",
            "rho0": f"{run['deflation'][0]['rho']:.3f}", "rho_r": f"{deflated['rho']:.3f}",
            "r": str(deflated["r"]), "observed": f"{run['observed_cg_factor']:.3f}",
            "scale_min": f"{run['per_tensor']['min']:.4f}",
            "scale_max": f"{run['per_tensor']['max']:.4f}", "k_min": str(run["k_min"]),
            "k_less": _sci(run["history"]["MINRES"][run["k_min"] - 2]),
            "outside_min": f"{min(run['rhs_outside_earlier']):.4f}",
            "floor": f"{run['ratio_floor']:.2f}",
            "affordable": f"{run['affordable_products']:.1f}"}


def _grid(network: str, mu: float, family: str, value: int) -> dict[str, str]:
    """One row of the robust_ij grid with the recycled families (vision or GPT, μ, N_c)."""
    system = next(x for x in _REC_GRID["systems"] if x["network"].startswith(network)
                  and abs(x["mu"] - mu) < 1e-6 * mu)
    r = next(r for r in system["rows"] if r["family"] == family and r["value"] == value)
    return {"error": f"{r['rel_error_median']:.2g}", "ratio": f"{r['cost_over_reference']:.2f}"}


RECYCLED = {
    "step_tol": _sci(_REC_STEP["tol"]),
    **_step("step", _REC_STEP, ".0f"),
    **_step("paired", _REC_PAIRED, ".1f"),
    **_step("step18", _REC_STEP18, ".0f"),
    **{f"grid_{f.replace('-', '_')}{n}_{k}": v for f in ("cg", "recycled-cg") for n in (2, 5)
       for k, v in _grid("vision", 1000.0, f, n).items()},
    **{f"grid_original_{k}": v for k, v in _grid("vision", 1000.0, "reference", 5).items()},
    "step18_tol": _sci(_REC_STEP18["tol"]),
    **{f"limits18_{k}": v for k, v in _limits(_REUSE18).items()},
    "step18_unknowns": f"{_REC_STEP18['workload']['unknowns'] / 1e6:.1f}M",
    "mu1000_cg": _sci(_rec_row(_REC_MU1000, "cg", False, 5)["residual_median"]),
    "mu1000_recycled_cg": _sci(_rec_row(_REC_MU1000, "recycled-cg", False, 5)["residual_median"]),
    "mu1000_lanczos": _sci(_rec_row(_REC_MU1000, "minres-lanczos", False, 5)["residual_median"]),
    **{f"mu10_{k}": str(_REC_MU10_RUN["settings"][field]) for k, field in (
        ("cap", "tolerance_cap"), ("recycle_dim", "recycle_dim"), ("window", "window"),
        ("lanczos_build", "lanczos_products"))},
    **{f"mu10_{m.replace('-', '_')}_{k}": v for m in ("minres", "recycled-minres",
                                                       "minres-lanczos")
       for k, v in _rec_mu10(m).items()},
    **{f"photos_{key}_{k}": v for key, label in RECIPE_LABELS.items()
       for k, v in _rec_recipe("photos", label).items()},
    **{f"digits_recycled_cg_{k}": v
       for k, v in _rec_recipe("digits", RECIPE_LABELS["recycled_cg"]).items()},
}
