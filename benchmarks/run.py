"""Run the benchmarks and write ``<out>/<mode>-<device>.json`` and ``.md``.

Usage::

    python benchmarks/run.py --quick               # 2-core CPU, under 10 minutes
    python benchmarks/run.py --full --device cuda  # bigger settings, a GPU if there is one

Every figure is a ratio of two times taken in the same process, interleaved, median over repeats
after unrecorded warm-up runs (see :mod:`benchmarks.measure`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.measure import (
    accuracy_vs_iterations,
    hvp_and_solver_costs,
    memory_ratio,
    peer_comparison,
)
from benchmarks.peers import peer_status
from benchmarks.workloads import bissl_workload, gpt_workload, mlp_bissl_workload, resnet_workload

__all__ = ["Settings", "machine_info", "main", "render_markdown", "run", "targets"]


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


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, cores, threads, GPU, torch/Python versions, date (UTC)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


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
    results: dict[str, Any] = {
        "mode": mode, "command": command, "machine": machine_info(device),
        "settings": asdict(s),
    }
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
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_end"] = list(os.getloadavg())
    results["wall_seconds"] = time.perf_counter() - started

    if out is not None:
        os.makedirs(out, exist_ok=True)
        stem = os.path.join(out, f"{mode}-{torch.device(device).type}")
        with open(stem + ".json", "w") as f:
            json.dump(results, f, indent=2, default=str)
        with open(stem + ".md", "w") as f:
            f.write(render_markdown(results))
        plot_accuracy(results["accuracy"], os.path.join(out, "accuracy_vs_iterations.png"))
    return results


def plot_accuracy(acc: dict[str, Any], path: str) -> None:
    """Plot relative hypergradient error vs iterations (log scale) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
            return f"{x:.1e}"
        return f"{x:.{digits}f}"
    return str(x)


def _load(m: dict[str, Any]) -> str:
    start, end = m.get("load_average"), m.get("load_average_end")
    if not start:
        return "unknown"
    text = f"{start[0]:.1f} at start"
    return text + (f", {end[0]:.1f} at end" if end else "")


def render_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables (what the README shows)."""
    m = results["machine"]
    lines = [
        f"## Benchmark results: `{results['mode']}` on {m['device']}",
        "",
        f"- command: `{results['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads, load "
        f"average {_load(m)})"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, Python {m['python']}",
        f"- date: {m['date_utc']}; wall time {results.get('wall_seconds', 0):.0f} s",
        "- every figure: a ratio of times in one process, interleaved, median over "
        f"{results['settings']['hvp_repeats']} (HVP/solver) or "
        f"{results['settings']['peer_repeats']} (upper steps) repeats after warm-up",
        "",
        "### Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for row in results.get("targets", []):
        met = "yes" if row["met"] else ("no" if row["met"] is not None else "-")
        lines.append(f"| {row['target']} | {row['measured']} | {met} |")

    lines += ["", "### (1) HVP cost, time / one gradient", "",
              "| workload | gradient (s) | forward-over-reverse | reverse-over-reverse "
              "| kept graph | kept-graph build |",
              "|---|---|---|---|---|---|"]
    for r in results["hvp_solver"].values():
        h = r["hvp_over_gradient"]
        lines.append(f"| {r['workload']} | {_f(r['gradient_seconds'], 3)} "
                     f"| {_f(h['forward-over-reverse'])} | {_f(h['reverse-over-reverse'])} "
                     f"| {_f(h['kept-graph'])} | {_f(h['kept-graph build'])} |")

    lines += ["", "### (2) Solver overhead: one `CG(max_iter=5)` / `Neumann(max_iter=5)` solve of "
              "`(I + H/mu) u = b` through the kept-graph operator", "",
              "k = products the solve ran (CG may stop at its rounding floor). Bookkeeping "
              "(direct): the same solve with a trivial block-diagonal matvec, minus those "
              "matvecs, over the real solve; incl. I + H/mu: `1 − k·t(matvec)/t(solve)`.", "",
              "| workload | mu | CG k | CG solve / (k HVP) | CG bookkeeping (direct) "
              "| CG bookkeeping incl. I + H/mu | CG iteration / gradient "
              "| amortised over N_U = 8 | Neumann solve / (5 HVP) | Neumann bookkeeping (direct) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["hvp_solver"].values():
        v = r["solver"]
        lines.append(
            f"| {r['workload']} | {r['mu']:g} | {v['cg_iterations']} | {_f(v['cg5_over_5_hvp'])} "
            f"| {100 * v['cg_bookkeeping_fraction_direct']:.1f}% ({_f(v['cg_bookkeeping_ms'], 1)}"
            f" ms per 5 its.) | {100 * v['cg_bookkeeping_fraction']:.1f}% "
            f"| {_f(v['cg_iteration_over_gradient'])} "
            f"| {_f(v['cg_iteration_amortised_over_gradient'])} "
            f"| {_f(v['neumann5_over_5_hvp'])} "
            f"| {100 * v['neumann_bookkeeping_fraction_direct']:.1f}% |")

    p = results["peers"]
    lines += ["", f"### (3) Peers: one BiSSL upper step on {p['workload']}, N_c = 5", "",
              f"{p['note']}. `u` solves `(I + H/mu) u = v`; `u - v` is its curvature part "
              f"(`‖u* − v‖/‖v‖ = {_f(p['u_minus_v_over_v'])}` for the converged `u*`, "
              f"CG({results['settings']['converged_iters']}), breakdown: "
              f"{p['ours_solve']['converged_breakdown'] or 'none'}).", "",
              "| method | time / ours | compared with | rel. diff u | rel. diff (u − v) "
              "| rel. diff hypergradient | rel. err (u − v) vs converged |",
              "|---|---|---|---|---|---|---|"]
    for name, r in p["peers"].items():
        speed = _f(r["time_over_ours"]) if r["time_over_ours"] is not None else "(not timed)"
        lines.append(f"| {name} | {speed} | {r['compared_with']} "
                     f"| {_f(r['rel_diff_u'])} | {_f(r['rel_diff_u_minus_v'])} "
                     f"| {_f(r['rel_diff_hypergradient'])} "
                     f"| {_f(r['rel_err_u_minus_v_vs_converged'])} |")
    lines += ["", "| peer | installed | note / exact error |", "|---|---|---|"]
    for st in results["peer_status"].values():
        detail = st.get("import_error") or st.get("install_error") or st.get("note", "")
        lines.append(f"| {st['package']} | {st['version'] or 'no'} | {detail} |")

    if "memory" in results:
        mem = results["memory"]
        lines += ["", f"### (4) Peak memory ({mem['method']}, batch {mem['batch']})", "",
                  "| step | peak delta (MiB) | / fine-tuning step |", "|---|---|---|"]
        for v, d in mem["delta_mib"].items():
            lines.append(f"| {v} | {_f(d, 0)} | {_f(mem['over_finetune'][v])} |")
        for v, err in mem.get("errors", {}).items():
            lines.append(f"| {v} | failed: {err} | |")

    acc = results["accuracy"]
    its = acc["iterations"]
    shown = [k for k in its if k in (1, 2, 3, 5, 10, 15, 20, 30, 40)] or its
    lines += ["", f"### (5) Accuracy vs iterations: {acc['workload']}", "",
              f"{acc['note']}; {acc['unknowns']} unknowns, eigenvalues of I + H/mu in "
              f"[{_f(acc['eigenvalues_A']['min'], 3)}, {_f(acc['eigenvalues_A']['max'], 3)}]. "
              "Relative error of the hypergradient vs `Dense()`; plot: "
              "`accuracy_vs_iterations.png`.", "",
              "| solver | " + " | ".join(f"{k} it." for k in shown) + " |",
              "|---|" + "---|" * len(shown)]
    for label, errors in acc["relative_error"].items():
        lines.append(f"| {label} | "
                     + " | ".join(_f(errors[its.index(k)]) for k in shown) + " |")

    e = p["end_to_end"]
    lines += ["", f"### (6) End to end on {p['workload']}: time / one fine-tuning step", "",
              f"Fine-tuning step (forward, backward, SGD step): {_f(e['finetune_seconds'], 3)} s.",
              "",
              "| BiSSL upper step (N_c = 5) | time / fine-tuning step |", "|---|---|",
              f"| fresh lower Hessian (upper_grad + SGD step) | "
              f"{_f(e['upper_step_over_finetune'])} |",
              f"| lower Hessian shared by the step's alternation (graph already built) | "
              f"{_f(e['upper_step_shared_hessian_over_finetune'])} |",
              f"| amortised: shared Hessian + 1/8 of its build (N_U = 8) | "
              f"{_f(e['upper_step_amortised_over_finetune'])} |",
              f"| building the lower Hessian alone | "
              f"{_f(e['lower_hessian_build_over_finetune'])} |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: ``--quick`` / ``--full``, ``--device``, ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="2-core CPU, under 10 minutes")
    group.add_argument("--full", action="store_true", help="bigger settings (GPU if available)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda in --full "
                        "when available, else cpu)")
    parser.add_argument("--out", default="benchmarks/results", help="output directory")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op CPU threads (default: 1 in --quick on CPU, see "
                        "benchmarks/README.md; torch's default otherwise)")
    args = parser.parse_args(argv)
    mode = "full" if args.full else "quick"
    device = args.device or ("cuda" if args.full and torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif torch.device(device).type == "cpu" and mode == "quick":
        # On a shared 2-core machine two intra-op threads stall whenever another process holds
        # a core (a kept-graph GPT HVP took 10 s instead of 0.18 s at load 8); one thread gives
        # stable ratios.
        torch.set_num_threads(1)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/run.py", *sys.argv[1:]]
                                   ) if argv is None else "run(" + " ".join(argv) + ")"
    results = run(mode, device, args.out, command)
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
