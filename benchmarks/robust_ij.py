"""Robust implicit-Jacobian solves on pretrained networks: accuracy against cost.

Usage::

    python benchmarks/robust_ij.py --quick                # 2-core CPU
    python benchmarks/robust_ij.py --full --device cuda   # bigger batches, every peer N_c

For each pretrained network (:mod:`benchmarks.pretrained`: the vision recipe's small ResNet after
its SimCLR stage, the GPT recipe's small GPT after its pretraining) and each ``μ = λ + λ_damp``
(thesis: λ = 0.001, λ_damp = 10; and μ = 1000), one BiSSL alternation is reproduced: one fixed
lower (pretext) batch, so one curvature operator, and ``N_U = 8`` upper steps on 8 different
downstream batches. Every method solves the 8 implicit-Jacobian (IJ) systems ``(I + H/μ) u = v_i``
and is measured for

1. **cost** of one upper step amortised over the alternation, ``(build + 8 steps) / 8``, as a
   ratio to one gradient of the downstream loss. ``build`` is the curvature operator (kept graph)
   plus, where used, the Nyström approximation; ``step`` is one ``BilevelProblem.upper_grad``
   with that operator. Peers recompute everything in every step, so their cost is one step.
   All callables run round-robin in one process (:func:`benchmarks.harness.paired_times`); the
   steps rotate over the 8 upper batches;
2. **accuracy** of ``u`` against a converged solution ``u*`` of the exact-Hessian system
   (float64, block minimum-residual over the 8 right-hand sides to ``1e-8`` relative residual):
   ``‖u − u*‖/‖u*‖`` and the relative residual ``‖v − A u‖/‖v‖`` measured with one product of the
   exact ``A = I + H/μ`` (for Gauss–Newton methods this shows the price of the approximation);
3. **breakdowns** over the 8 solves (``SolveInfo.breakdown``; a Nyström approximation that cannot
   be built counts all 8);
4. **peak memory** of one upper step (operator, approximation and one ``upper_grad``), in a fresh
   subprocess: peak RSS (``VmHWM``) over RSS before on CPU, ``torch.cuda.max_memory_allocated``
   over memory allocated before on CUDA.

Writes ``<out>/robust_ij-<device>.json``, ``.md`` and ``robust_ij_accuracy_vs_cost.png``.

The parts: this module (settings, the run, the command line); :mod:`benchmarks.robust_ij_methods`
(the method families, the problem, the networks); :mod:`benchmarks.robust_ij_system` (one network
at one ``μ``: the accuracy and timing passes); :mod:`benchmarks.reference` (the original BiSSL
scheme and the converged float64 ``u*``); :mod:`benchmarks.robust_ij_memory` (peak memory);
:mod:`benchmarks.robust_ij_report` (targets, tables, plot).
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.harness import (
    add_device,
    add_modes,
    add_out,
    add_threads,
    command_line,
    device_type,
    error_line,
    finish,
    mode_and_device,
    new_results,
    parser,
    set_threads,
    write_results,
)
from benchmarks.peers import peer_status
from benchmarks.reference import block_minimum_residual
from benchmarks.robust_ij_memory import memory_subprocess, memory_worker
from benchmarks.robust_ij_methods import FAMILIES, networks
from benchmarks.robust_ij_report import plot, render_markdown, targets
from benchmarks.robust_ij_settings import Settings
from benchmarks.robust_ij_system import measure_system

__all__ = [
    "FAMILIES",
    "Settings",
    "block_minimum_residual",
    "main",
    "memory_worker",
    "render_markdown",
    "run",
]


def run(mode: str, device: str, out: str | None, command: str,
        log: Callable[[str], None] = print, settings: Settings | None = None,
        name: str | None = None) -> dict[str, Any]:
    """Every measurement of ``mode`` on ``device``; JSON, Markdown and the plot go to ``out``
    as ``<name>.json``/``.md`` (default ``robust_ij-<device>``)."""
    s = settings or Settings.for_mode(mode, device)
    started = time.perf_counter()
    results = new_results(command, device, s, mode)
    flush = torch.set_flush_denormal(True)
    try:
        status = peer_status(try_install=mode != "smoke")
        results["peer_status"] = status
        log("preparing the pretrained networks (cached under runs/robust_ij/) ...")
        nets = networks(s, device, log)
        results["networks"] = [{"name": n.name, "note": n.note, "unknowns": n.unknowns,
                                "info": n.info} for n in nets]
        results["prepare_seconds"] = time.perf_counter() - started
        systems = []
        memory = []
        for net in nets:
            net64 = net.to(dtype=torch.float64)
            for damping in s.dampings:
                mu = s.lam + damping
                try:
                    systems.append(measure_system(net, net64, mu, s, status, device, log))
                except Exception as err:
                    traceback.print_exc()
                    systems.append({"network": net.name, "mu": mu, "error": error_line(err),
                                    "rows": []})
                gc.collect()
            del net64
            if s.memory:
                log(f"  [{net.name}] peak memory of one upper step (fresh subprocess) ...")
                memory.append(memory_subprocess(net, s.lam + s.dampings[0], s, device, status,
                                                torch.get_num_threads()))
        results["systems"] = systems
        results["memory"] = memory
        results["targets"] = targets([x for x in systems if "error" not in x])
    finally:
        torch.set_flush_denormal(flush)
    finish(results, started)
    if out is not None:
        stem = name or f"robust_ij-{device_type(device)}"
        write_results(out, stem, results, render_markdown(results))
        plot(results, os.path.join(out, "robust_ij_accuracy_vs_cost.png" if name is None
                                   else f"{name}_accuracy_vs_cost.png"))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: ``--quick`` (default) / ``--full``, ``--device``, ``--out``."""
    p = parser(__doc__)
    add_modes(p, quick="2-core CPU sizes (the default)", full="recipe batch sizes, every peer N_c")
    add_device(p)
    add_out(p)
    add_threads(p)
    p.add_argument("--no-reference-cache", action="store_true",
                   help="recompute the converged reference solutions (cached by default in "
                   "runs/robust_ij/references, keyed by a digest of the systems)")
    p.add_argument("--name", default=None,
                   help="results file stem (default robust_ij-<device>; the plot is then "
                   "<name>_accuracy_vs_cost.png)")
    args = p.parse_args(argv)
    mode, device = mode_and_device(args)
    set_threads(args.threads, device, mode)
    settings = Settings.for_mode(mode, device)
    if args.no_reference_cache:
        settings.reference_cache = None
    results = run(mode, device, args.out, command_line("robust_ij.py", argv),
                  log=lambda msg: print(msg, flush=True), settings=settings, name=args.name)
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
