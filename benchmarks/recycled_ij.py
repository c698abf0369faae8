"""Recycled Krylov subspaces and Lanczos low-rank reuse over the right-hand sides of an alternation.

Usage::

    python benchmarks/recycled_ij.py --quick   # 2-core CPU: ~2,400 products, ~2 min idle
    python benchmarks/recycled_ij.py --full --damping 999.999   # more budgets, tolerance runs,
    python benchmarks/recycled_ij.py --full --damping 10        # a recycle_dim sweep; one μ a run
    python benchmarks/recycled_ij.py --damping 10 --tolerance 0.1 --tolerance-cap 120 \\
        --budgets 20 --methods minres,recycled-minres,minres-lanczos,recycled-minres-lanczos \\
        --name recycled_ij-mu10-tol-cpu   # products to a residual of 0.1 at μ = 10.001

One BiSSL alternation of the pretrained small ResNet of :mod:`benchmarks.robust_ij`
(:func:`benchmarks.pretrained.vision_network`: the vision recipe's network after its SimCLR and
head-warm-up stages): one lower batch, so one curvature operator and one matrix
``A = I + H/μ`` (exact Hessian), and ``N_U = 8`` right-hand sides ``v_i`` from 8 downstream
batches, at ``μ = λ + λ_damp`` = 1000 and 10.001 (λ = 0.001). Every method solves the 8 systems
in order with one solver object (so a recycled solver reuses what the earlier solves found):
CG, MINRES, :class:`~implicitbilevel.RecycledCG`, :class:`~implicitbilevel.RecycledMINRES`,
MINRES with a :class:`~implicitbilevel.LanczosPreconditioner`, RecycledMINRES seeded by a
:class:`~implicitbilevel.LanczosDeflation`, and the :class:`~implicitbilevel.LanczosSolver`
(Woodbury), each at ``N_c`` products per solve (``tol = 0``, the thesis's truncated solves) and,
in ``--full``, to a tolerance. Per solve: the products (``SolveInfo.iterations``), the relative
residual of the exact system (one more product, not counted), the error of ``u`` against the
converged float64 ``u*`` of :mod:`benchmarks.reference` (cached with :mod:`benchmarks.robust_ij`'s
key, so either script reuses the other's), breakdowns; per method the products of its
per-operator build (Lanczos) and the wall time of build + 8 solves.

Writes ``<out>/recycled_ij-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
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
    error_line,
    finish,
    fmt,
    header,
    mode_and_device,
    new_results,
    parser,
    quietly,
    relative_error,
    row,
    set_threads,
    short,
    table_head,
    write_results,
)
from benchmarks.pretrained import DEFAULT_CACHE, vision_network
from benchmarks.reference import cached_solutions, converged_solutions, flat, system_key
from benchmarks.robust_ij_methods import (
    LANCZOS_PRODUCTS,
    LANCZOS_RANK,
    RECYCLE_DIM,
    RECYCLE_WINDOW,
    net_problem,
    reuse_solver,
)
from benchmarks.toy_networks import toy_networks
from implicitbilevel import (
    LinearSolver,
    Params,
)

__all__ = ["METHODS", "Settings", "main", "render_markdown", "run"]

METHODS: dict[str, str] = {
    "cg": "CG",
    "minres": "MINRES",
    "recycled-cg": "RecycledCG",
    "recycled-minres": "RecycledMINRES",
    "minres-lanczos": "MINRES + LanczosPreconditioner",
    "recycled-minres-lanczos": "RecycledMINRES + LanczosDeflation",
    "lanczos-woodbury": "LanczosSolver (Woodbury)",
}


@dataclass
class Settings:
    """Sizes, budgets and ranks of one mode."""

    network: str = "vision"
    vision_epochs: int = 30
    lower_batch: int = 16
    upper_batch: int = 32
    upper_steps: int = 8
    lam: float = 0.001
    dampings: tuple[float, ...] = (999.999, 10.0)
    budgets: tuple[int, ...] = (5, 20)
    tolerance: float = 1e-5
    tolerance_cap: int = 30  # products per solve of the tolerance runs (0: none)
    tolerance_dampings: tuple[float, ...] = (999.999,)  # the μ that get tolerance runs
    recycle_dim: int = RECYCLE_DIM
    window: int = RECYCLE_WINDOW
    lanczos_rank: int = LANCZOS_RANK
    lanczos_products: int = LANCZOS_PRODUCTS
    sweep: tuple[int, ...] = ()  # recycle_dim values for RecycledMINRES at the largest budget
    methods: tuple[str, ...] = tuple(METHODS)
    reference_tol: float = 1e-8
    reference_max_products: int = 2400
    reference_cache: str | None = str(DEFAULT_CACHE / "references")

    @classmethod
    def for_mode(cls, mode: str) -> Settings:
        """``quick`` (2-core CPU), ``full`` or ``smoke`` (toy networks, for tests)."""
        if mode == "quick":
            return cls()
        if mode == "full":
            return cls(budgets=(5, 10, 20, 40), tolerance_cap=60, sweep=(4, 8, 16, 32),
                       tolerance_dampings=(999.999, 10.0))
        if mode == "smoke":
            return cls(network="toy", upper_steps=3, budgets=(4,), tolerance_cap=20, sweep=(2,),
                       tolerance_dampings=(999.999, 10.0),
                       recycle_dim=2, window=4, lanczos_rank=2, lanczos_products=6,
                       reference_max_products=400, reference_cache=None)
        raise ValueError(f"unknown mode {mode!r}")


def solver_for(key: str, n_c: int, tol: float, s: Settings, recycle_dim: int | None = None
               ) -> LinearSolver:
    """The solver of method ``key`` at ``N_c = n_c`` products per solve and tolerance ``tol``
    (:func:`benchmarks.robust_ij_methods.reuse_solver` with this run's settings)."""
    return reuse_solver(key, n_c, tol, window=s.window, lanczos_rank=s.lanczos_rank,
                        lanczos_products=s.lanczos_products,
                        recycle_dim=s.recycle_dim if recycle_dim is None else recycle_dim)


def _rhs(problem: Any, upper: Params, lower: Params, batch: Any, names: list[str]) -> Params:
    """``v = ∇_θP f`` of the BiSSL upper loss on ``batch`` (as ``upper_grad`` forms it)."""
    leaves = {n: lower[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad():
        loss = problem.upper_loss({n: p.detach() for n, p in upper.items()},
                                  {**lower, **leaves}, batch)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(leaves[n])).detach()
            for n, g in zip(names, grads)}


def measure_mu(net: Any, net64: Any, mu: float, s: Settings, device: str,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Every method on the ``N_U`` systems of one alternation of ``net`` at ``μ``."""
    started = time.perf_counter()
    problem = net_problem(net, mu, s.lam, "hessian")
    operator = problem.lower_hessian(net.upper, net.lower, net.lower_batch)
    names = list(operator.names)
    system = problem.system(net.upper, net.lower, operator, mu)
    rhs = [_rhs(problem, net.upper, net.lower, b, names) for b in net.upper_batches]
    rhs_flat = torch.stack([flat(v, names) for v in rhs]).double()
    key = system_key(net.lower, net.lower_batch, rhs_flat, net.name, mu, s.lam, s.reference_tol,
                     s.reference_max_products, device_type(device))
    u_star, reference = cached_solutions(
        s.reference_cache, key, lambda: converged_solutions(
            net_problem(net64, mu, s.lam, "hessian"), net64.upper, net64.lower,
            net64.lower_batch, names, mu, rhs_flat, s.reference_tol, s.reference_max_products),
        log, f"[{net.name}, mu = {mu:g}]")
    u_star = u_star.to(rhs_flat.device)

    def configuration(key: str, n_c: int, tol: float, recycle_dim: int | None = None
                      ) -> dict[str, Any]:
        solver = solver_for(key, n_c, tol, s, recycle_dim)
        row_: dict[str, Any] = {"method": key, "label": METHODS[key], "n_c": n_c, "tol": tol,
                                "recycle_dim": recycle_dim, "solves": []}
        t0, before = time.perf_counter(), system.products
        try:
            row_["build_seconds"] = solver.prepare(system)
            row_["build_products"] = system.products - before
            for i, v in enumerate(rhs):
                u, info = quietly(lambda v=v: solver(system, v))
                residual = {n: a - b for (n, a), b in zip(v.items(), system(u).values())}
                stats = getattr(solver, "last_stats", None)
                row_["solves"].append({
                    "products": info.iterations, "breakdown": info.breakdown,
                    "residual": float(flat(residual, names).double().norm())
                    / float(rhs_flat[i].norm()),
                    "error": relative_error(flat(u, names), u_star[i]),
                    "solver_residual": info.relative_residual,
                    "galerkin_residual": None if stats is None else stats.galerkin_residual,
                    "deflated": None if stats is None else stats.deflated})
        except Exception as err:  # a refusal (Woodbury at an indefinite A) is a result
            row_["error"] = error_line(err)
        row_["seconds"] = time.perf_counter() - t0
        return _summarise(row_)

    rows = []
    log(f"  [{net.name}, mu = {mu:g}] {len(rhs)} right-hand sides, {len(names)} tensors")
    for key in s.methods:
        budgets = (0,) if key == "lanczos-woodbury" else s.budgets
        for n_c in budgets:
            rows.append(configuration(key, n_c, 0.0))
        if s.tolerance_cap and key != "lanczos-woodbury" and any(
                abs(mu - s.lam - d) < 1e-9 for d in s.tolerance_dampings):
            rows.append(configuration(key, s.tolerance_cap, s.tolerance))
        log(f"    {METHODS[key]} done ({time.perf_counter() - started:.0f} s)")
    sweep = [configuration("recycled-minres", max(s.budgets), 0.0, k) for k in s.sweep]
    return {"network": net.name, "mu": mu, "lam": s.lam, "unknowns": int(u_star.shape[1]),
            "reference": {k: v for k, v in reference.items() if k != "history"},
            "rows": rows, "sweep": sweep, "seconds": time.perf_counter() - started}


def _summarise(r: dict[str, Any]) -> dict[str, Any]:
    solves = r["solves"]
    if not solves:
        return r
    products = [x["products"] for x in solves]
    errors = [x["error"] for x in solves]
    residuals = [x["residual"] for x in solves]
    r.update(products_mean=statistics.fmean(products), products_first=products[0],
             products_later=statistics.fmean(products[1:]) if len(products) > 1 else None,
             error_median=statistics.median(errors), error_max=max(errors),
             residual_median=statistics.median(residuals), residual_max=max(residuals),
             breakdowns=sum(x["breakdown"] is not None for x in solves))
    galerkin = [x["galerkin_residual"] for x in solves[1:] if x["galerkin_residual"] is not None]
    r["galerkin_later_median"] = statistics.median(galerkin) if galerkin else None
    return r


def run(mode: str, device: str, out: str | None, command: str,
        log: Callable[[str], None] = print, settings: Settings | None = None,
        name: str | None = None) -> dict[str, Any]:
    """Every measurement of ``mode`` on ``device``; JSON and Markdown go to ``out`` as
    ``<name>.json`` and ``.md`` (default ``recycled_ij-<device>``)."""
    s = settings or Settings.for_mode(mode)
    started = time.perf_counter()
    results = new_results(command, device, s, mode)
    if s.network == "toy":
        net = toy_networks(device, upper_steps=s.upper_steps)[0]
    else:
        net = vision_network(epochs=s.vision_epochs, lower_batch=s.lower_batch,
                             upper_batch=s.upper_batch, upper_steps=s.upper_steps,
                             device=device, log=log)
    results["network"] = {"name": net.name, "note": net.note, "unknowns": net.unknowns}
    net64 = net.to(dtype=torch.float64)
    systems = []
    for damping in s.dampings:
        mu = s.lam + damping
        try:
            systems.append(measure_mu(net, net64, mu, s, device, log))
        except Exception as err:
            traceback.print_exc()
            systems.append({"network": net.name, "mu": mu, "error": error_line(err), "rows": []})
    results["systems"] = systems
    finish(results, started)
    if out is not None:
        write_results(out, name or f"recycled_ij-{device_type(device)}", results,
                      render_markdown(results))
    return results


def _cells(r: dict[str, Any]) -> list[Any]:
    if "error" in r:
        return [r["label"], _budget(r), "-", "-", "-", "-", "-", "-",
                "refused: " + short(r["error"], 110)]
    later = "" if r["products_later"] is None else f" ({r['products_first']} → " \
        f"{fmt(r['products_later'], 1)})"
    return [r["label"], _budget(r), fmt(r["products_mean"], 1) + later, r["build_products"],
            f"{fmt(r['residual_median'])}, {fmt(r['residual_max'])}",
            f"{fmt(r['error_median'])}, {fmt(r['error_max'])}", fmt(r["galerkin_later_median"]),
            fmt(r["seconds"], 1), f"{r['breakdowns']}/{len(r['solves'])}"]


def _budget(r: dict[str, Any]) -> str:
    if r["method"] == "lanczos-woodbury":
        return "direct"
    return f"N_c = {r['n_c']}" if r["tol"] == 0 else f"tol {r['tol']:g}, <= {r['n_c']}"


def render_markdown(results: dict[str, Any]) -> str:
    """The report: per μ one table of every method and budget, then the recycle_dim sweep."""
    s = results["settings"]
    lines = header(f"## Recycled Krylov and Lanczos reuse over one alternation: `{results['mode']}`"
                   f" on {results['machine']['device']}", results)
    lines += [f"- network: **{results['network']['name']}**: {results['network']['note']}; "
              f"{results['network']['unknowns']} unknowns",
              f"- one operator, N_U = {s['upper_steps']} right-hand sides solved in order by one "
              f"solver object; recycle_dim = {s['recycle_dim']}, window = {s['window']}; Lanczos "
              f"rank {s['lanczos_rank']} from {s['lanczos_products']} products (built once per "
              "operator, column 'build products')", ""]
    cols = ("method", "budget", "products per solve (first → later)", "build products",
            "rel. residual exact system (median, max)", "rel. error u vs u* (median, max)",
            "Galerkin residual (later, median)", "seconds (build + 8 solves)", "breakdowns")
    for system in results["systems"]:
        lines += [f"### mu = {system['mu']:g}", ""]
        if "error" in system:
            lines += [f"failed: {system['error']}", ""]
            continue
        ref = system["reference"]
        lines += [f"{system['unknowns']} unknowns; u*: {ref['products']} float64 products, max "
                  f"relative residual {ref['relative_residual_max']:.1e}; median "
                  f"‖u* − v‖/‖v‖ = {ref['u_star_minus_v_over_v']:.3g}.", ""]
        lines += table_head(*cols)
        lines += [row(*_cells(r)) for r in system["rows"]]
        if system["sweep"]:
            lines += ["", f"RecycledMINRES at N_c = {max(s['budgets'])}, by recycle_dim:", ""]
            lines += table_head("recycle_dim", "products per solve", "rel. residual (median)",
                                "rel. error u (median)", "seconds")
            lines += [row(r["recycle_dim"], fmt(r.get("products_mean"), 1),
                          fmt(r.get("residual_median")), fmt(r.get("error_median")),
                          fmt(r["seconds"], 1)) for r in system["sweep"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: ``--quick`` (default) / ``--full``, ``--device``, ``--out``."""
    p = parser(__doc__)
    add_modes(p, quick="2-core CPU: N_c 5 and 20 (the default)",
              full="N_c 5-40, tolerance runs at both mu, a recycle_dim sweep")
    add_device(p)
    add_out(p)
    add_threads(p)
    p.add_argument("--damping", type=float, action="append", default=None,
                   help="only this λ_damp (repeatable; μ = 0.001 + λ_damp; default: 999.999 "
                   "and 10), to keep one run short")
    p.add_argument("--name", default=None, help="results file stem (default recycled_ij-<device>)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="relative residual of the tolerance runs (default 1e-5), run at every "
                   "--damping given")
    p.add_argument("--tolerance-cap", type=int, default=None,
                   help="products per solve of the tolerance runs")
    p.add_argument("--budgets", default=None, help="N_c values, comma-separated")
    p.add_argument("--methods", default=None,
                   help=f"a comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--recycle-dim", type=int, default=None,
                   help="harmonic Ritz vectors kept by the recycled solvers (default 16)")
    p.add_argument("--window", type=int, default=None,
                   help="Krylov vectors per recycle-space update (default 20)")
    args = p.parse_args(argv)
    mode, device = mode_and_device(args)
    set_threads(args.threads, device, mode)
    settings = Settings.for_mode(mode)
    if args.damping:
        settings.dampings = tuple(args.damping)
    if args.tolerance is not None:
        settings.tolerance = args.tolerance
        settings.tolerance_dampings = settings.dampings
    if args.tolerance_cap is not None:
        settings.tolerance_cap = args.tolerance_cap
    if args.recycle_dim is not None:
        settings.recycle_dim = args.recycle_dim
    if args.window is not None:
        settings.window = args.window
    if args.budgets:
        settings.budgets = tuple(int(x) for x in args.budgets.split(","))
    if args.methods:
        unknown = set(args.methods.split(",")) - set(METHODS)
        if unknown:
            p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
        settings.methods = tuple(args.methods.split(","))
    results = run(mode, device, args.out, command_line("recycled_ij.py", argv),
                  log=lambda msg: print(msg, flush=True), settings=settings, name=args.name)
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
