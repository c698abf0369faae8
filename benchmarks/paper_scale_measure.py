"""The measurement of :mod:`benchmarks.paper_scale_ij`: the IJ options, the settings, Lanczos and
one proxy system.

:data:`METHODS` lists the IJ options (a solver on a curvature, spelled as ``bissl.ij`` /
``bissl.curvature``); :class:`Settings` the proxies, their sizes, the per-proxy method options and
the methods skipped on each; :func:`lanczos_extremes` the extreme eigenvalues of the lower Hessian;
:func:`measure_snapshot` every method on the ``N_U`` systems of one alternation of one proxy at one
training length (what is measured: the docstring of :mod:`benchmarks.paper_scale_ij`).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from implicitbilevel import (
    CG,
    MFAC,
    MINRES,
    BilevelProblem,
    LinearSolver,
    NystromPreconditioner,
    OriginalBiSSLCG,
)
from implicitbilevel.tree import tree_dot, tree_norm, tree_sub

from .harness import error_line, median, quietly
from .memory import peak_memory
from .paper_scale_nets import Proxy, ProxySpec
from .workloads import bissl_problem

try:  # the recycled solvers, where they have landed
    from implicitbilevel.solvers import RecycledCG, RecycledMINRES
except ImportError:  # pragma: no cover
    RecycledCG = RecycledMINRES = None  # type: ignore[assignment,misc]

__all__ = ["METHODS", "Method", "Settings", "lanczos_extremes", "measure_snapshot"]


@dataclass(frozen=True)
class Method:
    """One IJ option: a solver on a curvature (``bissl.ij`` / ``bissl.curvature`` spelling)."""

    key: str
    label: str
    curvature: str  # "hessian" or "gauss-newton"
    build: Callable[[int, dict[str, int]], LinearSolver]
    products: bool = True  # takes curvature products (M-FAC does not)


METHODS: tuple[Method, ...] = (
    Method("cg", "CG (exact Hessian)", "hessian", lambda n, o: CG(max_iter=n)),
    Method("minres", "MINRES (exact Hessian)", "hessian", lambda n, o: MINRES(max_iter=n)),
    Method("gn-cg", "Gauss-Newton + CG", "gauss-newton", lambda n, o: CG(max_iter=n)),
    Method("gn-pcg", "Gauss-Newton + Nystrom-PCG", "gauss-newton",
           lambda n, o: CG(max_iter=n, preconditioner=NystromPreconditioner(rank=o["rank"]))),
    Method("mfac", "M-FAC (empirical Fisher)", "hessian", lambda n, o: MFAC(m=o["mfac_m"]),
           products=False),
    Method("reference", "OriginalBiSSLCG (thesis preset)", "hessian",
           lambda n, o: OriginalBiSSLCG(max_iter=n)),
)
if RecycledMINRES is not None:
    METHODS += (
        Method("recycled-minres", "RecycledMINRES (exact Hessian)", "hessian",
               lambda n, o: RecycledMINRES(max_iter=n, recycle_dim=o["recycle_dim"],
                                           window=n)),
        Method("recycled-cg", "RecycledCG (exact Hessian)", "hessian",
               lambda n, o: RecycledCG(max_iter=n, recycle_dim=o["recycle_dim"], window=n)),
    )


_GPT_MEMORY = ("skipped: memory (85M unknowns, 340 MB a vector; the Nystrom sketch keeps "
               "~2 x rank vectors, M-FAC m gradients, the recycled solvers ~2 x recycle_dim + "
               "window; past the ~8 GB this shared 2-core machine allows)")
_RECYCLED_MEMORY = ("skipped: memory (on ResNet-18 at initialisation the process grew to 7 GB "
                    "RSS in RecycledMINRES and the machine's OOM killer stopped it)")
_TIME = ("skipped: time (the recycled solvers cost 2-4x MINRES per upper step on the other "
         "proxies; the run had to fit an hour of a shared 2-core CPU)")


@dataclass
class Settings:
    """The proxies, their sizes and the per-proxy method options."""

    proxies: tuple[ProxySpec, ...] = (
        ProxySpec("resnet18", "vision_small.yaml", image_size=32, lower_pairs=4, upper_batch=8,
                  train_batch=8, lr=1e-3, steps=(0, 60)),
        ProxySpec("resnet50", "vision_default.yaml", image_size=32, lower_pairs=4, upper_batch=8,
                  train_batch=8, lr=1e-3, steps=(0, 20)),
        ProxySpec("gpt", "gpt_glue_paper.yaml", lower_pairs=4, upper_batch=4, context=16,
                  vocab=512, width=768, train_batch=8, lr=2.5e-4, steps=(0, 40)),
    )
    upper_steps: dict[str, int] = field(default_factory=lambda: {"resnet18": 4, "resnet50": 4,
                                                                  "gpt": 4})
    options: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "resnet18": {"rank": 10, "mfac_m": 10, "recycle_dim": 4},
        "resnet50": {"rank": 10, "mfac_m": 10, "recycle_dim": 4},
        "gpt": {"rank": 10, "mfac_m": 1, "recycle_dim": 4},
    })
    # Methods not run on a proxy, with the reason (a row in the table says so).
    skip: dict[str, dict[str, str]] = field(default_factory=lambda: {
        "resnet18": {m: _RECYCLED_MEMORY for m in ("recycled-minres", "recycled-cg")},
        "resnet50": {m: _TIME for m in ("recycled-minres", "recycled-cg")},
        "gpt": {m: _GPT_MEMORY for m in ("gn-pcg", "mfac", "recycled-minres", "recycled-cg")},
    })
    lanczos_steps: int = 10
    gradient_repeats: int = 2
    target_residual: float = 0.1
    target_fraction: float = 0.95

    @classmethod
    def smoke(cls) -> Settings:
        """Tiny sizes for a test of the whole pipeline (ResNet-18 at 16 px only)."""
        s = cls()
        s.proxies = (replace(s.proxies[0], image_size=16, lower_pairs=2, upper_batch=2,
                             train_batch=2, steps=(0, 1)),)
        s.upper_steps = {"resnet18": 2}
        s.options = {"resnet18": {"rank": 2, "mfac_m": 2, "recycle_dim": 1}}
        s.skip = {"resnet18": {"recycled-cg": "skipped: a test of the skip rows"}}
        s.lanczos_steps = 4
        s.gradient_repeats = 1
        return s


# -- Lanczos -------------------------------------------------------------------------------------


def lanczos_extremes(matvec: Callable[[dict], dict], like: dict[str, torch.Tensor], steps: int,
                     seed: int = 0) -> dict[str, Any]:
    """Extreme eigenvalues of a symmetric ``matvec`` by ``steps`` Lanczos steps (three-term
    recurrence with local reorthogonalisation; memory: three vectors).

    Returns the smallest and largest Ritz values (``λ_min(H) ≤ smallest``, ``λ_max(H) ≥ largest``)
    and their error bounds ``β_m |s_mi|`` (a Ritz value is within its bound of an eigenvalue).
    """
    names = list(like)
    shapes = [like[n].shape for n in names]
    sizes = [like[n].numel() for n in names]

    def unflat(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(names, torch.split(x, sizes), shapes)}

    def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([d[n].reshape(-1).float() for n in names])

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(sizes), generator=gen)
    q /= q.norm()
    q_prev = torch.zeros_like(q)
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    for _ in range(steps):
        with torch.no_grad():
            w = flat(matvec(unflat(q)))
        alpha = float(w @ q)
        w -= alpha * q + beta * q_prev
        w -= float(w @ q) * q  # local reorthogonalisation
        alphas.append(alpha)
        beta = float(w.norm())
        betas.append(beta)
        if beta == 0 or not math.isfinite(beta):
            break
        q_prev, q = q, w / beta
        del w
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    bounds = (betas[m - 1] * s[-1].abs()).tolist()
    return {"smallest": float(theta[0]), "largest": float(theta[-1]),
            "smallest_bound": bounds[0], "largest_bound": bounds[-1], "products": m,
            "ritz_values": [float(x) for x in theta]}


# -- one proxy at one training length ------------------------------------------------------------


def _problem(net: Any, mu: float, lam: float, curvature: str,
             solver: LinearSolver | None, products: bool = True) -> BilevelProblem:
    return bissl_problem(net.downstream_loss, net.pretext_loss, net.backbone, mu, lam, solver,
                         curvature=net.gauss_newton if curvature == "gauss-newton" else "hessian",
                         reuse_graph=products)


def measure_snapshot(px: Proxy, s: Settings, device: str,
                     log: Callable[[str], None] = print,
                     progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every method on the ``N_U`` systems of one alternation of ``px`` (module docstring);
    ``progress`` is called with the partial record after each method."""
    started = time.perf_counter()
    net, cfg = px.network, px.config
    key = px.spec.key
    b = cfg["bissl"]
    lam, damping, n_c = float(b["lam"]), float(b["damping"]), int(b["cg_iters"])
    mu = lam + damping
    opts = s.options[key]
    upper, lower, batch = net.upper, net.lower, net.lower_batch
    out: dict[str, Any] = {"proxy": key, "config": px.spec.config, "steps": px.steps,
                           "network": net.name, "note": net.note, "unknowns": net.unknowns,
                           "lam": lam, "damping": damping, "mu": mu, "n_c": n_c,
                           "upper_steps": len(net.upper_batches), "options": opts,
                           "pretrain_loss_last": px.pretrain_losses[-1] if px.pretrain_losses
                           else None, "pretrain_loss_first": px.pretrain_losses[0]
                           if px.pretrain_losses else None}

    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in upper.items()}

    def gradient() -> float:
        t0 = time.perf_counter()
        with torch.enable_grad():
            loss = net.downstream_loss(leaves, net.upper_batches[0])
            torch.autograd.grad(loss, list(leaves.values()))
        return time.perf_counter() - t0

    grad_times = [gradient() for _ in range(s.gradient_repeats)]

    # The operators of the alternation: built once per curvature, timed, memory measured.
    ops: dict[str, Any] = {}
    build_seconds: dict[str, float] = {}
    build_mib: dict[str, float] = {}
    exact_problem = _problem(net, mu, lam, "hessian", None)
    for curv in ("hessian", "gauss-newton"):
        prob = _problem(net, mu, lam, curv, None)
        holder: dict[str, Any] = {}

        def build(prob: BilevelProblem = prob, holder: dict = holder) -> None:
            t0 = time.perf_counter()
            holder["op"] = prob.lower_hessian(upper, lower, batch)
            holder["seconds"] = time.perf_counter() - t0

        before, peak = peak_memory(build, device, release=True)
        ops[curv], build_seconds[curv] = holder["op"], holder["seconds"]
        build_mib[curv] = (peak - before) / 2**20
    exact_system = exact_problem.system(upper, lower, ops["hessian"], mu)
    out["build_seconds"], out["build_mib"] = build_seconds, build_mib

    log(f"  [{net.name}] Lanczos ({s.lanczos_steps} exact products) ...")
    like = {n: lower[n].detach() for n in ops["hessian"].names}
    eig = lanczos_extremes(ops["hessian"], like, s.lanczos_steps)
    eig["a_min"] = 1 + eig["smallest"] / mu
    eig["below_minus_mu"] = eig["smallest"] < -mu
    out["eigen"] = eig
    log(f"    lambda_min(H) <= {eig['smallest']:.4g}, lambda_max(H) >= {eig['largest']:.4g}, "
        f"1 + lambda_min/mu <= {eig['a_min']:.3g} ({time.perf_counter() - started:.0f} s)")

    rows: list[dict[str, Any]] = []
    out["rows"] = rows
    out["gradient_seconds"] = median(grad_times)
    skip = s.skip.get(key, {})
    for method in METHODS:
        t0 = time.perf_counter()
        if method.key in skip:
            rows.append({"method": method.key, "label": method.label,
                         "curvature": method.curvature, "skipped": skip[method.key]})
            log(f"    {method.key:16s} {skip[method.key][:60]}")
            continue
        try:
            rows.append(_measure_method(method, px, s, mu, lam, n_c, opts, ops, exact_system,
                                        build_seconds, build_mib, gradient, device))
        except Exception as err:  # a method that cannot run is recorded, not fatal
            traceback.print_exc()
            rows.append({"method": method.key, "label": method.label,
                         "curvature": method.curvature, "error": error_line(err)})
        gc.collect()
        r = rows[-1]
        log(f"    {method.key:16s} breakdowns {r.get('breakdowns')}, solved residual "
            f"{r.get('solved_residual_median', math.nan):.3g}, exact residual "
            f"{r.get('exact_residual_median', math.nan):.3g}, cost "
            f"{r.get('cost_over_gradient', math.nan):.2f} grads "
            f"({time.perf_counter() - t0:.0f} s)")
        if "amortised_seconds" in r:
            r["cost_over_gradient"] = r["amortised_seconds"] / out["gradient_seconds"]
        if progress is not None:
            progress(out)
    grad_times.extend(gradient() for _ in range(s.gradient_repeats))
    out["gradient_seconds"] = median(grad_times)
    for r in rows:
        if "amortised_seconds" in r:
            r["cost_over_gradient"] = r["amortised_seconds"] / out["gradient_seconds"]
    out["rows"] = rows
    out["seconds"] = time.perf_counter() - started
    return out


def _measure_method(method: Method, px: Proxy, s: Settings, mu: float, lam: float, n_c: int,
                    opts: dict[str, int], ops: dict[str, Any], exact_system: Any,
                    build_seconds: dict[str, float], build_mib: dict[str, float],
                    gradient: Callable[[], float], device: str) -> dict[str, Any]:
    net = px.network
    solver = method.build(n_c, opts)
    if method.key == "mfac":
        for g in px.mfac_gradients:
            solver.observe({n: g[n] for n in net.backbone})
    problem = _problem(net, mu, lam, method.curvature, solver, method.products)
    op = ops[method.curvature] if method.products else problem.lower_hessian(
        net.upper, net.lower, net.lower_batch)
    build = build_seconds[method.curvature] if method.products else 0.0
    solves: list[dict[str, Any]] = []
    step_seconds: list[float] = []
    mib = math.nan
    for i, batch in enumerate(net.upper_batches):
        holder: dict[str, Any] = {}

        def step(batch: Any = batch, holder: dict = holder) -> None:
            t0 = time.perf_counter()
            holder["out"] = quietly(lambda: problem.upper_grad(net.upper, net.lower, batch,
                                                               lower_hessian=op))
            holder["seconds"] = time.perf_counter() - t0

        if i == 0:
            before, peak = peak_memory(step, device, release=True)
            mib = (peak - before) / 2**20
        else:
            step()
        res = holder["out"]
        step_seconds.append(holder["seconds"])
        u, v = res.u, res.rhs
        v_norm = float(tree_norm(v))
        finite = math.isfinite(float(tree_dot(u, u)))
        with torch.no_grad():
            exact = float(tree_norm(tree_sub(v, exact_system(u)))) / v_norm if finite \
                else math.nan
            if method.curvature == "hessian" and method.products:
                solved = exact
            elif method.products:
                solved = res.true_relative_residual() if finite else math.nan
            else:
                solved = math.nan  # a direct solve of its own (Fisher) system
        cosine = float(tree_dot(u, v) / (tree_norm(u) * tree_norm(v)).clamp_min(1e-30))
        solves.append({"breakdown": res.info.breakdown or (None if finite else "non-finite"),
                       "products": res.info.iterations, "solved_residual": solved,
                       "exact_residual": exact, "cosine": cosine,
                       "solver_residual": res.info.relative_residual,
                       "prepare_seconds": res.prepare_seconds})
    nu = len(solves)
    solved = [x["solved_residual"] for x in solves]
    exact = [x["exact_residual"] for x in solves]
    ok = [x for x in solved if x <= s.target_residual]
    return {
        "method": method.key, "label": method.label, "curvature": method.curvature,
        "breakdowns": sum(x["breakdown"] is not None for x in solves),
        "breakdown_reasons": sorted({str(x["breakdown"])[:160] for x in solves
                                     if x["breakdown"] is not None}),
        "products_mean": statistics.fmean(x["products"] for x in solves),
        "solved_residual_median": _nan_median(solved),
        "solved_residual_max": max(solved),
        "solved_within_target": len(ok) / nu if method.products else None,
        "exact_residual_median": _nan_median(exact), "exact_residual_max": max(exact),
        "cosine_median": _nan_median([x["cosine"] for x in solves]),
        "cosine_min": min(x["cosine"] for x in solves),
        "step_seconds": median(step_seconds),
        "amortised_seconds": (build + sum(step_seconds)) / nu,
        "build_seconds": build,
        "peak_mib": mib + (build_mib[method.curvature] if method.products else 0.0),
        "step_peak_mib": mib,
        "solves": solves,
    }


def _nan_median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return median(finite) if finite else math.nan
