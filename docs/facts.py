"""The measured facts the documentation states, each stated once.

The pages read them as substitutions (``|hvp_kept_resnet|``; see ``rst_prolog`` in ``conf.py``);
``README.md``, the config comments and the module docstrings that repeat one are checked against
this file by ``tests/test_docs.py``, and ``tests/test_docs_rendered.py`` checks the built pages.
The benchmark figures are read from the committed results files in ``benchmarks/results/``
(``quick-cpu.json``, written by ``python benchmarks/run.py --quick``; ``beyond_ij-cpu.json``,
written by ``python benchmarks/beyond_ij.py``); the run times and residuals of the recipe runs are
the values their run stated, written here once. ``facts_format`` holds the results folder and
the number formats; ``facts_suite`` the facts of "Implicit or stochastic?".
"""

from __future__ import annotations

import json

from facts_format import RESULTS, ROOT, _num, _sci
from facts_suite import SUITE

_QUICK = json.loads((RESULTS / "quick-cpu.json").read_text())
_BEYOND = json.loads((RESULTS / "beyond_ij-cpu.json").read_text())


def _ratio(workload: str, mode: str) -> str:
    return f"{_QUICK['hvp_solver'][workload]['hvp_over_gradient'][mode]:.2f}"


#: One Hessian-vector product over one gradient, ResNet-18 (batch 32, 32×32, one thread) and the
#: small GPT (2 layers, 64 wide, batch 16×64), by how the product is formed.
HVP = {
    "kept_resnet": _ratio("resnet", "kept-graph"),
    "rr_resnet": _ratio("resnet", "reverse-over-reverse"),
    "fr_resnet": _ratio("resnet", "forward-over-reverse"),
    "kept_gpt": _ratio("gpt", "kept-graph"),
    "rr_gpt": _ratio("gpt", "reverse-over-reverse"),
    "fr_gpt": _ratio("gpt", "forward-over-reverse"),
}

_PEERS = _QUICK["peers"]["peers"]
_REFERENCE = _PEERS["reference (double backward per HVP, blockwise CG)"]
_MEMORY = _QUICK["memory"]["over_finetune"]


#: One BiSSL upper step on ResNet-18 (batch 32, N_c = 5): time over our plain ``CG(max_iter=5)``
#: step, and the relative difference of the original scheme's solution from ``CG(blockwise=True)``.
PEERS = {
    "reference": f"{_REFERENCE['time_over_ours']:.2f}",
    "blockwise": f"{_PEERS['ours CG blockwise']['time_over_ours']:.2f}",
    "reference_diff": _sci(_REFERENCE["rel_diff_u"]),
    "torchopt_default": (
        f"{_PEERS['TorchOpt custom_root default (solve_normal_cg)']['time_over_ours']:.2f}"),
}

#: Peak memory of one upper step over one fine-tuning step (ResNet-18, batch 32, CPU): with the
#: kept graph (``reuse_graph=True``) and recomputing forward-over-reverse (``reuse_graph=False``).
MEMORY = {
    "kept": f"{_MEMORY['upper step, kept graph']:.2f}",
    "fr": f"{_MEMORY['upper step, forward-over-reverse']:.2f}",
}


_RESNET_SOLVER = _QUICK["hvp_solver"]["resnet"]["solver"]


def _met(words: str) -> str:
    """"met" or "not met": the quick run's verdict on the one target whose text has ``words``."""
    (target,) = [t for t in _QUICK["targets"] if words in t["target"]]
    return "met" if target["met"] else "not met"


#: The quick run's headline figures on ResNet-18 (batch 32, 32×32, one thread): one CG iteration
#: amortised over the 8 upper steps that share a kept graph, in gradients; the solver's own
#: arithmetic (outside the products) as a share of a CG solve, measured directly; and whether each
#: stated target was met (``met_<name>``: "met" or "not met").
QUICK = {
    "cg_amortised": f"{_RESNET_SOLVER['cg_iteration_amortised_over_gradient']:.2f}",
    "cg_bookkeeping": f"{100 * _RESNET_SOLVER['cg_bookkeeping_fraction_direct']:.1f}",
    "met_amortised": _met("amortised cost per CG iteration"),
    "met_bookkeeping": _met("CG bookkeeping"),
    "met_reference": _met("faster than the reference scheme"),
    "met_torchopt": _met("faster than TorchOpt"),
    "met_memory": _met("peak memory"),
}


def _seconds_over_full(method: str, mu: float = 10.001) -> float:
    """Seconds per upper step of ``method`` over the full IJ's (MINRES) at ``mu``."""
    rows = {(r["mu"], r["method"]): r["seconds"] for r in _BEYOND["rows"]}
    return rows[(mu, method)] / rows[(mu, "full IJ, MINRES")]


#: Seconds per upper step of each option over the full IJ's (MINRES, exact Hessian) at the
#: thesis's mu = 10.001, on the pretrained small ResNet (``beyond_ij-cpu.md``).
def _beyond_row(method: str, mu: float) -> dict:
    (row,) = [r for r in _BEYOND["rows"] if r["method"] == method and r["mu"] == mu]
    return row


_BN_V, _BN_0 = "BN-only IJ (u = v outside), MINRES", "BN-only IJ (u = 0 outside), MINRES"
_MFAC = "M-FAC (m = 20), no Hessian product"

_G_ERRORS_10 = [r["g_error"] for r in _BEYOND["rows"]
                if r["mu"] == 10.001 and r.get("g_error") is not None]

BEYOND = {
    "g_error_min": f"{min(_G_ERRORS_10):.2f}",
    "g_error_max": f"{max(_G_ERRORS_10):.2f}",
    "bn_g_error_1000": f"{100 * _beyond_row(_BN_V, 1000.0)['g_error']:.1f}",
    "mfac_g_error_1000": f"{100 * _beyond_row(_MFAC, 1000.0)['g_error']:.1f}",
    "bn0_g_error_1000": f"{_beyond_row(_BN_0, 1000.0)['g_error']:.2f}",
    "bn_u_error_1000": f"{_beyond_row(_BN_V, 1000.0)['u_error']:.2f}",
    "mfac_u_error_1000": f"{_beyond_row(_MFAC, 1000.0)['u_error']:.2f}",
    "bn_time": f"{_seconds_over_full('BN-only IJ (u = v outside), MINRES'):.1f}",
    "mfac_time": f"{_seconds_over_full('M-FAC (m = 20), no Hessian product'):.2f}",
    "appg_time": f"{_seconds_over_full('appendix G, MINRES over ω'):.1f}",
}

_ROBUST = json.loads((RESULTS / "robust_ij-cpu.json").read_text())


def _robust(network: str, mu: float, family: str, value: int) -> dict:
    """One row of ``robust_ij-cpu.json``: ``family`` at N_c (or rank) ``value`` on a system."""
    (system,) = [s for s in _ROBUST["systems"]
                 if s["network"].startswith(network) and s["mu"] == mu]
    (row,) = [r for r in system["rows"] if r["family"] == family and r["value"] == value]
    return row


def _robust_solves(curvature: str) -> tuple[int, int]:
    """Breakdowns and solves of every distinct computation with ``curvature``, all systems."""
    rows = [(s["upper_steps"], r) for s in _ROBUST["systems"] for r in s["rows"]
            if r["curvature"] == curvature and not r.get("same_computation_as")]
    return sum(r["breakdowns"] for _, r in rows), sum(n for n, _ in rows)


(_V1000_REFERENCE,) = [s["reference"] for s in _ROBUST["systems"]
                       if s["network"].startswith("vision") and s["mu"] == 1000.0]
_NYSTROM_COSTS = [r["cost_over_gradient"] for s in _ROBUST["systems"] for r in s["rows"]
                  if r["family"] in ("nystrom", "gn-nystrom") and r.get("error") is None]
_MLP = _QUICK["accuracy"]["relative_error"]
_MLP_AT_5 = _QUICK["accuracy"]["iterations"].index(5)
_GN_BREAKDOWNS, _GN_SOLVES = _robust_solves("gauss-newton")
_V10, _V1000, _G10 = ("vision", 10.001), ("vision", 1000.0), ("GPT", 10.001)

#: "Choosing a solver": the accuracy (median relative error of ``u`` against the converged
#: float64 solution), residual and cost (one upper step over one gradient) of each option on the
#: small pretrained ResNet and GPT (``robust_ij-cpu.json``), and the MLP's accuracy against
#: iterations (``quick-cpu.json``).
ROBUST = {
    "gpt_cg5_error": _num(_robust(*_G10, "cg", 5)["rel_error_median"]),
    "gpt_cg10_error": _num(_robust(*_G10, "cg", 10)["rel_error_median"]),
    "gpt_cg2_error": _num(_robust(*_G10, "cg", 2)["rel_error_median"]),
    "gpt_cg5_cost": _num(_robust(*_G10, "cg", 5)["cost_over_gradient"]),
    "gpt_cg5_over_reference": _num(_robust(*_G10, "cg", 5)["cost_over_reference"]),
    "gpt_reference_error": _num(_robust(*_G10, "reference", 5)["rel_error_median"]),
    "vision1000_cg5_error": _num(_robust(*_V1000, "cg", 5)["rel_error_median"]),
    "vision1000_cg5_over_reference": _num(_robust(*_V1000, "cg", 5)["cost_over_reference"]),
    "vision_cg5_breakdowns": str(_robust(*_V10, "cg", 5)["breakdowns"]),
    "vision_cg5_products": f"{_robust(*_V10, 'cg', 5)['products_mean']:.1f}",
    "vision_minres2_residual": _num(_robust(*_V10, "minres", 2)["rel_residual_median"]),
    "vision_minres20_residual": _num(_robust(*_V10, "minres", 20)["rel_residual_median"]),
    "gn_breakdowns": f"{_GN_BREAKDOWNS} of {_GN_SOLVES}",
    "gpt_gn_error": _num(_robust(*_G10, "gn-cg", 20)["rel_error_median"]),
    "vision1000_gn_error": _num(_robust(*_V1000, "gn-cg", 20)["rel_error_median"]),
    "gpt_pcg2_error": _num(_robust(*_G10, "pcg", 2)["rel_error_median"]),
    "gpt_pcg5_error": _num(_robust(*_G10, "pcg", 5)["rel_error_median"]),
    "nystrom_cost_min": f"{min(_NYSTROM_COSTS):.0f}",
    "nystrom_cost_max": f"{max(_NYSTROM_COSTS):.0f}",
    "gpt_nystrom5_error": _num(_robust(*_G10, "nystrom", 5)["rel_error_median"]),
    "gpt_nystrom40_error": _num(_robust(*_G10, "nystrom", 40)["rel_error_median"]),
    "gpt1000_nystrom5_error": _num(_robust("GPT", 1000.0, "nystrom", 5)["rel_error_median"]),
    "vision1000_u_minus_v": _num(_V1000_REFERENCE["u_star_minus_v_over_v"]),
    "mlp_neumann5_error": _num(_MLP["Neumann (alpha = 1/lambda_max = 0.0547)"][_MLP_AT_5]),
    "mlp_cg5_error": _num(_MLP["CG"][_MLP_AT_5]),
    "mlp_neumann1_5_error": f"{_MLP['Neumann (alpha = 1)'][_MLP_AT_5]:.1e}".replace("e+0", "e"),
}

#: The embedded defaults' measured runs (``python benchmarks/embedded_runs.py vision``): the wall
#: time of ``python recipes/vision_bissl.py`` from an empty run folder, and the relative residual
#: ``‖v − A u‖/‖v‖`` of the last upper step's solve per alternation as its run logged it in
#: ``<target>/bissl/metrics.jsonl`` (``ij_relative_residual``).
_EMBEDDED = json.loads((RESULTS / "embedded-cpu.json").read_text())
_VISION_RUN = _EMBEDDED["vision"]
_VISION_DIGITS = _VISION_RUN["targets"]["digits"]
VISION_RESIDUAL = {"median": f"{_VISION_DIGITS['median']:.2g}",
                   "max": f"{_VISION_DIGITS['max']:.2g}"}
VISION_EMBEDDED_MINUTES = f"{_VISION_RUN['wall_minutes']}"

#: The same residual logged by the earlier embedded default (Gauss–Newton curvature, plain CG,
#: before the Only-FT baseline became one schedule and the default moved to recycled CG), as that
#: run stated it; the how-to and "Beyond the thesis" tables measured with that run state it.
VISION_RESIDUAL_PLAIN_CG = {"median": "0.026", "max": "0.053"}

#: CG on the exact Hessian in the embedded vision configuration (``bissl.curvature=hessian
#: bissl.ij=cg``, indefinite at μ = 10.001): the residual per alternation as the run logged it
#: (``python benchmarks/recycled_recipe_ij.py --name recipe_ij_exact_hessian-cpu ...``).
_EXACT_RUN = json.loads((RESULTS / "recipe_ij_exact_hessian-cpu.json").read_text())["runs"][0]
VISION_EXACT_CG = {
    "median": f"{_EXACT_RUN['residual_median']:.2g}",
    "above_one": str(sum(r > 1 for r in _EXACT_RUN["residuals"])),
    "at_most_0_1": str(_EXACT_RUN["met"]),
    "alternations": str(_EXACT_RUN["alternations"]),
    "breakdowns": str(_EXACT_RUN["breakdowns"]),
    "solves": str(2 * _EXACT_RUN["alternations"]),
}



#: Wall time of ``python recipes/vision_bissl.py study`` and ``python recipes/gpt_glue_bissl.py
#: study`` (the embedded configurations) from an empty run folder, as the stored study.json
#: records it (each made in one invocation on 2 CPU cores, one thread, while another job used the
#: other core).
def _study_minutes(name: str) -> str:
    study = json.loads((ROOT / "docs" / "recipes" / "study" / f"{name}.json").read_text())
    return f"{study['wall_seconds'] / 60:.0f}"


STUDY_MINUTES = _study_minutes("vision_embedded")
GPT_STUDY_MINUTES = _study_minutes("gpt_embedded")

#: Wall time of ``python recipes/gpt_glue_bissl.py`` (every stage, all seven embedded tasks,
#: gpt_glue_embedded.yaml) on 2 CPU cores from an empty run folder, as the stored measurement
#: (``python benchmarks/embedded_runs.py gpt``) holds it.
GPT_EMBEDDED_MINUTES = f"{_EMBEDDED['gpt']['wall_minutes']}"

#: Data roots in the examples. torchvision's OxfordIIITPet(root) reads
#: ``<root>/oxford-iiit-pet/{images,annotations}``, so the Pets root is the folder above it.
PETS_ROOT = "/data"
PETS_LAYOUT = "oxford-iiit-pet/{images,annotations}"
CORPUS_ROOT = "/data/bookcorpus"

#: Spellings that contradicted these facts and must not come back.
RETIRED = ["2.2-2.35", "/data/pets", "data.corpus=/data/books ", "8-10 minutes",
           "5 to 8 minutes", "~5 min", "~30 min", "about 30 minutes"]


_PAPER = json.loads((RESULTS / "paper_scale_ij-cpu.json").read_text())


def _paper_rows(method: str) -> list[dict]:
    """``method``'s measured rows on every proxy system of ``paper_scale_ij-cpu.json``."""
    return [r for s in _PAPER["systems"] for r in s.get("rows", [])
            if r["method"] == method and "breakdowns" in r and not r.get("from_log")]


def _paper_range(method: str, key: str = "exact_residual_median") -> str:
    values = [r[key] for r in _paper_rows(method)]
    return " to ".join(f"{v:.0f}" if v >= 100 else f"{v:.2g}" for v in (min(values), max(values)))


def _paper_breakdowns(method: str) -> str:
    rows = _paper_rows(method)
    return f"{sum(r['breakdowns'] for r in rows)} of {sum(len(r['solves']) for r in rows)}"


#: The IJ options on CPU proxies of the three paper networks (``paper_scale_ij-cpu.json``,
#: written by ``python benchmarks/paper_scale_ij.py``): over every proxy system, the breakdowns in
#: the N_U solves and the range of the median exact-Hessian residual ``‖v − A u‖/‖v‖``.
PAPER_SCALE = {
    "systems": str(len(_paper_rows("minres"))),
    "minres_breakdowns": _paper_breakdowns("minres"),
    "cg_breakdowns": _paper_breakdowns("cg"),
    "reference_breakdowns": _paper_breakdowns("reference"),
    "minres_residual": _paper_range("minres"),
    "cg_residual": _paper_range("cg"),
    "reference_residual": _paper_range("reference"),
    "minres_cost": _paper_range("minres", "cost_over_gradient"),
    "reference_cost": _paper_range("reference", "cost_over_gradient"),
}


def substitutions() -> dict[str, str]:
    """The reST substitutions the pages use, name to text."""
    subs = {f"hvp_{k}": v for k, v in HVP.items()}
    subs.update({f"peer_{k}": v for k, v in PEERS.items()})
    subs.update({f"mem_{k}": v for k, v in MEMORY.items()})
    subs.update({f"quick_{k}": v for k, v in QUICK.items()})
    subs.update({f"beyond_{k}": v for k, v in BEYOND.items()})
    subs.update({f"robust_{k}": v for k, v in ROBUST.items()})
    subs.update({f"vision_residual_{k}": v for k, v in VISION_RESIDUAL.items()})
    subs.update({f"vision_residual_plain_{k}": v for k, v in VISION_RESIDUAL_PLAIN_CG.items()})
    subs.update({f"vision_exact_cg_{k}": v for k, v in VISION_EXACT_CG.items()})
    subs.update({f"paper_{k}": v for k, v in PAPER_SCALE.items()})
    subs.update(vision_embedded_minutes=VISION_EMBEDDED_MINUTES,
                gpt_embedded_minutes=GPT_EMBEDDED_MINUTES, study_minutes=STUDY_MINUTES,
                gpt_study_minutes=GPT_STUDY_MINUTES,
                pets_root=PETS_ROOT,
                corpus_root=CORPUS_ROOT)
    subs.update({f"recycled_{k}": v for k, v in RECYCLED.items()})
    subs.update({f"suite_{k}": v for k, v in SUITE.items()})
    return subs


def rst_prolog() -> str:
    """``.. |name| replace:: text`` for every substitution."""
    return "\n".join(f".. |{k}| replace:: {v}" for k, v in substitutions().items()) + "\n"


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
# recycled_recipe_ij-cpu.json (python benchmarks/recycled_recipe_ij.py over recipe runs).

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

# -- Implicit or stochastic? (docs/implicit_or_stochastic.rst) ----------------------------------
