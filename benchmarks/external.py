"""External bilevel problems: the hypergradient of every solver of this library and of its peers,
against a dense float64 reference, for N_c iterations.

Usage::

    nice -n 10 python benchmarks/external.py            # writes results/external-cpu.{json,md,png}
    python benchmarks/external.py --tiny --out /tmp/x   # seconds: the smoke-test sizes

The problems (:mod:`benchmarks.external_problems`) are the benchopt bilevel benchmark's quadratic
problem and its regularisation-selection problem (per-feature ℓ2 penalties of a logistic
regression, on breast-cancer); the methods (:mod:`benchmarks.external_methods`) are this library's
CG, MINRES, Neumann, Nyström and dense solvers through :func:`implicitbilevel.argmin`, and
TorchOpt, JAXopt and Betty where they import. For each ``N_c`` in ``{1, 2, 5, 10, 20}``: the
relative error ``‖ĝ − g*‖/‖g*‖`` of the hypergradient ``ĝ`` against the closed-form one ``g*``
(thesis Theorem 3.2, eq. 3.2-3.3) and the wall time of one hypergradient, median over repeats
taken round-robin in one process (:func:`benchmarks.harness.paired_times`), also as a ratio to one
gradient ``∇_y g`` timed beside it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import Tensor

import implicitbilevel as ib
from benchmarks.external_methods import Method, methods, peer_availability
from benchmarks.external_problems import ExternalProblem, logistic_problem, quadratic_problem
from benchmarks.harness import (
    add_out,
    add_repeats,
    add_threads,
    command_line,
    finish,
    header,
    median,
    new_results,
    paired_times,
    parser,
    peer_table,
    pyplot,
    ratio,
    relative_error,
    row,
    save_figure,
    set_threads,
    table_head,
    write_results,
)

__all__ = ["Settings", "exact_check", "main", "plot", "render_markdown", "run"]


@dataclass
class Settings:
    """Sizes of one run (``tiny`` for the smoke test)."""

    iterations: tuple[int, ...] = (1, 2, 5, 10, 20)
    repeats: int = 7
    warmup: int = 1
    quadratic_dim: int = 100
    quadratic_samples: int = 1024

    @classmethod
    def tiny(cls) -> Settings:
        """Smoke-test sizes: an 8 × 8 quadratic over 32 samples, N_c = 2, one repeat."""
        return cls(iterations=(2,), repeats=1, warmup=0, quadratic_dim=8, quadratic_samples=32)


def exact_check(problem: ExternalProblem) -> dict[str, float]:
    """Relative error of ``Dense()`` and of CG run to convergence against the reference."""
    def hypergradient(solver: ib.LinearSolver) -> Tensor:
        x = problem.x.clone().requires_grad_(True)
        y = ib.argmin(lambda yy, xx: problem.inner(yy["y"], xx["x"]), {"y": problem.y},
                      {"x": x}, ij=ib.ImplicitJacobian(solver))
        return torch.autograd.grad(problem.outer(y["y"], x), x)[0]

    n = problem.y.numel()
    return {"Dense": relative_error(hypergradient(ib.Dense()), problem.reference),
            "CG converged": relative_error(
                hypergradient(ib.CG(max_iter=10 * n, tol=1e-14)), problem.reference)}


def _measure_problem(problem: ExternalProblem, all_methods: list[Method], settings: Settings,
                     log: Any) -> dict[str, Any]:
    lo, hi = problem.eigenvalues()
    y = problem.y.clone().requires_grad_(True)

    def gradient() -> Tensor:
        return torch.autograd.grad(problem.inner(y, problem.x), y)[0]

    rows: dict[str, dict[str, Any]] = {m.label: {"library": m.library, "points": {}}
                                       for m in all_methods}
    for n_c in settings.iterations:
        fns, products = {"gradient": gradient}, {}
        for m in all_methods:
            if not m.sweeps and n_c != settings.iterations[0]:
                continue
            try:
                fns[m.label], products[m.label] = m.build(problem, n_c)
            except Exception as err:  # one failing method is recorded, the others still run
                rows[m.label]["points"][str(n_c)] = {"error": f"{type(err).__name__}: {err}"}
        times = paired_times(fns, settings.repeats, settings.warmup)
        grad_s = median(times["gradient"])
        for label, fn in fns.items():
            if label == "gradient":
                continue
            rows[label]["points"][str(n_c)] = {
                "relative_error": relative_error(fn(), problem.reference),
                "seconds": median(times[label]), "over_gradient": ratio(times, label, "gradient"),
                "products": products[label]}
        log(f"  {problem.name}: N_c = {n_c} done (gradient {grad_s * 1e3:.2f} ms)")
    compile_s = {m.label: {str(k[1]): v for k, v in m.build.compile_seconds.items()
                           if k[0] == problem.name}
                 for m in all_methods if hasattr(m.build, "compile_seconds")}
    return {"title": problem.title, "info": problem.info, "unknowns": problem.y.numel(),
            "outer_unknowns": problem.x.numel(), "hessian_eigenvalues": [lo, hi],
            "condition": hi / lo, "neumann_alpha": 1.0 / hi, "nystrom_delta": 0.5 * lo,
            "gradient_seconds": median(times["gradient"]),
            "exact": exact_check(problem), "methods": rows, "jax_compile_seconds": compile_s}


def run(settings: Settings, out: str | None, command: str, log: Any = print) -> dict[str, Any]:
    """Measure every problem and method; write ``external-cpu.{json,md,png}`` under ``out``."""
    start = time.perf_counter()
    status = peer_availability()
    all_methods = methods(status)
    problems = [quadratic_problem(settings.quadratic_dim, settings.quadratic_dim,
                                  settings.quadratic_samples), logistic_problem()]
    results = new_results(command, "cpu", settings)
    results.update(peer_status=status, problems={})
    for problem in problems:
        results["problems"][problem.name] = _measure_problem(problem, all_methods, settings, log)
    finish(results, start)
    if out is not None:
        stem = write_results(out, "external-cpu", results, render_markdown(results))
        plot(results, stem + ".png")
    return results


def _e(x: float) -> str:
    return f"{x:.1e}"


def render_markdown(results: dict[str, Any]) -> str:
    """The tables: per problem, relative error and time / gradient for each method and N_c."""
    s = results["settings"]
    lines = header("### External problems: hypergradient error and cost", results) + [
        f"- times: median over {s['repeats']} repeats, all methods of one N_c round-robin in "
        "one process after a warm-up; each cell is `relative error (time / one gradient of g)`",
        ""]
    lines += peer_table(results["peer_status"], note="note")
    for p in results["problems"].values():
        lo, hi = p["hessian_eigenvalues"]
        lines += ["", f"#### {p['title']}", "",
                  f"{p['unknowns']} inner / {p['outer_unknowns']} outer unknowns; eigenvalues of "
                  f"the inner Hessian in [{lo:.3g}, {hi:.3g}] (condition {p['condition']:.3g}); "
                  f"Neumann step 1/lambda_max = {p['neumann_alpha']:.3g}; Nystrom split "
                  f"delta = lambda_min/2 = {p['nystrom_delta']:.3g}; one gradient "
                  f"{p['gradient_seconds'] * 1e3:.2f} ms. Library against the closed form: "
                  + ", ".join(f"{k} {_e(v)}" for k, v in p["exact"].items()) + ".", ""]
        its = [str(n) for n in s["iterations"]]
        lines += table_head("method", *(f"N_c = {n}" for n in its))
        for label, method in p["methods"].items():
            cells = []
            for n in its:
                pt = method["points"].get(n)
                if pt is None:
                    cells.append("")
                elif "error" in pt:
                    cells.append("failed")
                else:
                    cells.append(f"{_e(pt['relative_error'])} ({pt['over_gradient']:.1f}x)")
            if not method["points"]:
                continue
            if len(method["points"]) == 1 and len(its) > 1:  # measured once (Dense)
                pt = method["points"][its[0]]
                cells = [f"{_e(pt['relative_error'])} ({pt['over_gradient']:.1f}x, "
                         f"{pt['products']:.0f} products)"] + [""] * (len(its) - 1)
            lines.append(row(label, *cells))
        failures = {label: pt["error"] for label, method in p["methods"].items()
                    for pt in method["points"].values() if "error" in pt}
        for label, err in failures.items():
            lines.append(f"\n{label} failed: `{err}`")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
    """Relative error against N_c (left) and against time per hypergradient (right), one row per
    problem, one line per method."""
    plt = pyplot()
    problems = results["problems"]
    fig, axes = plt.subplots(len(problems), 2, figsize=(12, 4.5 * len(problems)), squeeze=False)
    for (ax_n, ax_t), p in zip(axes, problems.values()):
        for label, method in p["methods"].items():
            pts = [(int(n), pt) for n, pt in method["points"].items() if "error" not in pt]
            if not pts:
                continue
            style = {"ours": "-", "torchopt": "--", "jaxopt": ":", "betty": "-."}[method["library"]]
            err = [max(pt["relative_error"], 1e-17) for _, pt in pts]
            sec = [pt["seconds"] * 1e3 for _, pt in pts]
            if len(pts) == 1:
                ax_n.axhline(err[0], color="k", lw=0.8, ls=style, label=label)
                ax_t.semilogy(sec, err, marker="*", ms=10, ls="none", color="k", label=label)
                continue
            (line,) = ax_n.semilogy([n for n, _ in pts], err, ls=style, marker="o", ms=3,
                                    label=label)
            ax_t.loglog(sec, err, ls=style, marker="o", ms=3, color=line.get_color())
        ax_n.set_xlabel("N_c (solver iterations)")
        ax_n.set_ylabel("relative error of the hypergradient")
        ax_t.set_xlabel("time per hypergradient (ms, median)")
        ax_n.set_title(p["title"], fontsize=8, loc="left")
        for ax in (ax_n, ax_t):
            ax.grid(True, which="both", alpha=0.3)
        ax_n.legend(fontsize=6.5, loc="lower left")
    save_figure(fig, path, 110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: ``--tiny``, ``--repeats``, ``--out``, ``--threads``."""
    p = parser(__doc__)
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds)")
    add_repeats(p, None, help="timing repeats (default 7)")
    add_out(p)
    add_threads(p, 1, help="torch intra-op threads (default 1, as JAX is given one)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    settings = Settings.tiny() if args.tiny else Settings()
    if args.repeats is not None:
        settings.repeats = args.repeats
    results = run(settings, args.out, command_line("external.py", argv))
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
