"""The vision recipe's IJ per alternation, for several ``bissl.ij`` settings: a table from runs.

Usage (after ``python benchmarks/photo_folder.py ...``; each run is the embedded vision
configuration's ``bissl`` stage with one IJ setting, on real photographs or on digits)::

    python benchmarks/recycled_recipe_ij.py --name recycled_recipe_ij-cpu \\
        --run "photos|GN + CG, N_c = 5 (today)|/tmp/runs/cg/imagefolder/bissl/metrics.jsonl" \\
        --run "photos|GN + RecycledCG, N_c = 5|/tmp/runs/rcg/imagefolder/bissl/metrics.jsonl"

Per run, from the ``metrics.jsonl`` the BiSSL trainer writes (one line per alternation):
``ij_relative_residual`` (``‖v − A u‖/‖v‖`` of the last upper step's solve, measured with one
product), the fraction of alternations at or below 0.1, its median and maximum, the exact-Hessian
residual ``ij_exact_relative_residual``, breakdowns, and the curvature products per upper step:
``(hessian_products − 1)/N_U`` (the one product is the logged residual's measurement; the rest
are the solves' products and a per-alternation build such as a Nyström sketch or Lanczos,
amortised over the ``N_U`` upper steps). Writes ``<out>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import DEFAULT_OUT, fmt, machine_info, row, table_head, write_results

__all__ = ["main", "render_markdown", "summarise"]

TARGET = 0.1


def summarise(data: str, label: str, path: str, upper_steps: int) -> dict[str, Any]:
    """One run's per-alternation IJ numbers and their summary."""
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    res = [float(x["ij_relative_residual"]) for x in lines]
    exact = [float(x["ij_exact_relative_residual"]) for x in lines
             if x.get("ij_exact_relative_residual") is not None]
    products = [(float(x["hessian_products"]) - 1.0) / upper_steps for x in lines]
    return {
        "data": data, "label": label, "path": path, "alternations": len(lines),
        "met": sum(r <= TARGET for r in res), "share_met": sum(r <= TARGET for r in res) / len(res),
        "residual_median": statistics.median(res), "residual_max": max(res),
        "exact_median": statistics.median(exact) if exact else None,
        "breakdowns": sum(int(x.get("solver_breakdowns", 0)) for x in lines),
        "products_per_upper_step": statistics.fmean(products),
        "solver_iterations": statistics.fmean(float(x["solver_iterations"]) for x in lines),
        "seconds_per_alternation": statistics.median(float(x["seconds"]) for x in lines),
        "residuals": res,
    }


def render_markdown(results: dict[str, Any]) -> str:
    """One table over the runs."""
    m = results["machine"]
    lines = [f"## The vision recipe's IJ per alternation, by `bissl.ij` ({m['device']})", "",
             f"- date: {m['date_utc']}; {m['cpu']}, {m['cores']} cores, load average "
             f"{m['load_average'][0]:.1f} when the table was made (the runs ran side by side on "
             "the shared machine, one torch thread each)",
             "- every run: `recipes/configs/vision_embedded.yaml` (small ResNet width 16, SimCLR "
             "30 epochs, head warm-up 10 epochs, T = 40 alternations, N_L = 5, N_U = 2, "
             "μ = λ + λ_damp = 10.001, Gauss-Newton curvature) with only the data and the IJ "
             "changed; 'photos': 32-px patches of 8 photographs (benchmarks/photo_folder.py), "
             "'digits': the embedded digits at 16 px",
             "- residual: `ij_relative_residual`, ‖v − A u‖/‖v‖ of the last upper step's solve "
             "in each alternation; products per upper step: the solves' products plus any "
             "per-alternation build, amortised over N_U (the logged residual's product not "
             "counted)", *[f"- {note}" for note in results.get("notes", [])], ""]
    lines += table_head("data", "IJ", "alternations <= 0.1", "residual median", "residual max",
                        "exact-Hessian residual median", "products per upper step",
                        "breakdowns", "seconds per alternation (median)")
    for r in results["runs"]:
        lines.append(row(r["data"], r["label"], f"{r['met']}/{r['alternations']} "
                         f"({100 * r['share_met']:.0f}%)", fmt(r["residual_median"], 3),
                         fmt(r["residual_max"], 3), fmt(r["exact_median"], 3),
                         fmt(r["products_per_upper_step"], 1), r["breakdowns"],
                         fmt(r["seconds_per_alternation"], 1)))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="DATA|LABEL|METRICS",
                   help="a run: data name, IJ label and its metrics.jsonl, separated by '|'")
    p.add_argument("--upper-steps", type=int, default=2, help="N_U of the runs")
    p.add_argument("--note", action="append", default=[], help="a line for the report's head")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--name", default="recycled_recipe_ij-cpu")
    a = p.parse_args(argv)
    runs = []
    for spec in a.run:
        data, label, path = spec.split("|")
        runs.append(summarise(data, label, path, a.upper_steps))
    results = {"command": "python benchmarks/recycled_recipe_ij.py " + " ".join(
        f"--run '{s}'" for s in a.run), "machine": machine_info("cpu"), "target": TARGET,
        "upper_steps": a.upper_steps, "notes": a.note, "runs": runs}
    markdown = render_markdown(results)
    write_results(a.out, a.name, results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
