"""The implicit-Jacobian options on CPU proxies of the three paper networks, along training length.

Usage::

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/paper_scale_ij.py            # 2-core CPU
    python benchmarks/paper_scale_ij.py --smoke                                 # seconds

The paper configurations (``recipes/configs/vision_small.yaml``, ``vision_default.yaml``,
``gpt_glue_paper.yaml``) solve ``(I + H/μ) u = v`` with ``N_c`` products per upper step, ``H`` the
Hessian of the pretext loss at the lower point, ``μ = λ + λ_damp``. Whether that system is
positive definite (what plain CG assumes) depends on the network and on how long it was trained.
For each proxy (:mod:`benchmarks.paper_scale_nets`: ResNet-18, ResNet-50, the 12-layer GPT, built
from the configs, shrunk to fit a 2-core CPU) at each training length (initialisation and a short
pretraining) this script measures:

1. the extreme eigenvalues of ``H`` by Lanczos (:func:`lanczos_extremes`: the three-term
   recurrence over exact Hessian products, ``O(n)`` memory; the Ritz values are inner bounds, the
   error bound ``β_m |s_mi|`` is reported) and ``1 + λ_min/μ``, the smallest eigenvalue of the
   system (negative: ``λ_min < −μ``, the system is indefinite);
2. for every IJ option (:data:`METHODS`) at the config's ``N_c`` over the ``N_U`` right-hand sides
   of one alternation (one Hessian batch, ``N_U`` downstream batches; the curvature operator built
   once and shared, as in an alternation), each through ``BilevelProblem.upper_grad`` with
   ``ImplicitJacobian(solver, damping, curvature, on_breakdown="ignore")``:
   breakdowns (``SolveInfo.breakdown``), the relative residual ``‖v − Au‖/‖v‖`` of the system
   solved (Gauss–Newton for the GN methods; M-FAC solves its own Fisher system directly) and of the
   exact-Hessian system, the cosine between ``u`` and ``v``, the seconds of one upper step
   (operator build, per-operator preparation and the ``N_U`` steps, amortised over ``N_U``) over
   one gradient of the downstream loss, and the peak memory of the step (RSS high-water mark over
   RSS before, on top of the operator's build).

Methods whose memory or time does not fit a proxy on a shared 2-core CPU are skipped there
(:attr:`Settings.skip`; the table names each with its reason). Writes
``<out>/paper_scale_ij-<device>.json`` and ``.md``; ``--only``/``--steps`` runs one proxy or one
training length per process, ``--merge`` joins the parts.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.harness import (
    add_device,
    add_out,
    add_threads,
    command_line,
    device_type,
    error_line,
    finish,
    new_results,
    parser,
    set_threads,
    write_results,
)
from benchmarks.paper_scale_measure import (
    METHODS,
    Method,
    Settings,
    lanczos_extremes,
    measure_snapshot,
)
from benchmarks.paper_scale_nets import pretrain_snapshots
from benchmarks.paper_scale_report import render_markdown, targets

# The measurement lives in benchmarks.paper_scale_measure; its public names stay importable here.
__all__ = ["METHODS", "Method", "Settings", "lanczos_extremes", "main", "run"]


# -- the run -------------------------------------------------------------------------------------


def run(settings: Settings, device: str, out: str | None, command: str,
        log: Callable[[str], None] = print, name: str | None = None) -> dict[str, Any]:
    """Every proxy at every training length; JSON and Markdown to ``out``."""
    started = time.perf_counter()
    name = name or f"paper_scale_ij-{device_type(device)}"
    results = new_results(command, device, settings)
    results["methods"] = [{"key": m.key, "label": m.label, "curvature": m.curvature}
                          for m in METHODS]
    flush = torch.set_flush_denormal(True)
    systems: list[dict[str, Any]] = []
    results["systems"] = systems
    try:
        for spec in settings.proxies:
            log(f"[{spec.key}] building from {spec.config} and pretraining {spec.steps} ...")
            try:
                snaps = pretrain_snapshots(spec, m_fac=settings.options[spec.key]["mfac_m"],
                                           upper_steps=settings.upper_steps[spec.key], log=log)
            except Exception as err:
                traceback.print_exc()
                systems.append({"proxy": spec.key, "error": error_line(err), "rows": []})
                continue
            while snaps:
                px = snaps.pop(0)
                try:
                    def progress(partial: dict[str, Any]) -> None:
                        if out is not None:
                            write_results(out, name, {**results, "systems": [*systems, partial]},
                                          render_markdown({**results,
                                                           "systems": [*systems, partial]},
                                                          partial=True))

                    system = measure_snapshot(px, settings, device, log, progress)
                    system["pretrain_seconds"] = px.pretrain_seconds
                    systems.append(system)
                except Exception as err:
                    traceback.print_exc()
                    systems.append({"proxy": spec.key, "steps": px.steps,
                                    "error": error_line(err), "rows": []})
                del px
                gc.collect()
                if out is not None:  # partial results survive an interrupted run
                    write_results(out, name, results, render_markdown(results, partial=True))
        results["targets"] = targets(systems, settings.target_residual,
                                     settings.target_fraction)
    finally:
        torch.set_flush_denormal(flush)
    finish(results, started)
    if out is not None:
        write_results(out, name, results, render_markdown(results))
    return results


def merge(parts: list[str], out: str, device: str) -> dict[str, Any]:
    """One results file from the per-proxy parts (run in parallel processes)."""
    loaded = []
    for path in parts:
        with open(path) as f:
            loaded.append(json.load(f))
    results = dict(loaded[0])
    results["command"] = " & ".join(x["command"] for x in loaded) + " (parallel processes)"
    results["parts"] = [{"command": x["command"], "machine": x["machine"],
                         "wall_seconds": x.get("wall_seconds")} for x in loaded]
    results["systems"] = [s for x in loaded for s in x["systems"]]
    results["wall_seconds"] = max(x.get("wall_seconds", 0) for x in loaded)
    s = loaded[0]["settings"]
    results["targets"] = targets(results["systems"], s["target_residual"], s["target_fraction"])
    write_results(out, f"paper_scale_ij-{device_type(device)}", results,
                  render_markdown(results))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: ``--smoke`` for tiny sizes, ``--device``, ``--out``, ``--threads``."""
    p = parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a test of the pipeline)")
    p.add_argument("--only", default=None, help="comma-separated proxies (resnet18,resnet50,gpt): "
                   "writes paper_scale_ij-<device>-<proxies>.{json,md} (one process per proxy)")
    p.add_argument("--steps", default=None, help="with one --only proxy: comma-separated "
                   "training lengths to measure (a process per length runs them in parallel)")
    p.add_argument("--merge", default=None, help="comma-separated part files (.json) to merge "
                   "into paper_scale_ij-<device>.{json,md}")
    add_device(p)
    add_out(p)
    add_threads(p)
    args = p.parse_args(argv)
    device = args.device or "cpu"
    if args.merge:
        return merge(args.merge.split(","), args.out, device)
    set_threads(args.threads, device)
    settings = Settings.smoke() if args.smoke else Settings()
    if args.only:
        keep = set(args.only.split(","))
        settings.proxies = tuple(x for x in settings.proxies if x.key in keep)
    if args.steps:
        lengths = tuple(int(x) for x in args.steps.split(","))
        settings.proxies = tuple(replace(x, steps=lengths) for x in settings.proxies)
    results = run(settings, device, args.out, command_line("paper_scale_ij.py", argv),
                  log=lambda msg: print(msg, flush=True),
                  name=f"paper_scale_ij-{device_type(device)}"
                  + (f"-{args.only.replace(',', '-')}" if args.only else "")
                  + (f"-s{args.steps.replace(',', '-')}" if args.steps else ""))
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
