"""The measurements of :mod:`benchmarks.run`. Every figure is a ratio of times taken in one
process, interleaved (:func:`benchmarks.harness.paired_times`, :func:`benchmarks.harness.ratio`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from implicitbilevel import CG, Dense, HessianOperator, Neumann, hvp
from implicitbilevel.tree import Params, tree_axpy, tree_norm, tree_scale

from .harness import median, paired_times, ratio, relative_error
from .memory import in_subprocess, peak_memory
from .peers import (
    PeerResult,
    betty_upper_step,
    ours_upper_step,
    torchopt_upper_step,
)
from .reference import reference_upper_step
from .workloads import BiSSLWorkload, LossWorkload, finetune_step

__all__ = [
    "accuracy_vs_iterations",
    "hvp_and_solver_costs",
    "memory_ratio",
    "peer_comparison",
    "relative_difference",
]


def _median(times: Mapping[str, list[float]], name: str) -> float:
    return median(times[name])


def relative_difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor],
                        names: list[str] | None = None) -> float:
    """``‖a − b‖ / ‖b‖`` over ``names`` (default: every name of ``b``), in float64."""
    names = list(b) if names is None else names
    fa = torch.cat([a[n].detach().reshape(-1).double().cpu() for n in names])
    fb = torch.cat([b[n].detach().reshape(-1).double().cpu() for n in names])
    return relative_error(fa, fb)


def _random_like(params: Params, seed: int) -> Params:
    gen = torch.Generator().manual_seed(seed)
    out = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
           for n, p in params.items()}
    return tree_scale(out, 1.0 / float(tree_norm(out)))


# -- (1) HVP cost and (2) solver overhead ------------------------------------------------------


def hvp_and_solver_costs(w: LossWorkload, mu: float, repeats: int, warmup: int = 1,
                         upper_steps: int = 8, device: str | None = None) -> dict[str, Any]:
    """HVP modes and solver overhead of one loss, all timed against its gradient, interleaved.

    Returns per-quantity ratios to the gradient's time and the solver-overhead fractions:

    - ``forward-over-reverse``, ``reverse-over-reverse``: one :func:`implicitbilevel.hvp`;
    - ``kept-graph``: one product of ``HessianOperator(reuse=True)`` (graph already built);
      ``kept-graph build``: building that operator (the gradient with ``create_graph=True``);
    - ``cg5``/``neumann5``: one ``CG(max_iter=5)`` / ``Neumann(max_iter=5)`` solve of
      ``(I + H/μ) u = b`` through the kept-graph operator; ``cg5 / 5 HVP`` compares it with five
      bare kept-graph products;
    - bookkeeping: the solver's own time, measured twice: ``1 − 5·t(matvec)/t(solve)`` with the
      real ``I + H/μ`` matvec, and directly as the time of the same solve with a trivial
      block-diagonal matvec (minus five of those matvecs) over the time of the real solve;
    - ``amortised per CG iteration``: ``(build + N_U·cg5)/(5·N_U)`` over a gradient, the cost per
      iteration when one kept graph serves the ``N_U`` upper steps of an alternation (BiSSL).
    """
    fn, params, args = w.fn, w.params, w.args
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    tangent = _random_like(params, 1)
    b = _random_like(params, 2)
    scales = [1.0 + 0.5 * (i % 7) for i in range(len(params))]

    def gradient() -> Any:
        with torch.enable_grad():
            return torch.autograd.grad(fn(leaves, *args), list(leaves.values()))

    op = HessianOperator(fn, params, *args, reuse=True)

    def ij_matvec(z: Params) -> Params:
        return tree_axpy(1.0 / mu, op(z), z)

    def diag_matvec(z: Params) -> Params:
        return dict(zip(z.keys(), torch._foreach_mul(list(z.values()), scales)))

    cg5, neu5 = CG(max_iter=5), Neumann(max_iter=5, alpha=1.0)
    fns: dict[str, Callable[[], Any]] = {
        "gradient": gradient,
        "forward-over-reverse": lambda: hvp(fn, params, tangent, *args,
                                            mode="forward-over-reverse"),
        "reverse-over-reverse": lambda: hvp(fn, params, tangent, *args,
                                            mode="reverse-over-reverse"),
        "kept-graph build": lambda: HessianOperator(fn, params, *args, reuse=True),
        "kept-graph": lambda: op(tangent),
        "ij matvec": lambda: ij_matvec(tangent),
        "cg5": lambda: cg5(ij_matvec, b),
        "neumann5": lambda: neu5(ij_matvec, b),
        "diag matvec": lambda: diag_matvec(tangent),
        "cg5 diag": lambda: cg5(diag_matvec, b),
        "neumann5 diag": lambda: neu5(diag_matvec, b),
    }
    times = paired_times(fns, repeats, warmup, device)
    _, info = cg5(ij_matvec, b)
    _, neu_info = neu5(ij_matvec, b)
    # The solvers may stop before 5 products (CG at its rounding floor); normalise by what ran.
    k_cg, k_neu = max(info.iterations, 1), max(neu_info.iterations, 1)

    def per(name: str) -> float:
        return ratio(times, name, "gradient")

    def bookkeeping(solve: str, diag: str, k: int) -> tuple[float, float]:
        via_matvec = ratio(times, lambda i: times[solve][i] - k * times["ij matvec"][i], solve)
        # The direct measurement scales the trivial-matvec solve (always 5 products, the
        # block-diagonal matrix has 7 distinct eigenvalues) to the k products the real one ran.
        direct = ratio(times, lambda i: (times[diag][i] - 5 * times["diag matvec"][i]) * k / 5,
                       solve)
        return via_matvec, direct

    cg_book, cg_direct = bookkeeping("cg5", "cg5 diag", k_cg)
    neu_book, neu_direct = bookkeeping("neumann5", "neumann5 diag", k_neu)
    amortised = ratio(
        times,
        lambda i: (times["kept-graph build"][i] + upper_steps * times["cg5"][i])
        / (k_cg * upper_steps),
        "gradient",
    )
    return {
        "workload": w.name,
        "note": w.note,
        "parameters": sum(p.numel() for p in params.values()),
        "tensors": len(params),
        "mu": mu,
        "gradient_seconds": _median(times, "gradient"),
        "hvp_over_gradient": {
            "forward-over-reverse": per("forward-over-reverse"),
            "reverse-over-reverse": per("reverse-over-reverse"),
            "kept-graph": per("kept-graph"),
            "kept-graph build": per("kept-graph build"),
        },
        "solver": {
            "cg_iterations": info.iterations,
            "neumann_iterations": neu_info.iterations,
            "cg5_over_5_hvp": ratio(times, "cg5", lambda i: k_cg * times["kept-graph"][i]),
            "neumann5_over_5_hvp": ratio(times, "neumann5",
                                         lambda i: k_neu * times["kept-graph"][i]),
            "ij_matvec_over_hvp": ratio(times, "ij matvec", "kept-graph"),
            "cg_bookkeeping_fraction": cg_book,
            "cg_bookkeeping_fraction_direct": cg_direct,
            "neumann_bookkeeping_fraction": neu_book,
            "neumann_bookkeeping_fraction_direct": neu_direct,
            "cg_bookkeeping_ms": 1e3 * median(
                times["cg5 diag"][i] - 5 * times["diag matvec"][i] for i in range(repeats)),
            "cg_iteration_over_gradient": ratio(times, lambda i: times["cg5"][i] / k_cg,
                                                "gradient"),
            "cg_iteration_amortised_over_gradient": amortised,
            "upper_steps_sharing_graph": upper_steps,
            "cg_breakdown": info.breakdown,
            "cg_relative_residual": info.relative_residual,
        },
        "median_seconds": {name: _median(times, name) for name in times},
    }


# -- (3) peers and (6) end to end --------------------------------------------------------------


def _finetune_step(w: BiSSLWorkload) -> Callable[[], None]:
    return finetune_step(w.downstream_loss, w.upper, w.upper_batch)


def _upper_step(w: BiSSLWorkload, problem: Any, shared: bool = False) -> Callable[[], None]:
    from implicitbilevel import assign_grads

    params = {n: p.clone().requires_grad_(True) for n, p in w.upper.items()}
    opt = torch.optim.SGD(list(params.values()), lr=1e-4, momentum=0.9)
    hessian = problem.lower_hessian(w.upper, w.lower, w.lower_batch) if shared else None

    def step() -> None:
        out = problem.upper_grad(params, w.lower, w.upper_batch, w.lower_batch,
                                 lower_hessian=hessian)
        assign_grads(params, out.grads)
        opt.step()

    return step


def peer_comparison(w: BiSSLWorkload, repeats: int, warmup: int = 1, peers: Mapping[str, bool]
                    | None = None, converged_iters: int = 50,
                    device: str | None = None) -> dict[str, Any]:
    """One BiSSL upper step (N_c = 5, fresh lower Hessian) by us and by each available peer.

    Times are ratios to our step, interleaved in one process together with a plain fine-tuning
    step (forward, backward, SGD step) and our upper step with a lower Hessian shared by the
    ``N_U`` upper steps of an alternation. The solutions ``u`` and hypergradients are compared
    with ours (the block-wise reference scheme also with our ``CG(blockwise=True)``, Betty's
    Neumann with our :class:`Neumann`) and with a converged CG solve.
    """
    peers = dict(peers or {})
    mu_note = f"mu = {w.mu:g}"
    problem = w.problem()
    problem_block = w.problem(CG(max_iter=5, blockwise=True))
    problem_neumann = w.problem(Neumann(max_iter=5))
    problem_conv = w.problem(CG(max_iter=converged_iters))

    steps: dict[str, Callable[[], PeerResult]] = {
        "ours CG": lambda: ours_upper_step(w, problem),
        "ours CG blockwise": lambda: ours_upper_step(w, problem_block),
        "ours Neumann": lambda: ours_upper_step(w, problem_neumann),
        "reference (double backward per HVP, blockwise CG)": lambda: reference_upper_step(w),
    }
    if peers.get("torchopt", False):
        steps["TorchOpt custom_root + solve_cg"] = lambda: torchopt_upper_step(w, "cg")
        steps["TorchOpt custom_root default (solve_normal_cg)"] = (
            lambda: torchopt_upper_step(w, "normal-cg"))
    if peers.get("betty", False):
        steps["Betty cg"] = lambda: betty_upper_step(w, "cg")
        steps["Betty neumann"] = lambda: betty_upper_step(w, "neumann")

    results = {name: fn() for name, fn in steps.items()}
    ours = results["ours CG"]
    out_conv = problem_conv.upper_grad(w.upper, w.lower, w.upper_batch, w.lower_batch)
    converged = out_conv.u
    rhs = reference_upper_step(w, max_iter=0).v
    assert rhs is not None
    backbone = w.backbone
    correction_conv = {n: converged[n] - rhs[n] for n in backbone}
    compare_to = {
        "ours CG blockwise": "reference (double backward per HVP, blockwise CG)",
        "ours Neumann": "Betty neumann",
    }
    baseline_of = {peer: ours_name for ours_name, peer in compare_to.items()}

    # Timed: every peer, and ours as a full upper step (upper_grad, assign_grads and an SGD step,
    # the latter two under 1% of it); our block-wise and Neumann variants are only compared.
    timed: dict[str, Callable[[], Any]] = {
        name: (lambda fn=fn: fn()) for name, fn in steps.items()
        if name not in ("ours CG", "ours Neumann")
    }
    timed["ours CG"] = _upper_step(w, problem)
    timed["fine-tuning step"] = _finetune_step(w)
    timed["BiSSL upper step (shared Hessian)"] = _upper_step(w, problem, shared=True)
    timed["lower Hessian build"] = lambda: problem.lower_hessian(w.upper, w.lower, w.lower_batch)
    for name in ("ours CG", "fine-tuning step", "BiSSL upper step (shared Hessian)"):
        for _ in range(warmup):
            timed[name]()
    # The peers' closures were warmed up by computing their solutions above.
    times = paired_times(timed, repeats, 0, device)

    rows = {}
    for name, res in results.items():
        base_name = baseline_of.get(name, "ours CG")
        base = results.get(base_name, ours)
        rows[name] = {
            "time_over_ours": ratio(times, name, "ours CG") if name in times else None,
            "compared_with": base_name,
            "rel_diff_u": relative_difference(res.u, base.u, backbone),
            "rel_diff_u_minus_v": relative_difference(
                {n: res.u[n] - rhs[n] for n in backbone},
                {n: base.u[n] - rhs[n] for n in backbone}, backbone),
            "rel_diff_hypergradient": relative_difference(res.grads, base.grads),
            "rel_err_u_minus_v_vs_converged": relative_difference(
                {n: res.u[n] - rhs[n] for n in backbone}, correction_conv, backbone),
            "median_seconds": _median(times, name) if name in times else None,
        }
    e2e = {
        "finetune_seconds": _median(times, "fine-tuning step"),
        "upper_step_over_finetune": ratio(times, "ours CG", "fine-tuning step"),
        "upper_step_shared_hessian_over_finetune": ratio(
            times, "BiSSL upper step (shared Hessian)", "fine-tuning step"),
        "upper_step_amortised_over_finetune": ratio(
            times,
            lambda i: times["BiSSL upper step (shared Hessian)"][i]
            + times["lower Hessian build"][i] / 8,
            "fine-tuning step"),
        "lower_hessian_build_over_finetune": ratio(times, "lower Hessian build",
                                                   "fine-tuning step"),
    }
    return {
        "workload": w.name,
        "note": f"{w.note}; {mu_note}; N_c = 5",
        "u_minus_v_over_v": relative_difference(converged, rhs, backbone),
        "ours_solve": {"iterations": out_conv.info.iterations,
                       "converged_breakdown": out_conv.info.breakdown,
                       "converged_relative_residual": out_conv.info.relative_residual},
        "peers": rows,
        "end_to_end": e2e,
        "median_seconds": {name: _median(times, name) for name in times},
    }


# -- (4) memory --------------------------------------------------------------------------------


def memory_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run one step in this (fresh) process and return its peak memory delta in MiB
    (:func:`benchmarks.memory.peak_memory`).

    CPU: ``VmHWM`` after the step minus ``VmRSS`` before it, with the high-water mark reset
    through ``/proc/self/clear_refs`` first. CUDA: ``torch.cuda.max_memory_allocated`` minus the
    memory allocated before the step.
    """
    from .workloads import bissl_workload

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    device = spec["device"]
    w = bissl_workload(spec["arch"], batch=spec["batch"], image=spec["image"], mu=spec["mu"],
                       device=device)
    variant = spec["variant"]
    if variant == "fine-tuning step":
        step = _finetune_step(w)
    elif variant == "upper step, kept graph":
        step = _upper_step(w, w.problem())
    elif variant == "upper step, forward-over-reverse":
        step = _upper_step(w, w.problem(reuse_graph=False, hvp_mode="forward-over-reverse"))
    elif variant == "reference scheme":
        def step() -> None:
            reference_upper_step(w)
    else:
        raise ValueError(f"unknown memory variant {variant!r}")
    before, peak = peak_memory(step, device)
    return {"variant": variant, "delta_mib": (peak - before) / 2**20,
            "baseline_mib": before / 2**20}


def memory_ratio(arch: str, batch: int, image: int, mu: float, device: str, repeats: int,
                 variants: tuple[str, ...] = ("fine-tuning step", "upper step, kept graph",
                                               "upper step, forward-over-reverse"),
                 threads: int | None = None) -> dict[str, Any]:
    """Peak memory of each variant's step, one fresh subprocess per measurement, medians.

    Returns the median deltas (MiB) and their ratios to the fine-tuning step.
    """
    deltas: dict[str, list[float]] = {v: [] for v in variants}
    errors: dict[str, str] = {}
    for _ in range(repeats):
        for variant in variants:
            spec = {"arch": arch, "batch": batch, "image": image, "mu": mu, "device": device,
                    "variant": variant, "threads": threads or torch.get_num_threads()}
            out, error = in_subprocess("benchmarks.measure:memory_worker", spec, timeout=600)
            if error is not None:
                errors[variant] = error
                continue
            deltas[variant].append(out["delta_mib"])
    medians = {v: median(d) if d else math.nan for v, d in deltas.items()}
    base = medians["fine-tuning step"]
    return {
        "method": ("CUDA max_memory_allocated delta" if torch.device(device).type == "cuda"
                   else "peak RSS (VmHWM) delta over VmRSS before the step, fresh subprocess"),
        "batch": batch,
        "delta_mib": medians,
        "samples_mib": deltas,
        "over_finetune": {v: medians[v] / base for v in variants},
        "errors": errors,
    }


# -- (5) accuracy vs iterations ------------------------------------------------------------------


def accuracy_vs_iterations(w: BiSSLWorkload, iterations: list[int]) -> dict[str, Any]:
    """Relative error of CG and Neumann hypergradients vs :class:`Dense`, per iteration count.

    Neumann uses ``α = 1/λ_max(A)`` (from the dense matrix), the largest step for which the series
    is guaranteed to converge; it is also reported with the default ``α = 1``.
    """
    dense = w.problem(Dense())
    exact = dense.upper_grad(w.upper, w.lower, w.upper_batch, w.lower_batch)
    hess = dense.lower_hessian(w.upper, w.lower, w.lower_batch)
    like = {n: w.lower[n] for n in w.backbone}
    h = Dense().matrix(hess, like)
    a = torch.eye(h.shape[0], dtype=h.dtype) + h / w.mu
    eig = torch.linalg.eigvalsh((a + a.T) / 2)
    alpha = float(1.0 / eig.max())
    curves: dict[str, list[float]] = {"CG": [], f"Neumann (alpha = 1/lambda_max = {alpha:.3g})": [],
                                      "Neumann (alpha = 1)": []}
    for k in iterations:
        for label, solver in ((list(curves)[0], CG(max_iter=k)),
                              (list(curves)[1], Neumann(max_iter=k, alpha=alpha)),
                              (list(curves)[2], Neumann(max_iter=k, alpha=1.0))):
            out = w.problem(solver).upper_grad(w.upper, w.lower, w.upper_batch, w.lower_batch,
                                               lower_hessian=hess)
            curves[label].append(relative_difference(out.grads, exact.grads))
    return {
        "workload": w.name,
        "note": w.note,
        "unknowns": int(h.shape[0]),
        "eigenvalues_A": {"min": float(eig.min()), "max": float(eig.max()),
                          "condition": float(eig.max() / eig.min())},
        "iterations": list(iterations),
        "relative_error": curves,
    }
