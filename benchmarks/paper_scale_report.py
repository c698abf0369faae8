"""Targets and tables of :mod:`benchmarks.paper_scale_ij`.

The target of a paper configuration's default IJ (issue "Hypergradients that hold where users run
them", item 2): zero breakdowns, and on every proxy a relative residual ``≤ 0.1`` of the system it
solves in ``≥ 95%`` of the solves, or, where no method solving the same system (exact Hessian or
Gauss–Newton) reaches that within ``N_c`` products, a median exact-Hessian residual no worse than
MINRES's at the same budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .harness import fmt, header, row, short, table_head

__all__ = ["render_markdown", "targets"]


def targets(systems: Sequence[Mapping[str, Any]], residual: float = 0.1,
            fraction: float = 0.95) -> dict[str, Any]:
    """Per method, over every measured system: breakdowns, and whether the target holds."""
    out: dict[str, Any] = {"residual": residual, "fraction": fraction, "methods": {}}
    measured = [s for s in systems if s.get("rows") and "error" not in s]
    keys = list(dict.fromkeys(r["method"] for s in measured for r in s["rows"]))
    for key in keys:
        breakdowns, met, fallback, failed, unknown = 0, 0, 0, [], []
        for s in measured:
            rows = {r["method"]: r for r in s["rows"]}
            r = rows.get(key, {})
            if not r:
                unknown.append(f"{s['proxy']}@{s['steps']} (not measured)")
                continue
            if "skipped" in r:
                unknown.append(f"{s['proxy']}@{s['steps']} (skipped)")
                continue
            if "error" in r:
                failed.append(f"{s['proxy']}@{s['steps']}: {r['error']}")
                continue
            breakdowns += r["breakdowns"]
            within = r.get("solved_within_target")
            if r.get("from_log") and r["breakdowns"] == 0 and key != "minres":
                # Only the medians are known (the process was stopped before it wrote its
                # solves): the 95% target can be neither confirmed nor refuted.
                unknown.append(f"{s['proxy']}@{s['steps']}")
                continue
            # "No method reaches it": no method solving the same system (exact or GN) does.
            anyone = any((x.get("solved_within_target") or 0) >= fraction
                         and x["breakdowns"] == 0 for x in s["rows"]
                         if _measured(x) and x["curvature"] == r["curvature"])
            minres = rows.get("minres", {}).get("exact_residual_median", math.nan)
            if key == "minres" and r["breakdowns"] == 0 and (within is None or within < fraction):
                anyone_exact = any((x.get("solved_within_target") or 0) >= fraction
                                   for x in s["rows"] if x.get("curvature") == "hessian"
                                   and _measured(x) and x["breakdowns"] == 0)
                if not anyone_exact:
                    fallback += 1  # the reference of the fallback rule
                    continue
            if within is not None and within >= fraction and r["breakdowns"] == 0:
                met += 1
            elif (not anyone and r["breakdowns"] == 0
                  and r["exact_residual_median"] <= minres * (1 + 1e-6)):
                fallback += 1
            else:
                failed.append(f"{s['proxy']}@{s['steps']}")
        out["methods"][key] = {"systems": len(measured), "breakdowns": breakdowns, "met": met,
                               "met_by_fallback": fallback, "not_met": failed,
                               "unknown": unknown,
                               "holds": (not failed and breakdowns == 0 and bool(measured))
                               if not unknown else None}
    return out


def render_markdown(results: Mapping[str, Any], partial: bool = False) -> str:
    """The tables: spectra, every method on every proxy and training length, the targets."""
    lines = header("Paper-scale implicit-Jacobian options (CPU proxies)", results)
    if partial:
        lines += ["", "*Partial results: the run is still going or was interrupted.*"]
    systems = results.get("systems", [])
    notes = sorted({(s["proxy"], s.get("note", "")) for s in systems if "note" in s})
    if notes:
        lines += ["", "Proxies (what was shrunk from the paper configuration):", ""]
        lines += [f"- **{k}**: {n}" for k, n in notes]
    if any(s.get("from_log") for s in systems):
        lines += ["", "Rows marked *(log)*: the process measuring that training length was stopped "
                  "at the time limit before it wrote its solves; their breakdowns, median "
                  "residuals and Lanczos extremes are taken from its log lines (no maxima, "
                  "cosines, cost or memory)."]
    lines += ["", "### Spectrum of the lower Hessian H (Lanczos)", ""]
    lines += table_head("proxy", "pretraining steps", "unknowns", "mu", "lambda_min(H) <=",
                        "lambda_max(H) >=", "1 + lambda_min/mu", "below -mu",
                        "pretext loss (first -> last)")
    for s in systems:
        if "eigen" not in s:
            lines.append(row(s["proxy"], s.get("steps", "-"), "-", "-", "-", "-", "-", "-",
                             short(s.get("error", "-"), 60)))
            continue
        e = s["eigen"]
        loss = "-" if s.get("pretrain_loss_last") is None else \
            f"{s['pretrain_loss_first']:.3f} -> {s['pretrain_loss_last']:.3f}"
        lines.append(row(s["proxy"], _steps(s), "-" if s.get("unknowns") is None
                         else f"{s['unknowns']:,}", fmt(s["mu"], 3),
                         _bounded(e["smallest"], e["smallest_bound"]),
                         _bounded(e["largest"], e["largest_bound"]),
                         fmt(e["a_min"]), "yes" if e["below_minus_mu"] else "no", loss))
    lines += ["", "### Every IJ option at N_c over the N_U right-hand sides of one alternation",
              "", "Residuals are ||v - A u|| / ||v|| (median / max over the N_U solves); "
              "'solved' is the system the method solves (the Gauss-Newton one for GN methods; "
              "M-FAC solves its Fisher system directly, n/a), 'exact' the exact-Hessian system. "
              "'<= 0.1' is the fraction of solves whose solved-system residual is at most 0.1. "
              "Cost: seconds of one upper step (operator build and preparation amortised over "
              "N_U) over one gradient of the downstream loss. Memory: peak RSS of one upper step "
              "over RSS before, plus the operator build's.", ""]
    lines += table_head("proxy", "steps", "method", "breakdowns", "solved residual",
                        "<= 0.1", "exact residual", "cos(u, v)", "cost (grads)", "peak MiB")
    for s in systems:
        for r in s.get("rows", []):
            if "skipped" in r:
                lines.append(row(s["proxy"], _steps(s), r["method"], "skipped",
                                 short(r["skipped"].removeprefix("skipped: "), 60), "-", "-",
                                 "-", "-", "-"))
                continue
            if "error" in r:
                lines.append(row(s["proxy"], _steps(s), r["method"], "error",
                                 short(r["error"], 60), "-", "-", "-", "-", "-"))
                continue
            nu = s["upper_steps"]
            within = r.get("solved_within_target")
            lines.append(row(
                s["proxy"], _steps(s), r["method"], f"{r['breakdowns']}/{nu}",
                f"{fmt(r['solved_residual_median'], 3)} / {fmt(r.get('solved_residual_max'), 3)}",
                "-" if within is None else f"{within:.0%}",
                f"{fmt(r['exact_residual_median'], 3)} / {fmt(r.get('exact_residual_max'), 3)}",
                "-" if r.get("cosine_median") is None else
                f"{fmt(r['cosine_median'], 3)} (min {fmt(r['cosine_min'], 3)})",
                fmt(r.get("cost_over_gradient")),
                "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"))
    t = results.get("targets")
    if t:
        lines += ["", f"### Target: zero breakdowns and a solved-system residual <= "
                  f"{t['residual']:g} in >= {t['fraction']:.0%} of solves on every proxy", ""]
        lines += table_head("method", "systems", "breakdowns", "met", "met by the MINRES "
                            "fallback", "not met", "unknown (log medians only / not measured)",
                            "holds")
        for key, m in t["methods"].items():
            lines.append(row(key, m["systems"], m["breakdowns"], m["met"], m["met_by_fallback"],
                             short(", ".join(m["not_met"]) or "-", 80),
                             short(", ".join(m.get("unknown", [])) or "-", 80),
                             {True: "yes", False: "no", None: "unknown"}[m["holds"]]))
    reasons = sorted({(r["method"], x) for s in systems for r in s.get("rows", [])
                      for x in r.get("breakdown_reasons", [])})
    if reasons:
        lines += ["", "Breakdown reasons (first seen):", ""]
        seen: set[str] = set()
        for key, why in reasons:
            if key not in seen:
                seen.add(key)
                lines.append(f"- {key}: {short(why, 150)}")
    skipped = sorted({(s["proxy"], r["method"], r["skipped"]) for s in systems
                      for r in s.get("rows", []) if "skipped" in r})
    if skipped:
        lines += ["", "Methods not run:", ""]
        lines += [f"- {proxy}, {key}: {why.removeprefix('skipped: ')}"
                  for proxy, key, why in skipped]
    return "\n".join(lines) + "\n"


def _measured(r: Mapping[str, Any]) -> bool:
    """Whether a method's row holds measurements (not an error, not skipped)."""
    return "error" not in r and "skipped" not in r


def _steps(s: Mapping[str, Any]) -> str:
    """The training length, marked where the row comes from the run's log lines only."""
    return f"{s['steps']} (log)" if s.get("from_log") else str(s["steps"])


def _bounded(value: float, bound: float | None) -> str:
    return f"{value:.3g}" if bound is None else f"{value:.3g} (+-{bound:.2g})"
