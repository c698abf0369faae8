"""The facts of "Implicit or stochastic?" (``docs/implicit_or_stochastic.rst``), read from the
bilevel suite's results; ``facts.substitutions`` states them as ``|suite_<name>|``."""

from __future__ import annotations

import json

from facts_format import RESULTS, _sci

# Read from benchmarks/results/bilevel_suite-full-cpu.json (python benchmarks/bilevel_suite.py
# --full, one problem and family per call, then --merge) and bilevel_suite-quick-cpu.json.

_SUITE = json.loads((RESULTS / "bilevel_suite-full-cpu.json").read_text())
_SUITE_QUICK = json.loads((RESULTS / "bilevel_suite-quick-cpu.json").read_text())
_SUITE_NAMES = {"implicit-cg": "CG", "implicit-minres": "MINRES", "argmin-lbfgs": "argmin + L-BFGS",
                "implicit-nystrom-pcg": "Nyström-PCG", "jaxopt-implicit": "JAXopt"}
_SUITE_TEST_ERROR = ("digits_multilogreg", "cleaning_50", "cleaning_70", "cleaning_90")


def _suite_methods(problem: str) -> dict[str, dict]:
    return {m["method"]: m for m in _SUITE["problems"][problem]["methods"]}


def _suite_ran_away(m: dict) -> bool:
    """Diverged on most seeds and still diverged at the end (``‖y − y*‖²`` past 1e4 × its start)."""
    start = sorted(r["curve"][0]["inner_distance"] for r in m["runs"])[len(m["runs"]) // 2]
    return 2 * m["diverged"] > len(m["runs"]) and m["final"]["inner_distance"] > 1e4 * start


def _passes(calls: float) -> str:
    """Oracle calls in full passes over the data: ``3.4``, ``726``, ``1,088``."""
    return f"{calls:.1f}" if calls < 10 else f"{calls:,.0f}"


def _suite_cells(problem: str) -> dict[str, str]:
    """One row of the page's table: the problem, who reached the target, the others' ends."""
    p, seeds = _SUITE["problems"][problem], len(_SUITE["settings"]["seeds"])
    info, ms = p["info"], list(_suite_methods(problem).values())
    name = lambda m: _SUITE_NAMES.get(m["method"], m["method"])  # noqa: E731
    rows = info.get("n_train", info.get("n_inner"))
    label = {"quadratic": f"quadratic ({info.get('n_inner', 0):,} / {info.get('n_outer', 0):,} "
                          "rows)", "ijcnn1": f"ijcnn1-shaped ({rows:,} rows)",
             "breast_cancer": f"breast-cancer ({rows:,} rows)",
             "digits_multilogreg": f"digits, multinomial ({rows:,} rows)"}.get(
        problem, f"hyper-cleaning, {100 * info.get('corrupt', 0):.0f} % corrupted")
    hit = sorted((m for m in ms if m["time_to_target"] is not None),
                 key=lambda m: m["time_to_target"])
    reached = ", ".join(f"{name(m)} {m['time_to_target']:#.2g} ({_passes(m['calls_to_target'])})"
                        for m in hit) or (f"none within {_SUITE['settings']['budget']:g} s "
                                          f"(target {_sci(p['target'])})")
    rest = sorted((m for m in ms if m["time_to_target"] is None and not _suite_ran_away(m)),
                  key=lambda m: m["final"]["grad_norm2"])
    others = [f"{name(m)} {_sci(m['final']['grad_norm2'])}" + (
        f" (diverged on {m['diverged']}/{seeds} seeds)" if m["diverged"] else "") for m in rest]
    others += [f"{name(m)} ran away on {m['diverged']}/{seeds} seeds"
               for m in ms if _suite_ran_away(m)]
    if problem in _SUITE_TEST_ERROR:
        errors = sorted((m["final"]["test_error"], name(m)) for m in ms if not _suite_ran_away(m))
        others.append(f"test error {100 * errors[0][0]:.1f}-{100 * errors[-2][0]:.1f} % "
                      f"({errors[-1][1]} {100 * errors[-1][0]:.1f} %)")
    return {"label": label, "reached": reached, "others": "; ".join(others) or "none"}


def _suite_calls(methods: tuple[str, ...]) -> list[float]:
    return [m["calls_to_target"] for pr in _SUITE["problems"] if pr.startswith("cleaning")
            for m in _SUITE["problems"][pr]["methods"]
            if m["method"] in methods and m["calls_to_target"] is not None]


_IMPLICIT = ("implicit-cg", "implicit-minres", "implicit-nystrom-pcg", "argmin-lbfgs")
_SUITE_IJ, _SUITE_QD = _suite_methods("ijcnn1"), _suite_methods("quadratic")
_SUITE_BC = _suite_methods("breast_cancer")
_SUITE_EVALS = _SUITE["settings"]["evals"]
_SUITE_MARKS = [_SUITE["settings"]["budget"] * 10 ** (-2 + 2 * k / (_SUITE_EVALS - 1))
                for k in range(_SUITE_EVALS)]
_SUITE_CALL_RATIOS = [
    m["calls_to_target"] / _suite_methods(pr)["SOBA"]["calls_to_target"]
    for pr in _SUITE["problems"] if pr.startswith("cleaning")
    for m in _SUITE["problems"][pr]["methods"]
    if m["method"] in _IMPLICIT and m["calls_to_target"] is not None]
_SUITE_NEXT_QD = min(m["final"]["grad_norm2"] for m in _SUITE_QD.values()
                     if m["method"] not in ("SABA", "jaxopt-implicit"))

#: "Implicit or stochastic?": the table of the full suite (``suite_<problem>_{label,reached,
#: others}``) and the figures its prose quotes.
SUITE = {
    **{f"{pr}_{k}": v for pr in _SUITE["problems"] for k, v in _suite_cells(pr).items()},
    "seeds": str(len(_SUITE["settings"]["seeds"])),
    "budget": f"{_SUITE['settings']['budget']:g}",
    "quick_budget": f"{_SUITE_QUICK['settings']['budget']:g}",
    "cores": str(_SUITE["machine"]["cores"]),
    "cpu": _SUITE["machine"]["cpu"],
    "marks": ", ".join(f"{t:#.2g}" for t in _SUITE_MARKS if 0.4 < t < 2),
    "tolerance": _sci(_SUITE_QD["SABA"]["target"] / sorted(
        r["curve"][0]["grad_norm2"] for r in _SUITE_QD["SABA"]["runs"])[2]),
    "digits_rows": f"{_SUITE['problems']['digits_multilogreg']['info']['n_train']:,}",
    "bc_rows": f"{_SUITE['problems']['breast_cancer']['info']['n_train']:,}",
    "ijcnn1_rows": f"{_SUITE['problems']['ijcnn1']['info']['n_train']:,}",
    "quadratic_rows": f"{_SUITE['problems']['quadratic']['info']['n_inner']:,}",
    "ijcnn1_time": f"{max(_SUITE_IJ[m]['time_to_target'] for m in ('SOBA', 'SABA')):#.2g}",
    "ijcnn1_passes": (f"{_SUITE_IJ['SABA']['calls_to_target']:.1f} to "
                      f"{_SUITE_IJ['SOBA']['calls_to_target']:.1f}"),
    "quadratic_saba_gap": f"{_SUITE_NEXT_QD / _SUITE_QD['SABA']['final']['grad_norm2']:.0f}",
    "soba_calls": f"{min(_suite_calls(('SOBA',))):.0f}-{max(_suite_calls(('SOBA',))):.0f}",
    "implicit_calls": f"{min(_suite_calls(_IMPLICIT)):,.0f}-{max(_suite_calls(_IMPLICIT)):,.0f}",
    "call_ratio": f"{min(_SUITE_CALL_RATIOS):.1f} to {max(_SUITE_CALL_RATIOS):.1f}",
    "bc_jaxopt_steps": f"{_SUITE_BC['jaxopt-implicit']['steps']:,}",
    "bc_cg_steps": f"{_SUITE_BC['implicit-cg']['steps']:,}",
    "ijcnn1_jaxopt_steps": f"{_SUITE_IJ['jaxopt-implicit']['steps']:,}",
    "ijcnn1_cg_steps": f"{_SUITE_IJ['implicit-cg']['steps']:,}",
}
