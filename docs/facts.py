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
from facts_recycled import RECYCLED
from facts_suite import SUITE

from recipes.common.stats import adjust

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

#: "Beyond the thesis": the embedded vision pipeline from an empty folder with one option changed
#: (``python benchmarks/embedded_runs.py vision --key vision-<option> --set ...``; the full IJ is
#: the embedded default's own run): BiSSL+FT test top-1 ×100 over the seeds, the logged IJ
#: residual's median and the paired p against Only-FT, Holm-adjusted over the rows.
_BEYOND_KEYS = {"full": "vision", "bn_only": "vision-bn-only", "appendix_g": "vision-appendix-g",
                "mfac": "vision-mfac"}


def _option_runs() -> dict[str, str]:
    """Per option of :data:`_BEYOND_KEYS`: top-1, Holm-adjusted p and residual; Only-FT once
    (refused unless every run has the same)."""
    cmp = {k: _EMBEDDED[e]["comparisons"]["digits top1"] for k, e in _BEYOND_KEYS.items()}
    if len({(c["mean_a"], c["std_a"]) for c in cmp.values()}) != 1:
        raise ValueError("the option runs in embedded-cpu.json have different Only-FT results: "
                         "they are not one comparison (run them again from the same configuration)")
    p = dict(zip(cmp, adjust([c["p_value"] for c in cmp.values()])))

    def top1(mean: float, std: float) -> str:
        return f"{100 * mean:.2f} ± {100 * std:.2f}"

    out = {"only_ft_top1": top1(cmp["full"]["mean_a"], cmp["full"]["std_a"]),
           "seeds": str(cmp["full"]["n"]), "rows": str(len(cmp))}
    for k, c in cmp.items():
        out[f"{k}_top1"] = top1(c["mean_b"], c["std_b"])
        out[f"{k}_p"] = f"{p[k]:.2f}"
        out[f"{k}_residual"] = f"{_EMBEDDED[_BEYOND_KEYS[k]]['targets']['digits']['median']:.2g}"
    return out


BEYOND_RUNS = _option_runs()

#: The embedded vision configuration's BiSSL stage on digits with one IJ setting each: CG on the
#: exact Hessian (``bissl.curvature=hessian bissl.ij=cg``, indefinite at μ = 10.001) and two
#: remedies, MINRES on the exact Hessian and CG on the Gauss–Newton curvature; the residual per
#: alternation as each run logged it (``python benchmarks/recycled_recipe_ij.py --name
#: recipe_ij_exact_hessian-cpu ...``).
_IJ_RUNS = {r["label"]: r for r in json.loads(
    (RESULTS / "recipe_ij_exact_hessian-cpu.json").read_text())["runs"]}
_EXACT_RUN = _IJ_RUNS["exact Hessian + CG, N_c = 5"]
VISION_EXACT_CG = {
    "median": f"{_EXACT_RUN['residual_median']:.2g}",
    "above_one": str(sum(r > 1 for r in _EXACT_RUN["residuals"])),
    "at_most_0_1": str(_EXACT_RUN["met"]),
    "alternations": str(_EXACT_RUN["alternations"]),
    "breakdowns": str(_EXACT_RUN["breakdowns"]),
    "solves": str(2 * _EXACT_RUN["alternations"]),
}
VISION_REMEDIES = {
    f"{key}_{field}": value
    for key, label in (("minres", "exact Hessian + MINRES, N_c = 5"), ("gn_cg", "GN + CG, N_c = 5"))
    for field, value in (("median", f"{_IJ_RUNS[label]['residual_median']:.2g}"),
                         ("max", f"{_IJ_RUNS[label]['residual_max']:.2g}"),
                         ("breakdowns", str(_IJ_RUNS[label]["breakdowns"])))
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
    subs.update({f"vision_exact_cg_{k}": v for k, v in VISION_EXACT_CG.items()})
    subs.update({f"vision_ij_{k}": v for k, v in VISION_REMEDIES.items()})
    subs.update({f"beyond_run_{k}": v for k, v in BEYOND_RUNS.items()})
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
