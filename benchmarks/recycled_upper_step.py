"""One BiSSL upper step with a reused matrix vs the original scheme, at the original's accuracy.

Usage::

    python benchmarks/recycled_upper_step.py --arch vision --batch 16 --repeats 3
    python benchmarks/recycled_upper_step.py --arch resnet18 --batch 64   # random-init ResNet-18

Two workloads. ``vision``: the pretrained small ResNet of :mod:`benchmarks.robust_ij` (the vision
recipe's network after its SimCLR and head-warm-up stages, exact Hessian of NT-Xent on a lower
batch of ``--batch`` image pairs, upper batches of twice that) at ``μ = λ + λ_damp = 1000``
(λ = 0.001); ``resnet18``: the workload of :mod:`benchmarks.run`
(:func:`benchmarks.workloads.bissl_workload`: torchvision ResNet-18 at random initialisation,
train-mode BatchNorm, cross-entropy at both levels, 32-px random images, λ = 1). One alternation:
one lower batch, so one matrix ``A = I + H/μ``, and ``N_U = 8`` upper steps on 8 different
upper batches. The **original scheme** (:func:`benchmarks.reference.reference_upper_step`:
forward and double backward recomputed per product, per-tensor CG, ``N_c = 5``) sets the
accuracy: ``tol`` is the smallest relative residual ``‖v − A u‖/‖v‖`` its 8 solves reach, and
every library method stops a solve there, at most ``--cap`` products (``--target paired``: each
upper step's solve stops at the residual the original reached on that step's right-hand side):
plain CG, the
:class:`~implicitbilevel.RecycledCG` and :class:`~implicitbilevel.RecycledMINRES` that keep what
earlier solves of the alternation found, and MINRES preconditioned by a
:class:`~implicitbilevel.LanczosPreconditioner` built once per alternation; plus the library's CG
at the fixed ``N_c = 5``. Each library alternation builds the kept-graph Hessian once and runs
:meth:`~implicitbilevel.BilevelProblem.upper_grad` 8 times (as the BiSSL trainer does).

Measured, side by side in one process (round-robin, :func:`benchmarks.harness.paired_times`):
the seconds of one alternation's 8 upper steps, so a step's cost is amortised over ``N_U = 8``
(Hessian build and Lanczos build included), its ratio to the original scheme per repeat
(median), the products per solve, and the relative error of ``u`` against a converged solve
``u*`` (CG to ``1e-7``, float32). Writes ``<out>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.harness import (
    add_out,
    add_threads,
    command_line,
    error_line,
    finish,
    fmt,
    header,
    new_results,
    paired_times,
    parser,
    quietly,
    ratio,
    relative_error,
    row,
    seeded,
    set_threads,
    short,
    table_head,
    write_results,
)
from benchmarks.pretrained import vision_network
from benchmarks.reference import flat, reference_upper_step, relative_residual
from benchmarks.robust_ij_methods import net_problem, reuse_solver
from benchmarks.robust_ij_methods import workload as peer_workload
from benchmarks.workloads import BiSSLWorkload, bissl_workload
from implicitbilevel import CG, LinearSolver

__all__ = ["METHODS", "Settings", "alternation_workload", "main", "render_markdown", "run"]

METHODS: dict[str, str] = {
    "original": "original BiSSL scheme, N_c = 5",
    "cg-5": "CG, N_c = 5",
    "cg": "CG, tol",
    "recycled-cg": "RecycledCG, tol",
    "recycled-minres": "RecycledMINRES, tol",
    "lanczos-minres": "MINRES + LanczosPreconditioner, tol",
}


@dataclass
class Settings:
    """Workload sizes, solver settings and repeats."""

    arch: str = "resnet18"
    batch: int = 16
    image: int = 32
    mu: float = 1000.0
    upper_steps: int = 8
    n_c: int = 5
    cap: int = 10
    recycle_dim: int = 8
    window: int = 10
    lanczos_rank: int = 4
    lanczos_products: int = 8
    repeats: int = 1
    reference_tol: float = 1e-7
    target: str = "min"  # "min": every solve to the original's best; "paired": to its own
    reference_cap: int = 40


def _solver(key: str, tol: float, s: Settings) -> LinearSolver:
    if key == "cg-5":
        return reuse_solver("cg", s.n_c)
    return reuse_solver({"lanczos-minres": "minres-lanczos"}.get(key, key), s.cap, tol,
                        recycle_dim=s.recycle_dim, window=s.window, lanczos_rank=s.lanczos_rank,
                        lanczos_products=s.lanczos_products)


def _steps(w: BiSSLWorkload, s: Settings) -> list[BiSSLWorkload]:
    """The workload with ``N_U`` different upper batches (the first is its own)."""
    gen = seeded(1)
    images, labels = w.upper_batch
    out = [w]
    for _ in range(s.upper_steps - 1):
        x = torch.randn(images.shape, generator=gen).to(images.device)
        y = torch.randint(0, 10, labels.shape, generator=gen).to(labels.device)
        out.append(dataclasses.replace(w, upper_batch=(x, y)))
    return out


def alternation_workload(s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """The alternation: per-step workloads for the original scheme (``steps``), a problem factory
    for the library (``problem``), the shared point and batches (``upper``, ``lower``,
    ``lower_batch``, ``upper_batches``), the backbone ``names``, a ``name`` and a ``note``."""
    if s.arch == "vision":
        net = vision_network(epochs=30, lower_batch=s.batch, upper_batch=2 * s.batch,
                             upper_steps=s.upper_steps, log=log)
        lam = 0.001
        return {"steps": [peer_workload(net, s.mu, lam, i) for i in range(s.upper_steps)],
                "problem": lambda solver: net_problem(net, s.mu, lam, "hessian", solver),
                "upper": net.upper, "lower": net.lower, "lower_batch": net.lower_batch,
                "upper_batches": net.upper_batches, "names": net.backbone, "name": net.name,
                "note": f"{net.note}; mu = lambda + lambda_damp = {s.mu:g} (lambda = {lam:g})"}
    w = bissl_workload(s.arch, batch=s.batch, image=s.image, mu=s.mu)
    steps = _steps(w, s)
    return {"steps": steps, "problem": w.problem, "upper": w.upper, "lower": w.lower,
            "lower_batch": w.lower_batch, "upper_batches": [x.upper_batch for x in steps],
            "names": w.backbone, "name": w.name, "note": w.note}


def run(s: Settings, out: str | None, command: str, name: str,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """The measurement (module docstring); JSON and Markdown go to ``out``."""
    started = time.perf_counter()
    results = new_results(command, "cpu", s)
    wl = alternation_workload(s, log)
    steps, names = wl["steps"], wl["names"]
    probe = wl["problem"](CG(max_iter=s.reference_cap, tol=s.reference_tol))
    hessian = probe.lower_hessian(wl["upper"], wl["lower"], wl["lower_batch"])
    system = probe.system(wl["upper"], wl["lower"], hessian, s.mu)

    def measured(u: dict, v: dict, u_star: torch.Tensor) -> dict[str, float]:
        return {"residual": relative_residual(system, u, v, names),
                "error": relative_error(flat(u, names), u_star)}

    log(f"[{wl['name']}] converged u* for {len(steps)} right-hand sides")
    originals = [reference_upper_step(x, max_iter=s.n_c) for x in steps]
    u_star = []
    for r in originals:
        u, info = quietly(lambda r=r: probe.solver(system, r.v))
        u_star.append(flat(u, names))
    original_acc = [measured(r.u, r.v, us) for r, us in zip(originals, u_star)]
    tol = min(a["residual"] for a in original_acc)
    log(f"  original scheme: residuals {[fmt(a['residual']) for a in original_acc]}; tol {tol:.3g}")

    # The timed alternations keep (u, v, products); accuracy is measured after the timing, so
    # the residual check's own product is in no method's time.
    solved: dict[str, list[tuple[dict, dict, int]]] = {}
    failed: dict[str, str] = {}
    builds: dict[str, int] = {}

    def alternation(key: str) -> Callable[[], None]:
        def go() -> None:
            if key == "original":
                solved[key] = [(r.u, r.v, s.n_c) for r in
                               (reference_upper_step(x, max_iter=s.n_c) for x in steps)]
                return
            solver = _solver(key, tol, s)
            problem = wl["problem"](solver)
            hess = problem.lower_hessian(wl["upper"], wl["lower"], wl["lower_batch"])
            rows = []
            try:
                for i, batch in enumerate(wl["upper_batches"]):
                    if s.target == "paired" and key != "cg-5":  # this step's original accuracy
                        solver.tol = original_acc[i]["residual"]
                    res = quietly(lambda b=batch: problem.upper_grad(
                        wl["upper"], wl["lower"], b, lower_hessian=hess))
                    rows.append((res.u, res.rhs, res.info.iterations))
            except ValueError as err:  # a refusal (no positive curvature to precondition)
                failed[key] = error_line(err)
            else:
                builds[key] = hess.calls
                solved[key] = rows
        return go

    log(f"  timing {len(METHODS)} methods x {s.repeats} repeats (one alternation each)")
    times = paired_times({k: alternation(k) for k in METHODS}, s.repeats, warmup=0)
    records = {key: [{"products": n, **measured(u, v, us)}
                     for (u, v, n), us in zip(rows, u_star)] for key, rows in solved.items()}
    for key, calls in builds.items():
        records[key][0]["alternation_products"] = calls
    table = []
    for key, label in METHODS.items():
        if key in failed:
            table.append({"method": key, "label": label, "error": failed[key]})
            log(f"    {label}: {failed[key]}")
            continue
        rows = records[key]
        total = rows[0].get("alternation_products", s.n_c * len(rows))
        table.append({
            "method": key, "label": label,
            "seconds_per_step": statistics.median(times[key]) / len(rows),
            "vs_original": ratio(times, key, "original"),
            "products_per_step": total / len(rows),
            "products_per_solve": [r["products"] for r in rows],
            "residual_median": statistics.median(r["residual"] for r in rows),
            "residual_max": max(r["residual"] for r in rows),
            "error_median": statistics.median(r["error"] for r in rows),
            "error_max": max(r["error"] for r in rows)})
        log(f"    {label}: {fmt(table[-1]['vs_original'])}x the original")
    results.update(workload={"name": wl["name"], "note": wl["note"],
                             "unknowns": sum(wl["lower"][n].numel() for n in names)},
                   tol=tol, original_residuals=[a["residual"] for a in original_acc],
                   times=times, rows=table)
    finish(results, started)
    if out is not None:
        write_results(out, name, results, render_markdown(results))
    return results


def render_markdown(results: dict[str, Any]) -> str:
    """One table: cost per upper step against the original scheme, products and accuracy."""
    s = results["settings"]
    lines = header("## One upper step with a reused matrix vs the original BiSSL scheme (cpu)",
                   results)
    lines += [f"- workload: **{results['workload']['name']}**: {results['workload']['note']}; "
              f"{results['workload']['unknowns']} unknowns",
              f"- one alternation: one Hessian, N_U = {s['upper_steps']} upper steps on different "
              f"upper batches; the library's kept-graph Hessian and the Lanczos build (rank "
              f"{s['lanczos_rank']}, {s['lanczos_products']} products) are counted once per "
              f"alternation; recycle_dim = {s['recycle_dim']}, window = {s['window']}",
              (f"- accuracy target: tol = {results['tol']:.3g}, the smallest relative residual "
               f"of the original scheme's {s['upper_steps']} solves at N_c = {s['n_c']}; 'tol' "
               f"rows stop there (at most {s['cap']} products)") if s.get("target", "min") ==
              "min" else
              (f"- accuracy target, paired: the 'tol' rows stop each upper step's solve at the "
               f"relative residual the original scheme reached on that step's right-hand side "
               f"(between {min(results['original_residuals']):.3g} and "
               f"{max(results['original_residuals']):.3g}; at most {s['cap']} products)"),
              f"- seconds: median over {s['repeats']} round-robin repeats of one alternation, "
              "divided by N_U; 'vs original' is the median of the per-repeat ratios", ""]
    lines += table_head("method", "seconds per upper step", "vs original",
                        "products per upper step (incl. builds)", "products per solve",
                        "rel. residual (median, max)", "rel. error u vs u* (median, max)")
    for r in results["rows"]:
        if "error" in r:
            lines.append(row(r["label"], *["-"] * 5, "refused: " + short(r["error"], 110)))
            continue
        lines.append(row(r["label"], fmt(r["seconds_per_step"]), fmt(r["vs_original"]),
                         fmt(r["products_per_step"], 1),
                         " ".join(str(p) for p in r["products_per_solve"]),
                         f"{fmt(r['residual_median'])}, {fmt(r['residual_max'])}",
                         f"{fmt(r['error_median'])}, {fmt(r['error_max'])}"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line (module docstring)."""
    p = parser(__doc__)
    add_out(p)
    add_threads(p, default=1)
    p.add_argument("--batch", type=int, default=16, help="images per batch (workload: 64)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cap", type=int, default=10, help="products per solve of the tol rows")
    p.add_argument("--arch", default="resnet18",
                   help="resnet18 (random init), vision (the pretrained small ResNet of "
                   "benchmarks/robust_ij.py; --batch is its lower batch, the upper batch twice "
                   "it) or tiny-cnn (a smoke test)")
    p.add_argument("--mu", type=float, default=1000.0, help="μ = λ + λ_damp")
    p.add_argument("--target", choices=("min", "paired"), default="min",
                   help="accuracy of the 'tol' rows: every solve to the smallest residual of the "
                   "original's 8 (min), or each to the original's on the same step (paired)")
    p.add_argument("--name", default="recycled_upper_step-cpu")
    args = p.parse_args(argv)
    set_threads(args.threads, "cpu")
    s = Settings(arch=args.arch, batch=args.batch, repeats=args.repeats, cap=args.cap,
                 mu=args.mu, target=args.target)
    results = run(s, args.out, command_line("recycled_upper_step.py", argv), args.name,
                  log=lambda msg: print(msg, flush=True))
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
