"""The references every method is measured against.

- :func:`reference_upper_step`: the scheme of the original BiSSL code, transcribed: forward pass
  and ``autograd.grad(create_graph=True)`` recomputed for every Hessian-vector product, block-wise
  (layer-wise) CG, ``α`` and ``β`` per parameter tensor, written as a Python loop over the tensors.
  The baseline of :mod:`benchmarks.run` and :mod:`benchmarks.robust_ij`, on the same
  :class:`~benchmarks.peers.PeerResult` as the peers.
- :func:`block_minimum_residual`: converged solutions of ``A X = B`` for several right-hand sides
  at once; :func:`converged_solutions` runs it in float64 on the exact-Hessian IJ systems of an
  alternation (the ``u*`` of :mod:`benchmarks.robust_ij`), :func:`cached_solutions` keeps them on
  disk under :func:`system_key`, a digest of the systems.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from implicitbilevel import BilevelProblem, Params

from .peers import PeerResult, assemble, upper_gradients
from .workloads import BiSSLWorkload

__all__ = [
    "block_minimum_residual",
    "cached_solutions",
    "converged_solutions",
    "flat",
    "reference_upper_step",
    "relative_residual",
    "system_key",
    "unflat_batch",
]


# -- the original BiSSL scheme -------------------------------------------------------------------


def reference_upper_step(w: BiSSLWorkload, max_iter: int = 5) -> PeerResult:
    """The original BiSSL code's scheme: recomputed double backward, per-tensor block-wise CG."""
    grad_x, v, _ = upper_gradients(w)
    names = w.backbone
    fixed = {n: p.detach() for n, p in w.lower.items()}
    params = [fixed[n].clone().requires_grad_(True) for n in names]

    def hvp(vec: list[Tensor]) -> list[Tensor]:
        # Forward and first backward recomputed for every product, as the original code does.
        loss = w.lower_loss({**fixed, **dict(zip(names, params))}, w.lower_batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        products = torch.autograd.grad(grads, params, grad_outputs=vec)
        return [vi + hi.detach() / w.mu for vi, hi in zip(vec, products)]

    b = [v[n].detach() for n in names]
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    for _ in range(max_iter):
        ap = hvp(p)
        for i in range(len(names)):  # block-wise CG: α and β per parameter tensor
            rs = torch.sum(r[i] * r[i])
            curvature = torch.sum(p[i] * ap[i])
            alpha = rs / curvature if bool(curvature != 0) else torch.zeros_like(rs)
            x[i] = x[i] + alpha * p[i]
            r_new = r[i] - alpha * ap[i]
            rs_new = torch.sum(r_new * r_new)
            beta = rs_new / rs if bool(rs != 0) else torch.zeros_like(rs)
            p[i] = r_new + beta * p[i]
            r[i] = r_new
    u = dict(zip(names, x))
    return PeerResult(assemble({n: g.detach() for n, g in grad_x.items()}, u), u,
                      {n: t.detach() for n, t in v.items()})


# -- converged solutions -------------------------------------------------------------------------


def flat(tree: Mapping[str, Tensor], names: list[str]) -> Tensor:
    """The tensors of ``names`` as one flat vector."""
    return torch.cat([tree[n].detach().reshape(-1) for n in names])


def relative_residual(system: Callable[[Params], Params], u: Mapping[str, Tensor],
                      v: Mapping[str, Tensor], names: list[str]) -> float:
    """``‖v − A u‖/‖v‖`` over ``names`` in float64 (one product of ``system``)."""
    au = system({n: u[n] for n in names})
    return float(flat({n: v[n] - au[n] for n in names}, names).double().norm()
                 / flat(v, names).double().norm())


def unflat_batch(flat_rows: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Rows of flat vectors (``b × n``) as a dict of batched tensors shaped like ``like``."""
    sizes = [t.numel() for t in like.values()]
    b = flat_rows.shape[0]
    return {name: chunk.reshape(b, *ref.shape)
            for (name, ref), chunk in zip(like.items(), torch.split(flat_rows, sizes, dim=1))}


def block_minimum_residual(
    products: Callable[[Tensor], Tensor], rhs: Tensor, tol: float = 1e-8,
    max_products: int = 2000, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Minimum-residual solutions of ``A X = B`` over the block Krylov space of ``B``.

    ``rhs`` holds the right-hand sides as rows (``k × n``); ``products(Q)`` returns ``A Q`` for a
    block of rows. The orthonormal basis ``Q`` of ``span{B, AB, A²B, …}`` is built block by block
    with full reorthogonalisation (two passes of classical Gram–Schmidt), every product ``A Q`` is
    kept, and after every block each ``x_i = Qᵀc_i`` minimises ``‖b_i − A Qᵀ c_i‖`` (a small dense
    least-squares problem on ``Q_ext (A Q)ᵀ``, where ``Q_ext`` adds the next block). The residuals
    are formed explicitly from the stored products, ``b_i − (AQ)ᵀ c_i``, not from a recurrence.
    For a symmetric ``A`` this is block MINRES; the shared space serves all right-hand sides, so
    eigen-directions that slow a single MINRES down are found once for all of them.

    Stops when every relative residual is at most ``tol``, after ``max_products`` products or
    when the space is invariant. Returns ``x`` (``k × n``), the relative residuals and the
    number of products.
    """
    k, n = rhs.shape
    norms = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    q_buf = rhs.new_empty(max(4 * k, 64), n)
    aq_buf = torch.empty_like(q_buf)
    gram = torch.zeros(0, 0, dtype=torch.float64)  # Q_all (AQ_all)ᵀ, on the CPU
    proj = torch.zeros(0, k, dtype=torch.float64)  # Q_all Bᵀ
    basis, _ = torch.linalg.qr(rhs.T)
    block = basis.T.contiguous()
    m = 0
    history: list[tuple[int, float]] = []
    while True:
        b = block.shape[0]
        if m + b > q_buf.shape[0]:  # grow the stores geometrically
            grow = max(2 * q_buf.shape[0], m + b)
            q_buf = torch.cat([q_buf[:m], rhs.new_empty(grow - m, n)])
            aq_buf = torch.cat([aq_buf[:m], rhs.new_empty(grow - m, n)])
        aq = products(block)
        q_buf[m:m + b] = block
        aq_buf[m:m + b] = aq
        # Extend the projected matrix: new rows Q_new (AQ_all)ᵀ and new columns Q_old AQ_newᵀ.
        rows = (block @ aq_buf[:m + b].T).double().cpu()
        cols = (q_buf[:m] @ aq.T).double().cpu()
        gram = torch.cat([torch.cat([gram, cols], dim=1), rows])
        proj = torch.cat([proj, (block @ rhs.T).double().cpu()])
        m += b
        q_all, aq_all = q_buf[:m], aq_buf[:m]
        w = aq.clone()
        for _ in range(2):
            w -= (w @ q_all.T) @ q_all
        q_new, r_new = torch.linalg.qr(w.T)
        scale = float(aq.norm(dim=1).max())
        keep = r_new.diagonal().abs() > 1e-10 * max(scale, 1e-300)
        q_new = q_new.T[keep].contiguous()
        # T = Q_ext (AQ_all)ᵀ: the projected rows plus the next block's rows.
        t = torch.cat([gram, (q_new @ aq_all.T).double().cpu()])
        rhs_proj = torch.cat([proj, torch.zeros(q_new.shape[0], k, dtype=torch.float64)])
        coef = torch.linalg.lstsq(t, rhs_proj, driver="gelsy").solution.to(rhs)
        residual = rhs - coef.T @ aq_all
        rel = residual.norm(dim=1) / norms
        worst = float(rel.max())
        history.append((m, worst))
        if log is not None:
            log(f"    reference: {m} products, max relative residual {worst:.2e}")
        if worst <= tol or m >= max_products or q_new.shape[0] == 0:
            return {"x": coef.T @ q_all, "relative_residuals": rel.tolist(), "products": m,
                    "history": history, "converged": worst <= tol}
        block = q_new


def converged_solutions(problem: BilevelProblem, upper: Params, lower: Params, lower_batch: Any,
                        names: list[str], mu: float, rhs_flat: Tensor, tol: float,
                        max_products: int) -> tuple[Tensor, dict[str, Any]]:
    """``u*`` of the exact-Hessian systems ``(I + H/μ) u = v_i`` of ``problem`` (built in
    float64), one row per right-hand side of ``rhs_flat``, by :func:`block_minimum_residual`;
    and how it was obtained (products, residuals checked once more with fresh products)."""
    t0 = time.perf_counter()
    h64 = problem.lower_hessian(upper, lower, lower_batch)
    like64 = {n: h64.params[n] for n in names}

    def products64(q: Tensor) -> Tensor:
        out = h64.batched(unflat_batch(q, like64))
        return q + torch.cat([out[n].reshape(q.shape[0], -1) for n in names], dim=1) / mu

    b = rhs_flat.to(next(iter(like64.values())).device)
    ref = block_minimum_residual(products64, b, tol, max_products)
    u_star = ref["x"]
    # The residual of u* measured once more, with fresh products.
    check = (b - products64(u_star)).norm(dim=1) / b.norm(dim=1)
    return u_star, {
        "method": "block minimum residual over the right-hand sides, float64, full "
                  "reorthogonalisation",
        "products": ref["products"], "products_per_rhs": ref["products"] / b.shape[0],
        "tol": tol, "converged": ref["converged"],
        "relative_residual_max": float(check.max()),
        "relative_residuals": check.tolist(),
        "u_star_minus_v_over_v": float(((u_star - b).norm(dim=1) / b.norm(dim=1)).median()),
        "history": ref["history"],
        "seconds": time.perf_counter() - t0,
    }


def system_key(lower: Params, lower_batch: Any, rhs_flat: Tensor, *settings: Any) -> str:
    """A digest of one set of IJ systems: the lower point and batch, the right-hand sides and
    ``settings`` (μ and the reference's tolerance: the converged solutions are cached under it)."""
    h = hashlib.sha256()

    def add(x: Any) -> None:
        if isinstance(x, Tensor):
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(x, (tuple, list)):
            for t in x:
                add(t)

    for name in sorted(lower):
        h.update(name.encode())
        add(lower[name])
    add(lower_batch)
    add(rhs_flat)
    h.update(repr(settings).encode())
    return h.hexdigest()[:24]


def cached_solutions(cache: str | os.PathLike | None, key: str,
                     compute: Callable[[], tuple[Tensor, dict[str, Any]]],
                     log: Callable[[str], None], tag: str) -> tuple[Tensor, dict[str, Any]]:
    """``compute()``'s ``(u*, how)``, kept as ``<cache>/<key>.pt`` (no cache: always computed)."""
    path = (Path(cache) / f"{key}.pt") if cache else None
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        u_star, reference = saved["u_star"], json.loads(saved["reference"])
        reference["cached"] = str(path)
        log(f"  {tag} converged reference: loaded from {path}")
        return u_star, reference
    log(f"  {tag} converged reference (float64, block minimum residual) ...")
    u_star, reference = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"u_star": u_star.cpu(), "reference": json.dumps(reference)}, tmp)
        os.replace(tmp, path)
    return u_star, reference
