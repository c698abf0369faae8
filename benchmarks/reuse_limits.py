"""What reusing the matrix of an alternation can save at most: spectrum, Krylov floor, cost bound.

Usage::

    python benchmarks/reuse_limits.py --arch resnet18 --batch 64   # random-init ResNet-18
    python benchmarks/reuse_limits.py --arch vision --batch 16     # the pretrained small ResNet

The alternation of :mod:`benchmarks.recycled_upper_step` (same workloads, same ``μ``, same
``N_U`` right-hand sides, same accuracy target ``tol``: the smallest relative residual the
original BiSSL scheme reaches at ``N_c = 5``). Recycling, deflation and a reused preconditioner
can only save products where ``A = I + H/μ`` has structure that survives from one solve to the
next: isolated eigenvalues (a low-rank part) or a per-tensor scale. Measured:

1. **Spectrum.** The ``--top`` largest and ``--bottom`` smallest eigenvalues of ``H`` by scipy's
   ``eigsh`` (ARPACK, implicitly restarted Lanczos: converged eigenvalues, not Ritz bounds) over
   the kept-graph curvature product, hence the ends of ``A``'s spectrum and ``κ(A)``.
2. **Deflation bound.** Removing the ``r`` eigenvalues at each end (what an ideal recycle space or
   Lanczos deflation of ``2r`` vectors does) leaves ``κ_r``; CG's convergence factor is
   ``ρ_r = (√κ_r − 1)/(√κ_r + 1)`` (``A`` positive definite). ``ρ_0`` is compared with the
   factor CG shows.
3. **Per-tensor scales.** ``c_l``, the mean diagonal of ``H`` over tensor ``l`` (Hutchinson with
   ``--probes`` Rademacher vectors): a per-tensor (Jacobi-type) preconditioner is
   ``diag(1 + c_l/μ)``; its range says whether it can change anything.
4. **Krylov floor.** The relative residual after ``k = 1 … --max-products`` products of CG and of
   MINRES on the first upper step's right-hand side. MINRES minimises the residual over the Krylov
   space, so ``k_min`` (its first ``k`` with residual ``≤ tol``) is the fewest products any
   method needs that draws on that space alone.
5. **Shared right-hand sides.** ``‖v_i − P_i v_i‖/‖v_i‖``, ``P_i`` the projector onto the span of
   the earlier right-hand sides: what a space of earlier right-hand sides or solutions (whose
   images ``A u_j ≈ v_j`` are known without a product) leaves of each later one.
6. **Cost bound.** Seconds of one kept-graph product ``t_p``, of an upper step without products
   ``t_0`` (its gradients; :meth:`~implicitbilevel.BilevelProblem.upper_grad` with 0 products) and
   of the original scheme's step ``t_orig`` (round-robin, median over ``--repeats``). A step with
   ``k`` products costs at least ``(t_0 + k t_p)/t_orig`` of the original; the table gives it for
   ``k_min`` and for the products that would meet a target ratio.

Writes ``<out>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from benchmarks.harness import (
    add_out,
    add_threads,
    command_line,
    finish,
    fmt,
    header,
    new_results,
    paired_times,
    parser,
    quietly,
    row,
    seeded,
    set_threads,
    table_head,
    write_results,
)
from benchmarks.recycled_upper_step import Settings as StepSettings
from benchmarks.recycled_upper_step import alternation_workload
from benchmarks.reference import flat, reference_upper_step, relative_residual
from implicitbilevel import CG, MINRES
from implicitbilevel.tree import tree_unflatten

__all__ = ["Settings", "deflation_factor", "main", "render_markdown", "run"]


@dataclass
class Settings:
    """Workload (as in :mod:`benchmarks.recycled_upper_step`) and measurement sizes."""

    arch: str = "resnet18"
    batch: int = 16
    mu: float = 1000.0
    upper_steps: int = 8
    n_c: int = 5
    max_products: int = 8
    top: int = 13
    bottom: int = 7
    eig_tol: float = 1e-3
    probes: int = 4
    repeats: int = 3
    target_ratio: float = 0.5


def deflation_factor(largest: list[float], smallest: list[float], mu: float, r: int) -> dict:
    """``κ_r`` and CG's factor ``ρ_r`` of ``I + H/μ`` with the ``r`` eigenvalues at each end
    removed (``largest`` descending, ``smallest`` ascending; both longer than ``r``)."""
    hi, lo = 1.0 + largest[r] / mu, 1.0 + smallest[r] / mu
    if lo <= 0:
        return {"r": r, "a_min": lo, "a_max": hi, "kappa": math.inf, "rho": math.nan}
    kappa = hi / lo
    return {"r": r, "a_min": lo, "a_max": hi, "kappa": kappa,
            "rho": (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)}


def earlier_span_residuals(rhs: list[torch.Tensor]) -> list[float]:
    """``‖v_i − P_i v_i‖/‖v_i‖`` for ``i ≥ 1``, ``P_i`` the orthogonal projector onto
    ``span(v_0 … v_{i−1})``: how much of each right-hand side no earlier one (nor, as
    ``A u_j ≈ v_j``, any combination of earlier solutions) accounts for."""
    out = []
    for i in range(1, len(rhs)):
        u, sv, _ = torch.linalg.svd(torch.stack(rhs[:i], 1).double(), full_matrices=False)
        q = u[:, sv > sv[0] * 1e-12]  # an orthonormal basis of the span, dependent ones dropped
        vi = rhs[i].double()
        out.append(float((vi - q @ (q.T @ vi)).norm() / vi.norm()))
    return out


def _spectrum(product: Callable[[torch.Tensor], torch.Tensor], n: int, s: Settings) -> dict:
    from scipy.sparse.linalg import LinearOperator, eigsh

    if not (1 <= s.top < n - 1 and 1 <= s.bottom < n - 1):
        raise ValueError(f"--top {s.top} and --bottom {s.bottom} must lie in [1, {n - 2}]: eigsh "
                         f"finds fewer than n - 1 eigenvalues of an operator with n = {n} unknowns")
    calls = [0]

    def matvec(x: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return product(torch.from_numpy(np.asarray(x, dtype=np.float32).ravel())).double().numpy()

    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = torch.randn(n, generator=seeded(0)).double().numpy()
    out = {}
    for which, k, key in (("LA", s.top, "largest"), ("SA", s.bottom, "smallest")):
        vals = eigsh(op, k=k, which=which, tol=s.eig_tol, v0=v0, ncv=max(2 * k + 1, 30),
                     return_eigenvectors=False)
        out[key] = sorted(float(x) for x in vals)[::-1 if key == "largest" else 1]
    out["products"] = calls[0]
    return out


def run(s: Settings, out: str | None, command: str, name: str,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """The measurement (module docstring); JSON and Markdown go to ``out``."""
    started = time.perf_counter()
    results = new_results(command, "cpu", s)
    wl = alternation_workload(StepSettings(arch=s.arch, batch=s.batch, mu=s.mu,
                                           upper_steps=s.upper_steps, n_c=s.n_c), log)
    names = wl["names"]
    problem = wl["problem"](CG(max_iter=s.n_c, tol=1e-12))
    hessian = problem.lower_hessian(wl["upper"], wl["lower"], wl["lower_batch"])
    system = problem.system(wl["upper"], wl["lower"], hessian, s.mu)
    like = {n: wl["lower"][n] for n in names}  # in the order of ``names``, as ``flat`` is
    n_unknowns = sum(t.numel() for t in like.values())

    def curvature(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return flat(system.curvature_product(tree_unflatten(x, like)), names)

    # 1-2. spectrum and deflation
    log(f"[{wl['name']}] eigenvalues of H (eigsh, tol {s.eig_tol:g})")
    spectrum = _spectrum(curvature, n_unknowns, s)
    r_max = min(s.top, s.bottom) - 1  # deflating r at each end needs the (r + 1)-th of both
    rs = sorted({0, r_max // 2, r_max})
    deflation = [deflation_factor(spectrum["largest"], spectrum["smallest"], s.mu, r) for r in rs]
    log(f"  largest {[fmt(x, 4) for x in spectrum['largest']]}; smallest "
        f"{[fmt(x, 4) for x in spectrum['smallest']]} ({spectrum['products']} products)")

    # 3. per-tensor scales
    gen = seeded(1)
    means = dict.fromkeys(names, 0.0)
    for _ in range(s.probes):
        z = torch.randint(0, 2, (n_unknowns,), generator=gen).float() * 2 - 1
        hz = tree_unflatten(z * curvature(z), like)
        for n in names:
            means[n] += float(hz[n].mean()) / s.probes
    scales = [1.0 + c / s.mu for c in means.values()]

    # 4. the target and the Krylov floor on the first right-hand side
    originals = [reference_upper_step(x, max_iter=s.n_c) for x in wl["steps"]]
    original_residuals = [relative_residual(system, r.u, r.v, names) for r in originals]
    tol = min(original_residuals)
    v = originals[0].v
    # 5. how much the right-hand sides share
    overlap = earlier_span_residuals([flat(r.v, names) for r in originals])
    history: dict[str, list[float]] = {"CG": [], "MINRES": []}
    for k in range(1, s.max_products + 1):
        for key, cls in (("CG", CG), ("MINRES", MINRES)):
            u, _ = quietly(lambda cls=cls, k=k: cls(max_iter=k, tol=1e-12)(system, v))
            history[key].append(relative_residual(system, u, v, names))
    k_min = next((k for k, r in enumerate(history["MINRES"], 1) if r <= tol), None)
    cg = history["CG"]
    observed = statistics.median(b / a for a, b in zip(cg[:s.n_c], cg[1:s.n_c]))
    log(f"  tol {tol:.3g}; MINRES reaches it at k = {k_min}; CG factor {observed:.3g} "
        f"(bound rho_0 = {deflation[0]['rho']:.3g})")

    # 6. seconds
    zero = wl["problem"](CG(max_iter=0, tol=1e-12))
    probe = {n: torch.randn(like[n].shape, generator=gen) for n in names}
    times = paired_times({
        "product": lambda: system(probe),
        "upper_grad_0": lambda: quietly(lambda: zero.upper_grad(
            wl["upper"], wl["lower"], wl["upper_batches"][0], lower_hessian=hessian)),
        "original": lambda: reference_upper_step(wl["steps"][0], max_iter=s.n_c),
    }, s.repeats)
    t = {k: statistics.median(x) for k, x in times.items()}
    floor = None if k_min is None else (t["upper_grad_0"] + k_min * t["product"]) / t["original"]
    affordable = (s.target_ratio * t["original"] - t["upper_grad_0"]) / t["product"]
    results.update(
        workload={"name": wl["name"], "note": wl["note"], "unknowns": n_unknowns},
        spectrum=spectrum, deflation=deflation, observed_cg_factor=observed,
        per_tensor={"min": min(scales), "max": max(scales), "tensors": len(scales)},
        tol=tol, original_residuals=original_residuals, history=history, k_min=k_min,
        rhs_outside_earlier=overlap,
        seconds=t, times=times, ratio_floor=floor, affordable_products=affordable)
    finish(results, started)
    if out is not None:
        write_results(out, name, results, render_markdown(results))
    return results


def render_markdown(results: dict[str, Any]) -> str:
    """The spectrum, deflation, per-tensor, Krylov-floor and cost tables."""
    s, sp, t = results["settings"], results["spectrum"], results["seconds"]
    pt = results["per_tensor"]
    lines = header("## What reusing one alternation's matrix can save at most (cpu)", results)
    lines += [f"- workload: **{results['workload']['name']}**: {results['workload']['note']}; "
              f"{results['workload']['unknowns']} unknowns; A = I + H/mu, mu = {s['mu']:g}",
              f"- accuracy target: tol = {results['tol']:.3g}, the smallest relative residual of "
              f"the original scheme's {s['upper_steps']} solves at N_c = {s['n_c']}",
              f"- eigenvalues of H (scipy eigsh, tol {s['eig_tol']:g}, {sp['products']} "
              f"products): largest {', '.join(fmt(x, 4) for x in sp['largest'])}; smallest "
              f"{', '.join(fmt(x, 4) for x in sp['smallest'])}",
              f"- per-tensor mean curvature (Hutchinson, {s['probes']} probes): the scales "
              f"1 + c_l/mu of a per-tensor preconditioner lie in [{pt['min']:.5f}, "
              f"{pt['max']:.5f}] over {pt['tensors']} tensors", "",
              "### Deflating r eigenvalues at each end", ""]
    lines += table_head("r", "spectrum of the deflated A", "kappa", "CG factor rho_r")
    for d in results["deflation"]:
        lines.append(row(d["r"], f"[{d['a_min']:.4f}, {d['a_max']:.4f}]", fmt(d["kappa"], 4),
                         fmt(d["rho"], 3)))
    lines += ["", f"CG's measured factor per product (median of its first {s['n_c']} residual "
              f"ratios): "
              f"{results['observed_cg_factor']:.3g}", "",
              "### Relative residual after k products, first right-hand side", ""]
    ks = range(1, len(results["history"]["CG"]) + 1)
    lines += table_head("method", *(f"k = {k}" for k in ks))
    for key, hist in results["history"].items():
        lines.append(row(key, *(fmt(x) for x in hist)))
    k_min = results["k_min"]
    outside = results["rhs_outside_earlier"]
    lines += ["", f"MINRES (least residual over the Krylov space) first reaches tol at k = "
              f"{k_min if k_min is not None else '>' + str(len(ks))}.", "",
              f"Share of each later right-hand side outside the span of the earlier ones "
              f"(‖v_i − P v_i‖/‖v_i‖, i = 2 … {len(outside) + 1}): "
              f"{', '.join(fmt(x, 4) for x in outside)}; a recycle space built from earlier "
              "right-hand sides or solutions starts each solve from at least that residual.", "",
              "### Cost bound (seconds, median over round-robin repeats)", ""]
    lines += table_head("one kept-graph product t_p", "upper step without products t_0",
                        "original scheme's step t_orig", "floor (t_0 + k_min t_p)/t_orig",
                        f"products affordable at {s['target_ratio']:g}x the original")
    lines.append(row(fmt(t["product"]), fmt(t["upper_grad_0"]), fmt(t["original"]),
                     fmt(results["ratio_floor"]), fmt(results["affordable_products"], 3)))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line (module docstring)."""
    p = parser(__doc__)
    add_out(p)
    add_threads(p, default=1)
    p.add_argument("--arch", default="resnet18", help="resnet18, vision or tiny-cnn (smoke test)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mu", type=float, default=1000.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=13)
    p.add_argument("--bottom", type=int, default=7)
    p.add_argument("--name", default="reuse_limits-cpu")
    args = p.parse_args(argv)
    set_threads(args.threads, "cpu")
    s = Settings(arch=args.arch, batch=args.batch, mu=args.mu, repeats=args.repeats,
                 top=args.top, bottom=args.bottom)
    results = run(s, args.out, command_line("reuse_limits.py", argv), args.name,
                  log=lambda msg: print(msg, flush=True))
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
