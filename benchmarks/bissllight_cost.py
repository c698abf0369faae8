"""Cost, peak memory and accuracy of one BiSSL upper step on LoRA ViTs: CG vs global and
block-wise M-FAC (the BiSSLight setting).

Two networks, each a frozen timm ViT with LoRA adapters on the query and value projections
(``recipes/vision/vit.py``) and the MAE decoder as the pretext head (``recipes/vision/mae.py``):

- **tiny**: the embedded recipe's ViT (16-px digits, patch 4, width 32, depth 2, rank-4 LoRA,
  decoder width 32, depth 1), its base weights MAE-pretrained for ``--tiny-epochs`` epochs;
- **ViT-B/16**: timm's ``vit_base_patch16_224`` architecture (patch 16, width 768, depth 12, 12
  heads) with random weights (no download) at a reduced resolution (``--b16-image``, the patch
  embedding's ``img_size`` set to it) and batch (``--b16-batch``), rank-64 LoRA on q and v, and
  the paper config's MAE decoder (width 512, depth 8, 16 heads).

Both adapter sets (θ_P of the pretext model, θ_D of the downstream model) start from the same
adapters moved off ``B = 0``, θ_P a little further (as after some lower steps). The problem is
the recipe's: upper ``L^D(θ_P, φ_D) + L^D(θ_D, φ_D)`` (cross-entropy of a linear head), lower
the MAE loss plus ``λ/2 ‖θ_D − θ_P‖²``, λ = 0.001, the system ``(I + H/μ) u = v`` over the
adapters with ``μ = λ + λ_damp`` (:class:`~implicitbilevel.BilevelProblem`).

Methods (one :class:`~implicitbilevel.BilevelProblem` each, as ``recipes/common/ij.py`` builds
them): **BiSSL-CG** (``CG(max_iter=5)``, the exact Hessian over the adapters through the kept
first-order graph of the MAE loss, built once per alternation), **global M-FAC** and
**block-wise M-FAC** (``MFAC(m, blocks=r"blocks\\.\\d+")``: one Woodbury inverse per transformer
block), both from a window of ``m`` MAE gradients at the lower point, each on another masked
batch (the gradients the lower steps compute anyway).

Measured, side by side in one process:

- **cost**: one upper step over one gradient of the downstream loss ``L^D(θ_D, φ_D)``,
  ``(t_first + (N_U − 1)·t_later)/N_U`` over ``t_grad`` (``t_first`` builds the curvature
  operator, ``t_later`` reuses it), timed round-robin in CPU seconds of this process (one torch
  thread; on a loaded machine the CPU time stands in for an idle core's wall time, which the JSON
  keeps), the median over repeats of the per-repeat ratio;
- **peak memory** of the first upper step of an alternation (operator build and solve): the
  resident-set high-water mark over the resident set before it, freed heap handed back first
  (:func:`benchmarks.memory.peak_memory`), and apart the M-FAC window (``m·n`` numbers);
- **accuracy**: ``‖v − (I + H/μ) u‖/‖v‖`` for each method's ``u`` on the exact adapter system
  (exact Hessian, the upper stage's lower batch) and ``‖u − u*‖/‖u*‖``, at μ = 10.001 (λ = 0.001
  plus the recipe's λ_damp = 10: the paper config's μ and the thesis's) and a smaller μ
  (``--mu-small``, ``--b16-mu-small``). The tiny ViT's system on a float64 copy of the model
  (exact to about 1e-8: the MAE loss casts its prediction to float32), ``u*`` by MINRES to 1e-10;
  ViT-B/16's in float32, ``u*`` from ``--b16-exact-products`` MINRES products, its residual
  stated (with random weights the MAE Hessian is indefinite; a small μ may leave ``u*`` off).

Run: ``python benchmarks/bissllight_cost.py [--quick] [--threads 1]``; results in
``benchmarks/results/bissllight-cpu.{md,json}``; ViT-B/16 at twice the batches with
``--b16-batch 4 --b16-lower-batch 16 --name bissllight-batch4-cpu``, at 112 px with
``--b16-image 112 --name bissllight-112px-cpu``.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import harness as hb
from benchmarks.memory import peak_memory
from implicitbilevel import CG, MFAC, MINRES, BilevelProblem, ImplicitJacobian, ProximalL2
from implicitbilevel.bissl import bissl_upper_loss
from implicitbilevel.tree import tree_norm, tree_sub
from recipes.vision.mae import MAEPretext, MaskedBatches, mae_bissl_losses, pretrain_mae
from recipes.vision.models import Downstream
from recipes.vision.vit import add_lora, base_trainable, build_vit

LAM, DAMPING = 0.001, 10.0
METHODS = ("BiSSL-CG", "global M-FAC", "block-wise M-FAC")


@dataclass
class Net:
    """One network's size (see the module docstring)."""

    label: str
    image: int
    batch: int  # downstream (upper) batch
    lower_batch: int  # MAE (lower) batch: the Hessian's and each window gradient's
    rank: int
    vit: dict[str, Any]
    decoder: dict[str, int]
    epochs: int = 0  # MAE pretraining of the base weights (0: random)
    exact_products: int = 0  # 0: float64 MINRES to 1e-10; otherwise float32, this many
    mu_small: float = 0.1  # the second μ of the accuracy table


@dataclass
class Settings:
    """What one run measures."""

    nets: list[Net] = field(default_factory=list)
    m: int = 20
    upper_steps: int = 8
    cg_iters: int = 5
    repeats: int = 3


def _digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    return (torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False),
            torch.tensor(d.target))


def build(net: Net, m: int) -> dict[str, Any]:
    """The pretext and downstream models, both levels' parameters, the batches and ``m`` MAE
    gradients over the adapters at the lower point."""
    torch.manual_seed(0)
    x, y = _digits(net.image)
    backbone = add_lora(build_vit(net.image, **net.vit), net.rank, ["q", "v"])
    pretext = MAEPretext(backbone, net.image, 0.75, **net.decoder)
    if net.epochs:
        loader = [(x[i:i + 128], x[i:i + 128]) for i in range(0, 1024, 128)]
        with base_trainable(pretext.backbone):
            pretrain_mae(pretext, MaskedBatches(loader, pretext.patches, seed=0),
                         epochs=net.epochs, lr=2e-3, weight_decay=0.05, device=torch.device("cpu"))
    downstream = Downstream(copy.deepcopy(pretext.backbone), 10)
    gen = torch.Generator().manual_seed(1)
    upper, lower = {}, {}
    for n, p in pretext.named_parameters():
        lower[n] = p.detach().clone()
    for n, p in downstream.named_parameters():
        upper[n] = p.detach().clone()
        if "lora_" in n:  # adapters off B = 0; θ_P a little further than θ_D
            step = 0.02 * torch.randn(p.shape, generator=gen)
            upper[n] += step
            lower[n] = upper[n] + 0.5 * step
    patches = pretext.patches

    def images(b: int) -> torch.Tensor:
        return torch.randint(0, 1797, (b,), generator=gen)

    i = images(net.lower_batch)
    lower_batch = (x[i], torch.rand(net.lower_batch, patches, generator=gen))
    i = images(net.batch)
    upper_batch = (x[i], y[i])
    losses = mae_bissl_losses(pretext, downstream)
    adapters = losses.backbone
    grads = []
    for _ in range(m):
        i = images(net.lower_batch)
        live = {n: lower[n].clone().requires_grad_() for n in adapters}
        noise = torch.rand(net.lower_batch, patches, generator=gen)
        loss = losses.pretext({**lower, **live}, (x[i], noise))
        grads.append(dict(zip(adapters, torch.autograd.grad(loss, list(live.values())))))
    return dict(pretext=pretext, downstream=downstream, upper=upper, lower=lower,
                lower_batch=lower_batch, upper_batch=upper_batch, grads=grads, losses=losses)


def problem_for(losses: Any, solver: Any) -> BilevelProblem:
    """The recipe's BiSSL problem with this solver (no kept graph for M-FAC, as the recipe)."""
    return BilevelProblem(
        upper_loss=bissl_upper_loss(losses.downstream, losses.backbone),
        lower_loss=losses.pretext, regularizer=ProximalL2(losses.backbone), lam=LAM,
        ij=ImplicitJacobian(solver, damping=DAMPING, reuse_graph=not isinstance(solver, MFAC)))


def solvers(s: Settings, grads: list[dict]) -> dict[str, Any]:
    """BiSSL-CG and the two M-FACs, their windows filled with the same gradients."""
    out = {"BiSSL-CG": CG(max_iter=s.cg_iters), "global M-FAC": MFAC(m=s.m),
           "block-wise M-FAC": MFAC(m=s.m, blocks=r"blocks\.\d+")}
    for name in METHODS[1:]:
        for g in grads:
            out[name].observe(g)
    return out


def _double(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).double()


def accuracy(s: Settings, net: Net, w: dict, sols: dict[str, Any]) -> list[dict[str, Any]]:
    """Each method's ``u`` on the exact adapter system, per μ (module docstring)."""
    exact64 = not net.exact_products
    dtype = torch.float64 if exact64 else torch.float32
    losses = mae_bissl_losses(*(_double(w["pretext"]), _double(w["downstream"]))) \
        if exact64 else w["losses"]
    cast = lambda t: t.to(dtype)  # noqa: E731
    upper = {n: cast(t) for n, t in w["upper"].items()}
    lower = {n: cast(t) for n, t in w["lower"].items()}
    batch = (cast(w["lower_batch"][0]), w["lower_batch"][1])
    problems = {name: problem_for(w["losses"], sol) for name, sol in sols.items()}
    ops = {name: p.lower_hessian(w["upper"], w["lower"], w["lower_batch"])
           for name, p in problems.items()}
    exact = problem_for(losses, CG()) if exact64 else problems["BiSSL-CG"]
    operator = exact.lower_hessian(upper, lower, batch) if exact64 else ops["BiSSL-CG"]
    v32 = problems["global M-FAC"].upper_grad(w["upper"], w["lower"], w["upper_batch"], t=0,
                                              lower_hessian=ops["global M-FAC"]).rhs
    v = {n: cast(t) for n, t in v32.items()}
    rows = []
    for mu in (LAM + DAMPING, net.mu_small):
        system = exact.system(upper, lower, operator, mu)
        us = {name: sols[name](p.system(w["upper"], w["lower"], ops[name], mu), v32)[0]
              for name, p in problems.items()}
        if exact64:
            star, info = MINRES(max_iter=2000, tol=1e-10)(system, v)
        else:
            star, info = MINRES(max_iter=net.exact_products)(system, v)
        vn = float(tree_norm(v))
        star_res = float(tree_norm(tree_sub(v, system(star)))) / vn
        for name in METHODS:
            u = {n: cast(t) for n, t in us[name].items()}
            rows.append({"net": net.label, "mu": mu, "method": name,
                         "rel_residual": float(tree_norm(tree_sub(v, system(u)))) / vn,
                         "rel_error": float(tree_norm(tree_sub(u, star)) / tree_norm(star)),
                         "u_star_products": info.iterations, "u_star_residual": star_res,
                         "u_star_vs_v": float(tree_norm(tree_sub(star, v))) / vn})
    return rows


def _paired_cpu(fns: dict[str, Any], repeats: int) -> tuple[dict, dict]:
    """CPU and wall seconds of every callable, round-robin, after one unrecorded round."""
    for fn in fns.values():
        fn()
    names = list(fns)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            c0, w0 = time.process_time(), time.perf_counter()
            fns[name]()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return cpu, wall


def cost(s: Settings, net: Net, w: dict, sols: dict[str, Any]) -> dict[str, Any]:
    """Seconds of one upper step over one downstream gradient, and peak memory (docstring)."""
    problems = {name: problem_for(w["losses"], sol) for name, sol in sols.items()}
    upper, lower, lb, ub = w["upper"], w["lower"], w["lower_batch"], w["upper_batch"]
    head = {n: t for n, t in upper.items()}
    held: dict[str, Any] = {}

    def grad() -> None:
        live = {n: t.clone().requires_grad_() for n, t in head.items()}
        torch.autograd.grad(w["losses"].downstream(live, ub), list(live.values()))

    def first(name: str) -> Any:
        def run() -> None:
            held[name] = problems[name].lower_hessian(upper, lower, lb)
            problems[name].upper_grad(upper, lower, ub, t=0, lower_hessian=held[name])
        return run

    def later(name: str) -> Any:
        return lambda: problems[name].upper_grad(upper, lower, ub, t=0,
                                                 lower_hessian=held[name])

    fns: dict[str, Any] = {"grad": grad}
    for name in METHODS:  # a later step right after its own first step (the kept graph held)
        fns[f"{name}/first"], fns[f"{name}/later"] = first(name), later(name)
    times, wall = _paired_cpu(fns, s.repeats)
    held.clear()
    out: dict[str, Any] = {"times": times, "wall_times": wall, "methods": {}}
    nu = s.upper_steps
    for name in METHODS:
        def amortised(i: int, name: str = name) -> float:
            return (times[f"{name}/first"][i] + (nu - 1) * times[f"{name}/later"][i]) / nu
        seconds = hb.median(amortised(i) for i in range(s.repeats))
        before, peak = peak_memory(first(name), "cpu", release=True)
        held.clear()
        window = sols[name].window if isinstance(sols[name], MFAC) else None
        window_bytes = 0 if window is None else sum(
            t.numel() * t.element_size() for d in (window.buffer, window.gram) for t in d.values())
        out["methods"][name] = {"step_over_grad": hb.ratio(times, amortised, "grad"),
                                "step_seconds": seconds, "peak_bytes": peak - before,
                                "window_bytes": window_bytes}
    out["grad_seconds"] = hb.median(times["grad"])
    cg = out["methods"]["BiSSL-CG"]
    for name in METHODS:
        m = out["methods"][name]
        m["cost_vs_cg"] = m["step_over_grad"] / cg["step_over_grad"]
        m["memory_vs_cg"] = m["peak_bytes"] / cg["peak_bytes"] if cg["peak_bytes"] else math.nan
    return out


def measure(s: Settings) -> dict[str, Any]:
    """Every network's cost and accuracy rows."""
    nets = []
    for net in s.nets:
        started = time.perf_counter()
        w = build(net, s.m)
        n = sum(int(w["lower"][k].numel()) for k in w["losses"].backbone)
        setup = time.perf_counter() - started
        c = cost(s, net, w, solvers(s, w["grads"]))
        acc = accuracy(s, net, w, solvers(s, w["grads"]))
        blocks = len(solvers(s, w["grads"])["block-wise M-FAC"].partition())
        nets.append({"net": net.label, "unknowns": n, "blocks": blocks, "setup_seconds": setup,
                     "cost": {k: v for k, v in c.items() if k not in ("times", "wall_times")},
                     "times": c["times"], "wall_times": c["wall_times"], "accuracy": acc})
        print(f"{net.label}: {n} adapter unknowns, done in {time.perf_counter() - started:.0f} s",
              flush=True)
    return {"nets": nets}


def report(results: dict[str, Any]) -> str:
    """The Markdown page."""
    s = results["settings"]
    lines = hb.header(f"## BiSSL upper step on LoRA ViTs: CG vs M-FAC (`{results['mode']}`)",
                   results)
    lines += [f"- settings: λ = {LAM}, λ_damp = {DAMPING} (μ = {LAM + DAMPING:g}), N_U = "
              f"{s['upper_steps']}, BiSSL-CG N_c = {s['cg_iters']} (exact Hessian over the "
              f"adapters, kept graph), M-FAC window m = {s['m']}; {s['repeats']} repeats", ""]
    for net_spec, net in zip(s["nets"], results["nets"]):
        c = net["cost"]
        cg = c["methods"]["BiSSL-CG"]
        lines += [f"### {net['net']}", "",
                  f"{net['unknowns']} adapter unknowns (rank {net_spec['rank']}, q and v), "
                  f"{net['blocks']} M-FAC blocks; {net_spec['image']} px, downstream batch "
                  f"{net_spec['batch']}, MAE batch {net_spec['lower_batch']}; one downstream "
                  f"gradient {c['grad_seconds']:.3f} CPU s.", ""]
        lines += hb.table_head("method", "upper step / gradient", "step CPU s", "cost vs CG",
                            "peak of a step (MiB)", "memory vs CG", "M-FAC window (MiB)",
                            "step + window vs CG")
        for name in METHODS:
            m = c["methods"][name]
            total = (m["peak_bytes"] + m["window_bytes"]) / cg["peak_bytes"] \
                if cg["peak_bytes"] else math.nan
            lines.append(hb.row(name, hb.fmt(m["step_over_grad"]), hb.fmt(m["step_seconds"], 3),
                             hb.fmt(m["cost_vs_cg"]), hb.fmt(m["peak_bytes"] / 2**20, 1),
                             hb.fmt(m["memory_vs_cg"]), hb.fmt(m["window_bytes"] / 2**20, 1),
                             hb.fmt(total)))
        acc = net["accuracy"]
        lines += ["", "| μ | method | rel. residual, exact system | ‖u − u*‖/‖u*‖ |",
                  "|---|---|---|---|"]
        for r in acc:
            lines.append(hb.row(f"{r['mu']:g}", r["method"], hb.fmt(r["rel_residual"]),
                             hb.fmt(r["rel_error"])))
        exact = "float64" if not net_spec["exact_products"] else "float32"
        for mu in sorted({r["mu"] for r in acc}, reverse=True):
            r0 = next(r for r in acc if r["mu"] == mu)
            lines.append(f"\nμ = {mu:g}: the exact system in {exact}, u* from "
                         f"{r0['u_star_products']} MINRES products, residual "
                         f"{hb.fmt(r0['u_star_residual'])}; ‖u* − v‖/‖v‖ = "
                         f"{hb.fmt(r0['u_star_vs_v'])}.")
        lines.append("")
    lines += ["Cost: the amortised upper step `(t_first + (N_U − 1) t_later)/N_U` over one "
              "gradient of the downstream loss, in CPU time (one thread), median over repeats "
              "timed round-robin. Memory: resident-set high-water mark over the resident set "
              "before the first upper step of an alternation (VmHWM − VmRSS), freed heap "
              "released first; the M-FAC window lives across steps and is listed apart. Ratios "
              "are M-FAC over BiSSL-CG.", ""]
    return "\n".join(lines)


def tiny_net(epochs: int, mu_small: float) -> Net:
    """The embedded recipe's tiny ViT (its batches of 64 at both levels)."""
    return Net("tiny ViT (embedded recipe)", 16, 64, 64, 4,
               dict(patch=4, depth=2, width=32, heads=2),
               dict(decoder_dim=32, decoder_depth=1, decoder_heads=2), epochs=epochs,
               mu_small=mu_small)


def b16_net(image: int, batch: int, lower_batch: int, products: int, mu_small: float) -> Net:
    """timm's ViT-B/16 at reduced resolution and batches, random weights, paper MAE decoder."""
    return Net(f"ViT-B/16 ({image} px, batches {batch} / {lower_batch})", image, batch,
               lower_batch, 64, dict(size="b16"),
               dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
               exact_products=products, mu_small=mu_small)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = hb.parser(__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny ViT only, 2 repeats")
    ap.add_argument("--tiny-epochs", type=int, default=10)
    ap.add_argument("--b16-image", type=int, default=64)
    ap.add_argument("--b16-batch", type=int, default=2, help="downstream batch")
    ap.add_argument("--b16-lower-batch", type=int, default=8,
                    help="MAE batch (the paper config's 256 : 64 is 4 : 1)")
    ap.add_argument("--b16-exact-products", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--m", type=int, default=20)
    ap.add_argument("--mu-small", type=float, default=0.1, help="the tiny ViT's second μ")
    ap.add_argument("--b16-mu-small", type=float, default=1.0, help="ViT-B/16's second μ")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="bissllight-cpu")
    args = ap.parse_args(argv)
    hb.set_threads(args.threads)
    nets = [tiny_net(args.tiny_epochs, args.mu_small)]
    if not args.quick:
        nets.append(b16_net(args.b16_image, args.b16_batch, args.b16_lower_batch,
                            args.b16_exact_products, args.b16_mu_small))
    s = Settings(nets=nets, m=args.m, repeats=2 if args.quick else args.repeats)
    started = time.perf_counter()
    command = "python benchmarks/bissllight_cost.py " + " ".join(argv if argv is not None
                                                                  else sys.argv[1:])
    results = hb.new_results(command.strip(), "cpu", s, mode="quick" if args.quick else "full")
    results.update(measure(s))
    hb.finish(results, started)
    md = report(results)
    hb.write_results(args.out, args.name, results, md)
    print(md)
    return results


if __name__ == "__main__":
    main()
