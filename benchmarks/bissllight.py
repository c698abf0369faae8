"""Global vs block-wise M-FAC on the LoRA-coupled BiSSL system of a tiny ViT (BiSSLight setting).

The pretext model is the vision recipe's tiny ViT (16-px digits, patch 4, width 32, depth 2,
rank-4 LoRA on q and v; ``recipes/vision/vit.py``) with the MAE decoder
(``recipes/vision/mae.py``), its base weights MAE-pretrained for ``--epochs`` epochs and frozen.
The IJ system over the adapters is ``(I + H/μ) u = v`` (``H`` the MAE-loss Hessian over the
adapters, dense, float64), ``v`` the downstream-loss gradient. Its solution ``u*`` is compared
with M-FAC's ``u`` from a window of ``m`` MAE gradients, each on another masked batch at the
lower point: one global block, one block per layer (``blocks="layer"``: each LoRA matrix), and one
block per transformer block (``blocks=r"blocks\\.\\d+"``). Reported: ``‖u − u*‖/‖u*‖`` and the
solve time, per μ. (``F̂`` is an approximation of ``H``, so neither variant converges to ``u*``;
the table says which is nearer here.)

Run: ``python benchmarks/bissllight.py [--epochs 10] [--m 20]``. The cost and peak memory of
one upper step with each solver, on this ViT and on ViT-B/16: ``benchmarks/bissllight_cost.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from implicitbilevel import MFAC  # noqa: E402
from implicitbilevel.implicit_jacobian import IJSystem  # noqa: E402
from recipes.vision.mae import MAEPretext, MaskedBatches, pretrain_mae  # noqa: E402
from recipes.vision.models import Downstream  # noqa: E402
from recipes.vision.vit import add_lora, base_trainable, build_vit  # noqa: E402


class _Zero:
    """The curvature protocol with ``H = 0``: M-FAC reads only ``D`` and ``μ`` of the system."""

    def __init__(self, params):
        self.params, self.names, self.memo = params, list(params), {}

    def __call__(self, t):
        return {n: torch.zeros_like(t[n]) for n in self.names}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--m", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    model = MAEPretext(add_lora(build_vit(16), 4, ["q", "v"]), 16, 0.75)
    loader = [(x[i:i + 128], x[i:i + 128]) for i in range(0, 1024, 128)]
    with base_trainable(model.backbone):
        pretrain_mae(model, MaskedBatches(loader, 16, seed=0), epochs=args.epochs, lr=2e-3,
                     weight_decay=0.05, device=torch.device("cpu"))
    model = model.double()
    torch.manual_seed(1)
    with torch.no_grad():  # adapters away from B = 0, as after some lower steps
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    names = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    from torch.func import functional_call

    def loss(theta, images, noise):
        return functional_call(model, {**params, **theta}, (images, noise))

    theta = {n: params[n] for n in names}
    gen = torch.Generator().manual_seed(2)

    def batch():
        idx = torch.randint(0, 1024, (args.batch,), generator=gen)
        return x[idx].double(), torch.rand(args.batch, 16, generator=gen)

    grads = [torch.func.grad(loss)(theta, *batch()) for _ in range(args.m)]
    flat = torch.cat([t.reshape(-1) for t in theta.values()])
    like = {n: t.shape for n, t in theta.items()}

    def unflat(v):
        out, o = {}, 0
        for n, s in like.items():
            k = int(torch.Size(s).numel())
            out[n] = v[o:o + k].reshape(s)
            o += k
        return out

    hb = batch()
    h = torch.autograd.functional.hessian(lambda v: loss(unflat(v), *hb), flat, vectorize=True)
    down = Downstream(model.backbone, 10).double()
    dparams = dict(down.named_parameters())
    idx = torch.randperm(1797, generator=gen)[:64]
    live = {n: theta[n].clone().requires_grad_() for n in names}
    vloss = torch.nn.functional.cross_entropy(
        functional_call(down, {**dparams, **live}, (x[idx].double(),)), y[idx])
    v = {n: g.detach() for n, g in zip(names, torch.autograd.grad(vloss, list(live.values())))}
    vflat = torch.cat([v[n].reshape(-1) for n in names])
    rows = []
    for mu in [0.01, 0.1, 1.0, 10.0]:
        exact = torch.linalg.solve(torch.eye(len(flat), dtype=torch.float64) + h / mu, vflat)
        system = IJSystem(_Zero(theta), mu, identity=names)
        for label, blocks in [("global", None), ("per layer", "layer"),
                              ("per transformer block", r"blocks\.\d+")]:
            solver = MFAC(m=args.m, blocks=blocks)
            for g in grads:
                solver.observe(g)
            start = time.perf_counter()
            u, _ = solver(system, v)
            seconds = time.perf_counter() - start
            uflat = torch.cat([u[n].reshape(-1) for n in names])
            rows.append({"mu": mu, "mfac": label, "blocks": len(solver.partition()),
                         "rel_err": float((uflat - exact).norm() / exact.norm()),
                         "solve_ms": 1e3 * seconds})
    print(f"{len(flat)} adapter unknowns, m = {args.m}")
    print(f"{'mu':>6}  {'M-FAC':<22} {'blocks':>6}  {'|u-u*|/|u*|':>11}  {'solve ms':>8}")
    for r in rows:
        print(f"{r['mu']:>6g}  {r['mfac']:<22} {r['blocks']:>6}  {r['rel_err']:>11.4f}  "
              f"{r['solve_ms']:>8.2f}")
    return rows


if __name__ == "__main__":
    main()
