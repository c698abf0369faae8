"""Run the benchmarks and write ``<out>/<mode>-<device>.json`` and ``.md``.

Usage::

    python benchmarks/run.py --quick               # 2-core CPU, under 10 minutes
    python benchmarks/run.py --full --device cuda  # bigger settings, a GPU if there is one

Every figure is a ratio of two times taken in the same process, interleaved, median over repeats
after unrecorded warm-up runs (:mod:`benchmarks.harness`; the measurements are in
:mod:`benchmarks.measure`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
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
    finish,
    fmt,
    header,
    met_cell,
    mode_and_device,
    new_results,
    parser,
    peer_table,
    pyplot,
    row,
    save_figure,
    set_threads,
    table_head,
    write_results,
)
from benchmarks.measure import (
    accuracy_vs_iterations,
    hvp_and_solver_costs,
    memory_ratio,
    peer_comparison,
)
from benchmarks.peers import peer_status
from benchmarks.workloads import bissl_workload, gpt_workload, mlp_bissl_workload, resnet_workload

__all__ = ["Settings", "main", "plot_accuracy", "render_markdown", "run", "targets"]


@dataclass
class Settings:
    """Sizes and repeat counts of one benchmark mode."""

    arch: str = "resnet18"
    batch: int = 32
    image: int = 32
    mu: float = 1000.0
    gpt_mu: float = 10.0
    gpt_batch: int = 16
    gpt_context: int = 64
    gpt_layers: int = 2
    gpt_width: int = 64
    gpt_vocab: int = 1000
    hvp_repeats: int = 4
    peer_repeats: int = 3
    memory_repeats: int = 1
    warmup: int = 1
    converged_iters: int = 20
    mlp_hidden: int = 8
    mlp_iterations: tuple[int, ...] = tuple(range(1, 21))
    with_gpt: bool = True
    with_memory: bool = True

    @classmethod
    def for_mode(cls, mode: str, device: str) -> Settings:
        """The settings of ``quick`` (2-core CPU, < 10 min), ``full`` or ``smoke`` (tests)."""
        if mode == "quick":
            return cls()
        if mode == "full":
            gpu = torch.device(device).type == "cuda"
            return cls(batch=256 if gpu else 64, gpt_batch=64 if gpu else 16, hvp_repeats=15,
                       peer_repeats=7, memory_repeats=3, warmup=2, converged_iters=50,
                       mlp_iterations=tuple(range(1, 41)))
        if mode == "smoke":
            return cls(arch="tiny-cnn", batch=4, image=8, mu=1000.0, gpt_batch=2, gpt_context=8,
                       gpt_layers=1, gpt_width=16, gpt_vocab=50, hvp_repeats=2, peer_repeats=1,
                       memory_repeats=1, warmup=1, converged_iters=20, mlp_hidden=4,
                       mlp_iterations=(1, 2, 4), with_gpt=True, with_memory=False)
        raise ValueError(f"unknown mode {mode!r}")


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets with their measured values (``met`` is ``None`` where not measured)."""
    rows: list[dict[str, Any]] = []
    resnet = results.get("hvp_solver", {}).get("resnet")
    if resnet:
        amortised = resnet["solver"]["cg_iteration_amortised_over_gradient"]
        rows.append({"target": "amortised cost per CG iteration <= 2.4x a gradient",
                     "measured": f"{amortised:.2f}x (per iteration without the graph build: "
                                 f"{resnet['solver']['cg_iteration_over_gradient']:.2f}x)",
                     "met": amortised <= 2.4})
        book = resnet["solver"]["cg_bookkeeping_fraction_direct"]
        rows.append({"target": "CG bookkeeping <= 3% of a solve",
                     "measured": f"{100 * book:.1f}% direct "
                                 f"({100 * resnet['solver']['cg_bookkeeping_fraction']:.1f}% incl."
                                 " the I + H/mu combination)",
                     "met": book <= 0.03})
    peers = results.get("peers", {}).get("peers", {})
    ref = peers.get("reference (double backward per HVP, blockwise CG)")
    if ref:
        rows.append({"target": "upper step >= 1.5x faster than the reference scheme",
                     "measured": f"{ref['time_over_ours']:.2f}x "
                                 f"(solution rel. diff {ref['rel_diff_u']:.1e} vs our "
                                 "blockwise CG)",
                     "met": ref["time_over_ours"] >= 1.5})
    topt = peers.get("TorchOpt custom_root default (solve_normal_cg)")
    if topt:
        rows.append({"target": "upper step >= 2x faster than TorchOpt's default implicit solve",
                     "measured": f"{topt['time_over_ours']:.2f}x "
                                 f"(solution rel. diff {topt['rel_diff_u']:.1e})",
                     "met": topt["time_over_ours"] >= 2.0})
    memory = results.get("memory")
    if memory:
        kept = memory["over_finetune"].get("upper step, kept graph", math.nan)
        fwd = memory["over_finetune"].get("upper step, forward-over-reverse", math.nan)
        rows.append({"target": "peak memory of an upper step <= 1.5x a fine-tuning step",
                     "measured": f"{kept:.2f}x kept graph (default), {fwd:.2f}x "
                                 "forward-over-reverse (reuse_graph=False)",
                     "met": kept <= 1.5})
    return rows


def run(mode: str, device: str, out: str | None, command: str, log: Any = print,
        settings: Settings | None = None) -> dict[str, Any]:
    """Run every measurement of ``mode`` on ``device``; write JSON and Markdown under ``out``."""
    s = settings or Settings.for_mode(mode, device)
    started = time.perf_counter()
    results = new_results(command, device, s, mode)
    status = peer_status()
    results["peer_status"] = status
    available = {name: entry["available"] for name, entry in status.items()}

    log("[1-2] HVP cost and solver overhead ...")
    results["hvp_solver"] = {
        "resnet": hvp_and_solver_costs(
            resnet_workload(s.batch, s.image, device, arch=s.arch), s.mu, s.hvp_repeats,
            s.warmup, device=device),
    }
    if s.with_gpt:
        results["hvp_solver"]["gpt"] = hvp_and_solver_costs(
            gpt_workload(s.gpt_batch, s.gpt_context, s.gpt_layers, s.gpt_width, s.gpt_vocab,
                         device), s.gpt_mu, s.hvp_repeats, s.warmup, device=device)

    log("[3,6] peers on the same IJ solve, end to end ...")
    w = bissl_workload(s.arch, s.batch, s.image, s.mu, device)
    results["peers"] = peer_comparison(w, s.peer_repeats, s.warmup, available,
                                       s.converged_iters, device=device)
    del w

    if s.with_memory:
        log("[4] memory (fresh subprocess per measurement) ...")
        results["memory"] = memory_ratio(s.arch, s.batch, s.image, s.mu, device,
                                         s.memory_repeats, threads=torch.get_num_threads())

    log("[5] accuracy vs iterations (MLP, dense reference) ...")
    mlp = mlp_bissl_workload(hidden=s.mlp_hidden)
    results["accuracy"] = accuracy_vs_iterations(mlp, list(s.mlp_iterations))
    results["targets"] = targets(results)
    finish(results, started)

    if out is not None:
        write_results(out, f"{mode}-{device_type(device)}", results, render_markdown(results))
        plot_accuracy(results["accuracy"], os.path.join(out, "accuracy_vs_iterations.png"))
    return results


def plot_accuracy(acc: dict[str, Any], path: str) -> None:
    """Plot relative hypergradient error vs iterations (log scale) to ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, errors in acc["relative_error"].items():
        ax.semilogy(acc["iterations"], [max(e, 1e-17) for e in errors], marker="o", ms=3,
                    label=label)
    ax.set_xlabel("iterations (Hessian-vector products)")
    ax.set_ylabel("relative error of the hypergradient vs Dense()")
    cond = acc["eigenvalues_A"]["condition"]
    ax.set_title(f"{acc['workload']}\n{acc['unknowns']} unknowns, cond(I + H/mu) = {cond:.3g}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, 120)


def render_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables (what the README shows)."""
    m = results["machine"]
    lines = header(f"## Benchmark results: `{results['mode']}` on {m['device']}", results) + [
        "- every figure: a ratio of times in one process, interleaved, median over "
        f"{results['settings']['hvp_repeats']} (HVP/solver) or "
        f"{results['settings']['peer_repeats']} (upper steps) repeats after warm-up",
        "",
        "### Targets",
        "",
        *table_head("target", "measured", "met"),
    ]
    for t in results.get("targets", []):
        lines.append(row(t["target"], t["measured"], met_cell(t["met"])))

    lines += ["", "### (1) HVP cost, time / one gradient", "",
              *table_head("workload", "gradient (s)", "forward-over-reverse",
                          "reverse-over-reverse", "kept graph", "kept-graph build")]
    for r in results["hvp_solver"].values():
        h = r["hvp_over_gradient"]
        lines.append(row(r["workload"], fmt(r["gradient_seconds"], 3),
                         fmt(h["forward-over-reverse"]), fmt(h["reverse-over-reverse"]),
                         fmt(h["kept-graph"]), fmt(h["kept-graph build"])))

    lines += ["", "### (2) Solver overhead: one `CG(max_iter=5)` / `Neumann(max_iter=5)` solve of "
              "`(I + H/mu) u = b` through the kept-graph operator", "",
              "k = products the solve ran (CG may stop at its rounding floor). Bookkeeping "
              "(direct): the same solve with a trivial block-diagonal matvec, minus those "
              "matvecs, over the real solve; incl. I + H/mu: `1 − k·t(matvec)/t(solve)`.", "",
              *table_head("workload", "mu", "CG k", "CG solve / (k HVP)",
                          "CG bookkeeping (direct)", "CG bookkeeping incl. I + H/mu",
                          "CG iteration / gradient", "amortised over N_U = 8",
                          "Neumann solve / (5 HVP)", "Neumann bookkeeping (direct)")]
    for r in results["hvp_solver"].values():
        v = r["solver"]
        lines.append(row(
            r["workload"], f"{r['mu']:g}", v["cg_iterations"], fmt(v["cg5_over_5_hvp"]),
            f"{100 * v['cg_bookkeeping_fraction_direct']:.1f}% "
            f"({fmt(v['cg_bookkeeping_ms'], 1)} ms per 5 its.)",
            f"{100 * v['cg_bookkeeping_fraction']:.1f}%", fmt(v["cg_iteration_over_gradient"]),
            fmt(v["cg_iteration_amortised_over_gradient"]), fmt(v["neumann5_over_5_hvp"]),
            f"{100 * v['neumann_bookkeeping_fraction_direct']:.1f}%"))

    p = results["peers"]
    lines += ["", f"### (3) Peers: one BiSSL upper step on {p['workload']}, N_c = 5", "",
              f"{p['note']}. `u` solves `(I + H/mu) u = v`; `u - v` is its curvature part "
              f"(`‖u* − v‖/‖v‖ = {fmt(p['u_minus_v_over_v'])}` for the converged `u*`, "
              f"CG({results['settings']['converged_iters']}), breakdown: "
              f"{p['ours_solve']['converged_breakdown'] or 'none'}).", "",
              *table_head("method", "time / ours", "compared with", "rel. diff u",
                          "rel. diff (u − v)", "rel. diff hypergradient",
                          "rel. err (u − v) vs converged")]
    for name, r in p["peers"].items():
        speed = fmt(r["time_over_ours"]) if r["time_over_ours"] is not None else "(not timed)"
        lines.append(row(name, speed, r["compared_with"], fmt(r["rel_diff_u"]),
                         fmt(r["rel_diff_u_minus_v"]), fmt(r["rel_diff_hypergradient"]),
                         fmt(r["rel_err_u_minus_v_vs_converged"])))
    lines += ["", *peer_table(results["peer_status"])]

    if "memory" in results:
        mem = results["memory"]
        lines += ["", f"### (4) Peak memory ({mem['method']}, batch {mem['batch']})", "",
                  *table_head("step", "peak delta (MiB)", "/ fine-tuning step")]
        for v, d in mem["delta_mib"].items():
            lines.append(row(v, fmt(d, 0), fmt(mem["over_finetune"][v])))
        for v, err in mem.get("errors", {}).items():
            lines.append(f"| {v} | failed: {err} | |")

    acc = results["accuracy"]
    its = acc["iterations"]
    shown = [k for k in its if k in (1, 2, 3, 5, 10, 15, 20, 30, 40)] or its
    lines += ["", f"### (5) Accuracy vs iterations: {acc['workload']}", "",
              f"{acc['note']}; {acc['unknowns']} unknowns, eigenvalues of I + H/mu in "
              f"[{fmt(acc['eigenvalues_A']['min'], 3)}, {fmt(acc['eigenvalues_A']['max'], 3)}]. "
              "Relative error of the hypergradient vs `Dense()`; plot: "
              "`accuracy_vs_iterations.png`.", "",
              *table_head("solver", *(f"{k} it." for k in shown))]
    for label, errors in acc["relative_error"].items():
        lines.append(row(label, *(fmt(errors[its.index(k)]) for k in shown)))

    e = p["end_to_end"]
    lines += ["", f"### (6) End to end on {p['workload']}: time / one fine-tuning step", "",
              f"Fine-tuning step (forward, backward, SGD step): {fmt(e['finetune_seconds'], 3)} s.",
              "",
              *table_head("BiSSL upper step (N_c = 5)", "time / fine-tuning step"),
              row("fresh lower Hessian (upper_grad + SGD step)",
                  fmt(e["upper_step_over_finetune"])),
              row("lower Hessian shared by the step's alternation (graph already built)",
                  fmt(e["upper_step_shared_hessian_over_finetune"])),
              row("amortised: shared Hessian + 1/8 of its build (N_U = 8)",
                  fmt(e["upper_step_amortised_over_finetune"])),
              row("building the lower Hessian alone", fmt(e["lower_hessian_build_over_finetune"])),
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: ``--quick`` / ``--full``, ``--device``, ``--out``, ``--threads``."""
    p = parser(__doc__)
    add_modes(p, quick="2-core CPU, under 10 minutes", full="bigger settings (GPU if available)")
    add_device(p)
    add_out(p)
    add_threads(p)
    args = p.parse_args(argv)
    mode, device = mode_and_device(args)
    set_threads(args.threads, device, mode)
    results = run(mode, device, args.out, command_line("run.py", argv))
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
