"""``benchmarks/bissllight_cost.py`` at a micro size: its accuracy rows against dense float64
solves, its cost and memory rows, its report, and ``build_vit(size="b16")``."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import bissllight_cost as bc

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


MICRO = bc.Net("micro ViT", 8, 4, 6, 2, dict(patch=4, depth=2, width=8, heads=2),
               dict(decoder_dim=8, decoder_depth=1, decoder_heads=2), mu_small=0.3)
MUS = (10.001, 0.3)  # H's eigenvalues lie in ±0.25 here: I + H/μ positive definite, CG stable


@pytest.fixture(scope="module")
def micro():
    torch.set_num_threads(1)
    s = bc.Settings(nets=[MICRO], m=4, repeats=1)
    return s, bc.build(MICRO, s.m)


def _dense(w):
    """``H`` (float64, over the flat adapters at the lower point and the Hessian batch), ``v``,
    the flat gradients of the window, the adapter names and their block of each unknown."""
    losses = bc.mae_bissl_losses(bc._double(w["pretext"]), bc._double(w["downstream"]))
    names = losses.backbone
    lower = {n: t.to(F64) for n, t in w["lower"].items()}
    upper = {n: t.to(F64) for n, t in w["upper"].items()}
    shapes = [lower[n].shape for n in names]
    images, noise = w["lower_batch"]

    def unflat(z):
        out, o = {}, 0
        for n, shape in zip(names, shapes):
            k = shape.numel()
            out[n] = z[o:o + k].reshape(shape)
            o += k
        return out

    flat = torch.cat([lower[n].reshape(-1) for n in names])
    hess = torch.autograd.functional.hessian(
        lambda z: losses.pretext({**lower, **unflat(z)}, (images.to(F64), noise)), flat,
        vectorize=True)
    ux, uy = w["upper_batch"]
    v = torch.func.grad(lambda z: losses.downstream({**upper, **unflat(z)}, (ux.to(F64), uy)))(
        flat)
    grads = torch.stack([torch.cat([g[n].reshape(-1).to(F64) for n in names])
                         for g in w["grads"]])
    block = torch.cat([torch.full((lower[n].numel(),), int(n.split("blocks.")[1].split(".")[0]))
                       for n in names])
    return hess, v, grads, block


def _cg(a, b, iters):
    """Textbook conjugate gradients from 0."""
    x, r = torch.zeros_like(b), b.clone()
    d = r.clone()
    for _ in range(iters):
        ad = a @ d
        alpha = (r @ r) / (d @ ad)
        x, r_new = x + alpha * d, r - alpha * ad
        d, r = r_new + (r_new @ r_new) / (r @ r) * d, r_new
    return x


def test_accuracy_rows_match_dense_solves(micro):
    s, w = micro
    rows = bc.accuracy(s, MICRO, w, bc.solvers(s, w["grads"]))
    hess, v, grads, block = _dense(w)
    n, k = hess.shape[0], grads.shape[0]
    assert {(r["mu"], r["method"]) for r in rows} == {(mu, m) for mu in MUS for m in bc.METHODS}
    for mu in MUS:
        a = torch.eye(n, dtype=F64) + hess / mu
        assert float(torch.linalg.eigvalsh(a)[0]) > 0.1
        star = torch.linalg.solve(a, v)
        fisher = grads.T @ grads / k
        blockwise = fisher * (block[:, None] == block[None, :])
        expected = {"BiSSL-CG": _cg(a, v, s.cg_iters),
                    "global M-FAC": torch.linalg.solve(torch.eye(n, dtype=F64) + fisher / mu, v),
                    "block-wise M-FAC": torch.linalg.solve(
                        torch.eye(n, dtype=F64) + blockwise / mu, v)}
        for r in (r for r in rows if r["mu"] == mu):
            u = expected[r["method"]]
            residual = float((v - a @ u).norm() / v.norm())
            error = float((u - star).norm() / star.norm())
            assert r["rel_residual"] == pytest.approx(residual, rel=2e-2, abs=1e-5), r
            assert r["rel_error"] == pytest.approx(error, rel=2e-2, abs=1e-5), r
            assert r["u_star_residual"] < 1e-6  # float32 inside the MAE loss
    # the two M-FAC variants differ here (the window's gradients couple the two blocks)
    by = {(r["mu"], r["method"]): r["rel_error"] for r in rows}
    assert by[(0.3, "global M-FAC")] != pytest.approx(by[(0.3, "block-wise M-FAC")], rel=1e-3)


def test_cost_rows_and_report(micro, tmp_path):
    s, w = micro
    c = bc.cost(s, MICRO, w, bc.solvers(s, w["grads"]))
    cg = c["methods"]["BiSSL-CG"]
    assert cg["cost_vs_cg"] == 1.0 and cg["window_bytes"] == 0
    n = sum(int(w["lower"][k].numel()) for k in w["losses"].backbone)
    for name in bc.METHODS:
        m = c["methods"][name]
        assert m["step_over_grad"] > 0 and math.isfinite(m["step_seconds"])
        assert m["peak_bytes"] >= 0
        if name != "BiSSL-CG":  # m gradients (float32) plus the m × m inner products per tensor
            tensors = len(w["losses"].backbone)
            assert m["window_bytes"] == s.m * n * 4 + tensors * s.m * s.m * 8
    results = bc.hb.new_results("test", "cpu", s, mode="quick")
    results["nets"] = [{"net": MICRO.label, "unknowns": n, "blocks": 2, "setup_seconds": 0.0,
                        "cost": c, "accuracy": []}]
    bc.hb.finish(results, 0.0)
    md = bc.report(results)
    assert "| block-wise M-FAC |" in md and "micro ViT" in md


def test_build_vit_b16_has_the_vit_base_layout():
    net = bc.build_vit(32, size="b16")
    assert len(net.blocks) == 12 and net.out_dim == 768 and net.patch == 16
    assert net.blocks[0].attn.num_heads == 12
    assert net.patch_embed.img_size == (32, 32)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(85.8e6, rel=0.01)
