"""One network at one ``μ`` of :mod:`benchmarks.robust_ij`: every method on the ``N_U`` IJ systems
of one alternation, for accuracy against ``u*`` (:mod:`benchmarks.reference`) and for cost.

:func:`measure_system` runs two passes. The accuracy pass solves the ``N_U`` systems with every
configuration (the operators shared, as in an alternation; a solve that stopped before its budget
is reused by the larger budgets); the timing pass runs every working configuration's build and
upper step round-robin with one downstream gradient (:func:`benchmarks.harness.paired_times`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from implicitbilevel import BilevelProblem, Params

from .harness import (
    device_type,
    error_line,
    median,
    paired_times,
    quietly,
    ratio,
    relative_error,
)
from .pretrained import Network
from .reference import cached_solutions, converged_solutions, flat, system_key
from .robust_ij_methods import (
    FAMILIES,
    PEER_MODULE,
    Family,
    net_problem,
    peer_products,
    peer_step,
    workload,
)

if TYPE_CHECKING:
    from .robust_ij_settings import Settings

__all__ = ["measure_system"]


@dataclass
class _Config:
    family: Family
    value: int
    rank: int | None
    solves: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    same_as: int | None = None  # every solve stopped early at this smaller value
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.family.key}@{self.family.sweep}={self.value}"


# -- one network and one mu ----------------------------------------------------------------------


def measure_system(net: Network, net64: Network, mu: float, s: Settings,
                   status: Mapping[str, Any], device: str,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every method on the 8 IJ systems of one alternation of ``net`` at ``μ``."""
    lam = s.lam
    started = time.perf_counter()
    upper, lower = net.upper, net.lower
    nu = len(net.upper_batches)
    exact = net_problem(net, mu, lam, "hessian")
    gn = net_problem(net, mu, lam, "gauss-newton")
    h_op = exact.lower_hessian(upper, lower, net.lower_batch)
    g_op = gn.lower_hessian(upper, lower, net.lower_batch)
    names = list(h_op.names)
    system_exact = exact.system(upper, lower, h_op, mu)
    system_gn = gn.system(upper, lower, g_op, mu)

    # Right-hand sides v_i = ∇_θP f on the 8 upper batches (what upper_grad computes first).
    rhs: list[Params] = []
    for batch in net.upper_batches:
        rhs.append(_rhs(exact, upper, lower, batch, names))
    rhs_flat = torch.stack([flat(v, names) for v in rhs]).double()

    key = system_key(net.lower, net.lower_batch, rhs_flat, net.name, mu, s.lam, s.reference_tol,
                     s.reference_max_products, device_type(device))
    u_star, reference = cached_solutions(
        s.reference_cache, key, lambda: converged_solutions(
            net_problem(net64, mu, lam, "hessian"), net64.upper, net64.lower, net64.lower_batch,
            names, mu, rhs_flat, s.reference_tol, s.reference_max_products),
        log, f"[{net.name}, mu = {mu:g}]")
    u_star = u_star.to(rhs_flat.device)
    log(f"    {reference['products']} products ({reference['seconds']:.0f} s), max relative "
        f"residual {reference['relative_residual_max']:.1e}")

    def errors(u: Params, i: int, system: Any) -> tuple[float, float]:
        err = relative_error(flat(u, names), u_star[i])
        res = float(flat({n: a - b for (n, a), b in zip(rhs[i].items(),
                                                         system(u).values())}, names).double()
                    .norm() / rhs_flat[i].norm())
        return err, res

    # -- accuracy pass: every configuration's 8 solves (shared operators, as in an alternation) --
    log(f"  [{net.name}, mu = {mu:g}] accuracy: every method on the {nu} solves ...")
    configs: list[_Config] = []
    for fam in FAMILIES:
        if fam.curvature == "peer":
            module = PEER_MODULE.get(fam.key)
            values = s.peer_products
            for value in values:
                cfg = _Config(fam, value, None)
                if module is not None and not status.get(module, {}).get("available", False):
                    st = status.get(module, {})
                    cfg.error = ("not available: " + str(st.get("import_error")
                                                        or st.get("install_error") or "?"))
                configs.append(cfg)
            continue
        values = s.ranks if fam.sweep == "k" else s.products
        for value in values:
            configs.append(_Config(fam, value, fam.rank(value, s.pcg_rank)))

    previous: dict[str, _Config] = {}
    failed_builds: dict[tuple[str, int], str] = {}  # (curvature, rank) -> why it failed

    def accuracy(cfg: _Config) -> None:
        fam = cfg.family
        if cfg.error is not None:
            return
        if cfg.rank is not None and (fam.curvature, cfg.rank) in failed_builds:
            # The same approximation of the same operator: it fails the same way again.
            cfg.error = failed_builds[(fam.curvature, cfg.rank)]
            return
        if fam.curvature == "peer":
            for i in range(nu):
                w = workload(net, mu, lam, i)
                try:
                    res = quietly(lambda w=w: peer_step(fam.key, w, cfg.value))
                except Exception as err:  # a peer that cannot run is recorded, not fatal
                    cfg.error = error_line(err)
                    break
                u = {n: res.u[n].detach() for n in names}
                finite = all(bool(torch.isfinite(t).all()) for t in u.values())
                err, rel = errors(u, i, system_exact) if finite else (math.nan, math.nan)
                cfg.solves.append({"products": peer_products(fam.key, cfg.value),
                                   "breakdown": None if finite else "non-finite solution",
                                   "error": err, "residual": rel})
            return
        system = system_gn if fam.curvature == "gauss-newton" else system_exact
        solver = fam.solver(cfg.value, s.pcg_rank)
        prior = previous.get(fam.key)
        for i in range(nu):
            if prior is not None and prior.error is None and fam.repeats_at_larger_budgets \
                    and prior.solves[i]["products"] < prior.value:
                # That solve stopped before its budget: a larger budget repeats it exactly.
                cfg.solves.append(dict(prior.solves[i]))
                continue
            try:
                u, info = solver(system, rhs[i])
            except Exception as err:  # e.g. a Nyström approximation of indefinite curvature
                cfg.error = error_line(err)
                if cfg.rank is not None and i == 0:
                    failed_builds[(fam.curvature, cfg.rank)] = cfg.error
                break
            finite = all(bool(torch.isfinite(t).all()) for t in u.values())
            err, rel = errors(u, i, system_exact) if finite else (math.nan, math.nan)
            cfg.solves.append({"products": info.iterations,
                               "breakdown": info.breakdown or (None if finite else "non-finite"),
                               "error": err, "residual": rel,
                               "solver_residual": info.relative_residual})
        if cfg.error is None and prior is not None and prior.error is None and \
                fam.repeats_at_larger_budgets and all(p["products"] < prior.value
                                                      for p in prior.solves):
            cfg.same_as = prior.same_as or prior.value

    for cfg in configs:
        t0 = time.perf_counter()
        accuracy(cfg)
        cfg.seconds = time.perf_counter() - t0
        previous[cfg.family.key] = cfg
    log(f"    done ({time.perf_counter() - started:.0f} s so far)")

    # -- timing pass: round-robin, every figure over one gradient of the downstream loss ------
    log(f"  [{net.name}, mu = {mu:g}] cost: {s.repeats} round-robin repeats ...")
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in upper.items()}

    def gradient() -> Any:
        with torch.enable_grad():
            loss = net.downstream_loss(leaves, net.upper_batches[0])
            return torch.autograd.grad(loss, list(leaves.values()))

    fns: dict[str, Callable[[], Any]] = {"gradient": gradient}
    counter = {"i": 0}

    def next_batch() -> int:
        counter["i"] = (counter["i"] + 1) % nu
        return counter["i"]

    builds: dict[str, str] = {}
    timed: dict[str, str] = {}  # config name -> step callable name
    for cfg in configs:
        fam = cfg.family
        if cfg.error is not None or cfg.same_as is not None:
            continue
        if fam.curvature == "peer":
            def peer(fam: Family = fam, value: int = cfg.value) -> Any:
                return peer_step(fam.key, workload(net, mu, lam, next_batch()), value)

            fns[cfg.name] = peer
            timed[cfg.name] = cfg.name
            continue
        problem = net_problem(net, mu, lam, fam.curvature, fam.solver(cfg.value, s.pcg_rank))
        op = g_op if fam.curvature == "gauss-newton" else h_op
        if fam.stateful:  # a fresh operator, then the 8 steps: what it keeps is rebuilt each time
            def alternation(problem: BilevelProblem = problem) -> Any:
                hess = problem.lower_hessian(upper, lower, net.lower_batch)
                for batch in net.upper_batches[:nu]:
                    problem.upper_grad(upper, lower, batch, lower_hessian=hess)

            fns[cfg.name] = alternation
            timed[cfg.name] = cfg.name
            continue
        build = f"build {fam.curvature}" + (f" + Nystrom k={cfg.rank}" if cfg.rank else "")
        if build not in fns:
            def build_fn(problem: BilevelProblem = problem, rank: int | None = cfg.rank) -> Any:
                hess = problem.lower_hessian(upper, lower, net.lower_batch)
                if rank is not None:
                    problem.system(upper, lower, hess, mu).low_rank(rank)
                return hess

            fns[build] = build_fn
        builds[cfg.name] = build

        def step(problem: BilevelProblem = problem, op: Any = op) -> Any:
            return problem.upper_grad(upper, lower, net.upper_batches[next_batch()],
                                      lower_hessian=op)

        fns[cfg.name] = step
        timed[cfg.name] = cfg.name
    times = paired_times({k: _quiet(fn) for k, fn in fns.items()}, s.repeats, s.warmup, device)
    log(f"    done ({time.perf_counter() - started:.0f} s so far)")

    def amortised(cfg: _Config, i: int) -> float:
        t = times[cfg.name][i]
        if cfg.family.curvature == "peer":
            return t
        if cfg.family.stateful:  # timed as a whole alternation
            return t / s.upper_steps
        return (times[builds[cfg.name]][i] + s.upper_steps * t) / s.upper_steps

    by_name = {c.name: c for c in configs}
    rows = []
    for cfg in configs:
        fam = cfg.family
        src = cfg if cfg.same_as is None else by_name[f"{fam.key}@{fam.sweep}={cfg.same_as}"]
        row: dict[str, Any] = {
            "family": fam.key, "method": fam.label, "curvature": fam.curvature,
            "sweep": fam.sweep, "value": cfg.value, "rank": cfg.rank, "robust": fam.robust,
            "error": cfg.error, "same_computation_as": cfg.same_as,
            "accuracy_pass_seconds": cfg.seconds,
        }
        solves = cfg.solves
        if cfg.error is None and src.name in times:
            per_repeat = [amortised(src, i) for i in range(s.repeats)]
            row["cost_over_gradient"] = ratio(times, per_repeat.__getitem__, "gradient")
            row["step_seconds"] = median(times[src.name]) / (s.upper_steps if fam.stateful
                                                               else 1)
            row["amortised_seconds"] = median(per_repeat)
            row["_amortised"] = per_repeat
            if src.name in builds:
                row["build_over_gradient"] = ratio(times, builds[src.name], "gradient")
        if solves:
            errs = [x["error"] for x in solves]
            ress = [x["residual"] for x in solves]
            row["rel_error_median"] = median(errs)
            row["rel_error_max"] = max(errs)
            row["rel_residual_median"] = median(ress)
            row["rel_residual_max"] = max(ress)
            row["products_mean"] = statistics.fmean(x["products"] for x in solves)
            row["breakdowns"] = sum(x["breakdown"] is not None for x in solves)
            row["breakdown_reasons"] = sorted({str(x["breakdown"])[:160] for x in solves
                                               if x["breakdown"] is not None})
            row["solves"] = solves
        if cfg.error is not None:
            row["breakdowns"] = nu if fam.curvature != "peer" else None
        if fam.curvature == "peer":
            row["breakdown_note"] = "not reported by the peer (only non-finite solutions count)"
        rows.append(row)

    # Direct ratios to the original scheme and TorchOpt's default, repeat by repeat.
    def peer_row(key: str) -> dict[str, Any] | None:
        value = 5 if 5 in s.peer_products else s.peer_products[0]
        for r in rows:
            if r["family"] == key and r["value"] == value and "_amortised" in r:
                return r
        return None

    ref_row, topt_row = peer_row("reference"), peer_row("torchopt-normal-cg")
    for r in rows:
        if "_amortised" not in r:
            continue
        for other, key in ((ref_row, "cost_over_reference"), (topt_row, "cost_over_torchopt")):
            if other is not None:
                r[key] = median(a / b for a, b in zip(r["_amortised"], other["_amortised"]))
    for r in rows:
        r.pop("_amortised", None)
    return {
        "network": net.name, "mu": mu, "lam": lam, "damping": mu - lam,
        "peer_value": 5 if 5 in s.peer_products else s.peer_products[0],
        "unknowns": len(u_star[0]), "upper_steps": nu,
        "gradient_seconds": median(times["gradient"]),
        "reference": reference, "rows": rows,
        "median_seconds": {k: median(v) for k, v in times.items()},
        "seconds": time.perf_counter() - started,
    }


def _quiet(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with warnings silenced and exceptions swallowed (a timed call never stops a run;
    whether a configuration works is decided by the accuracy pass)."""
    def call() -> Any:
        try:
            return quietly(fn)
        except Exception:
            return None

    return call


def _rhs(problem: BilevelProblem, upper: Params, lower: Params, batch: Any,
         names: list[str]) -> Params:
    """``v = ∇_θP f`` of the BiSSL upper loss on ``batch`` (as ``upper_grad`` forms it)."""
    y_leaves = {n: lower[n].detach().requires_grad_(True) for n in names}
    x = {n: p.detach() for n, p in upper.items()}
    with torch.enable_grad():
        loss = problem.upper_loss(x, {**lower, **y_leaves}, batch)
        grads = torch.autograd.grad(loss, list(y_leaves.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(y_leaves[n])).detach()
            for n, g in zip(names, grads)}
