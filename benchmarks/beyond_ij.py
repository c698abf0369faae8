"""Cost and accuracy of the Sec. 9.1 / appendix G implicit-Jacobian variants on the pretrained
small ResNet of the vision recipe (the network of ``benchmarks/robust_ij.py``).

Per ``μ = λ + λ_damp`` (λ = 0.001) and one alternation (one lower batch, ``N_U`` upper batches):

- **full IJ**: MINRES with ``N_c`` products over the whole backbone;
- **BN-only IJ** (``ij_subset`` = the BatchNorm affine parameters, :mod:`implicitbilevel.subset`),
  with ``u = v`` (identity) and ``u = 0`` (zero) outside, MINRES with ``N_c`` products;
- **appendix G** (:mod:`recipes.common.appendix_g`), MINRES with ``N_c`` products over
  ω = (θ_P, φ_P), μ_G = 0.001;
- **M-FAC** (:class:`implicitbilevel.MFAC`, m = 20): the empirical Fisher of 20 pretext-loss
  gradients at the lower point, each on a random half of the lower batch (in the recipes the
  window holds the gradients of the last 20 lower-level steps); no curvature product, no kept
  graph; the window's gradients are taken before the timer starts, as the trainer takes them in
  the lower stage.

Cost: (curvature build + ``N_U`` upper steps) / ``N_U`` over one downstream gradient. Accuracy:
the median over the upper batches of ``‖g − g*‖/‖g*‖`` for the backbone hypergradient ``g`` and of
``‖u − u*‖/‖u*‖`` over the backbone, ``u*`` and ``g*`` from the full IJ solved by MINRES to a
relative residual of 1e-6 (the converged full IJ). Results: ``results/beyond_ij-cpu.{json,md}``.

Run: ``python benchmarks/beyond_ij.py --epochs 30`` (the SimCLR stage is cached under
``runs/robust_ij/``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

from benchmarks.harness import (
    add_out,
    add_threads,
    median,
    paired_times,
    parser,
    row,
    set_threads,
    table_head,
    write_results,
)
from benchmarks.pretrained import vision_network
from benchmarks.workloads import bissl_problem
from implicitbilevel import MFAC, MINRES, BilevelProblem, ImplicitJacobian
from implicitbilevel.tree import tree_norm, tree_sub
from recipes.common.appendix_g import appendix_g_parts

LAM = 0.001


def _bn_names(model: nn.Module, backbone: list[str]) -> list[str]:
    owned = {f"{m}.{p}" for m, sub in model.named_modules()
             if isinstance(sub, nn.modules.batchnorm._NormBase) for p, _ in sub.named_parameters()}
    return [n for n in backbone if n in owned]


def _problem(net: Any, mu: float, solver: Any, **kw: Any) -> BilevelProblem:
    return bissl_problem(net.downstream_loss, net.pretext_loss, net.backbone, mu, LAM, solver,
                         **kw)


def _alternation(problem: BilevelProblem, net: Any) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    hessian = problem.lower_hessian(net.upper, net.lower, net.lower_batch)
    outs = [problem.upper_grad(net.upper, net.lower, b, lower_hessian=hessian)
            for b in net.upper_batches]
    return (time.perf_counter() - start) / len(outs), outs


def _mfac_problem(net: Any, mu: float, m: int = 20) -> BilevelProblem:
    """M-FAC with a window of ``m`` pretext gradients on random halves of the lower batch."""
    problem = _problem(net, mu, MFAC(m=m), reuse_graph=False)
    size = net.lower_batch[0].shape[0]
    g = torch.Generator().manual_seed(0)
    for _ in range(m):
        idx = torch.randperm(size, generator=g)[: size // 2]
        half = tuple(t[idx] for t in net.lower_batch)
        problem.observe_lower_gradient(net.upper, net.lower,
                                       problem.lower_grad(net.upper, net.lower, half))
    return problem


def _gradient_seconds(net: Any, repeats: int = 5) -> float:
    params = {n: p.detach().requires_grad_(True) for n, p in net.upper.items()}

    def gradient() -> Any:
        return torch.autograd.grad(net.downstream_loss(params, net.upper_batches[0]),
                                   list(params.values()))

    return median(paired_times({"gradient": gradient}, repeats, warmup=0)["gradient"])


def run(epochs: int, upper_steps: int, n_c: int, mus: list[float]) -> dict[str, Any]:
    """Measure every row; returns the results dict."""
    net = vision_network(epochs=epochs, lower_batch=16, upper_batch=32, upper_steps=upper_steps)
    _gradient_seconds(net)  # warm-up
    bn = _bn_names(net.pretext, net.backbone)
    head = [n for n in net.lower if n not in set(net.backbone)]
    rows = []
    for mu in mus:
        _, ref = _alternation(_problem(net, mu, MINRES(max_iter=400, tol=1e-6)), net)
        g_ref = [{n: o.grads[n] for n in net.backbone} for o in ref]
        u_ref = [{n: o.u[n] for n in net.backbone} for o in ref]
        configs = {
            "full IJ, MINRES": _problem(net, mu, MINRES(max_iter=n_c)),
            "BN-only IJ (u = v outside), MINRES": _problem(net, mu, MINRES(max_iter=n_c),
                                                           ij_subset=bn, ij_outside="identity"),
            "BN-only IJ (u = 0 outside), MINRES": _problem(net, mu, MINRES(max_iter=n_c),
                                                           ij_subset=bn, ij_outside="zero"),
        }
        upper_g, reg_g = appendix_g_parts(net.downstream_loss, net.pretext_loss, net.backbone,
                                          head, LAM, 1e-3)
        configs["appendix G, MINRES over ω"] = BilevelProblem(
            upper_g, net.pretext_loss, lam=LAM, regularizer=reg_g,
            ij=ImplicitJacobian(MINRES(max_iter=n_c), damping=mu - LAM, solve_over="all",
                                on_breakdown="ignore"))
        configs["M-FAC (m = 20), no Hessian product"] = _mfac_problem(net, mu)
        for label, problem in configs.items():
            _alternation(problem, net)  # warm-up
            seconds, outs = _alternation(problem, net)
            grad_s = _gradient_seconds(net)  # next to the step, so both see the same load
            entry = {"mu": mu, "method": label, "n_c": 0 if label.startswith("M-FAC") else n_c,
                   "seconds": seconds,
                   "cost": seconds / grad_s, "gradient_seconds": grad_s,
                   "unknowns": sum(net.lower[n].numel() for n in outs[0].u)}
            if not label.startswith("appendix G"):  # appendix G is another problem: no u*, g*
                entry["g_error"] = median(
                    float(tree_norm(tree_sub({n: o.grads[n] for n in net.backbone}, g))
                          / tree_norm(g)) for o, g in zip(outs, g_ref))
                outside = "zero" if "u = 0" in label else "identity"
                u_err = []
                for o, r, u_star in zip(outs, ref, u_ref):  # r.rhs: v over the whole backbone
                    u = {n: o.u[n] if n in o.u else
                         (r.rhs[n] if outside == "identity" else torch.zeros_like(r.rhs[n]))
                         for n in net.backbone}
                    u_err.append(float(tree_norm(tree_sub(u, u_star)) / tree_norm(u_star)))
                entry["u_error"] = median(u_err)
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    return {"epochs": epochs, "upper_steps": upper_steps, "bn_unknowns":
            sum(net.lower[n].numel() for n in bn), "backbone_unknowns": net.unknowns,
            "threads": torch.get_num_threads(), "rows": rows}


def render_markdown(results: dict[str, Any]) -> str:
    """The Markdown table."""
    lines = [
        "## Beyond the thesis: BN-only IJ, appendix G and M-FAC on the pretrained small ResNet "
        "(cpu)",
        "",
        f"- command: `python benchmarks/beyond_ij.py --epochs {results['epochs']}`",
        f"- {results['backbone_unknowns']} backbone unknowns, {results['bn_unknowns']} BatchNorm "
        f"affine; λ = {LAM}; {results['upper_steps']} upper steps; "
        f"{results['threads']} torch threads; cost = seconds per upper step (curvature build "
        "included) over one downstream gradient timed right after it",
        "- errors against the full IJ solved by MINRES to relative residual 1e-6; appendix G "
        "solves another problem, so only its cost is comparable",
        "",
        *table_head("μ", "method", "N_c", "unknowns", "s / upper step", "cost / gradient",
                    "rel. error g (median)", "rel. error u (median)"),
    ]
    for r in results["rows"]:
        u = f"{r['u_error']:.3g}" if "u_error" in r else "—"
        g = f"{r['g_error']:.3g}" if "g_error" in r else "—"
        lines.append(row(f"{r['mu']:g}", r["method"], r["n_c"], r["unknowns"],
                         f"{r['seconds']:.3f}", f"{r['cost']:.2f}", g, u))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: run, write JSON and Markdown to ``--out``."""
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=30, help="SimCLR epochs of the network")
    p.add_argument("--upper-steps", type=int, default=4, help="N_U upper batches")
    p.add_argument("--nc", type=int, default=5, help="N_c products per solve")
    p.add_argument("--mu", type=float, nargs="+", default=[10.001, 1000.0])
    add_out(p)
    add_threads(p, help="torch intra-op CPU threads (default: torch's)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    results = run(args.epochs, args.upper_steps, args.nc, args.mu)
    write_results(args.out, "beyond_ij-cpu", results, render_markdown(results))
    return results


if __name__ == "__main__":
    main()
