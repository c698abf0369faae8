"""The problems of benchopt's bilevel benchmark (Dagréou, Ablin, Vaiter & Moreau, NeurIPS 2022,
``benchopt/benchmark_bilevel``), rebuilt in PyTorch on data this machine has.

Every problem is ``min_x h(x) = f(x, y*(x))``, ``y*(x) = argmin_y g(x, y)`` with finite sums
``g = (1/n) Σ_i g_i`` and ``f = (1/m) Σ_j f_j`` written as ``f(x, y, batch)``, ``g(x, y, batch)``
over batches that follow SABA's sampler contract (a dict of rows with their ``"index"``), and a
converged reference computed here without the library: ``y*(x)`` (closed form or Newton), ``h``,
``∇h = ∇_x f − ∇²_xy g [∇²_yy g]⁻¹ ∇_y f`` (thesis Theorem 3.2), and the metrics the benchmark
reports, :meth:`BenchProblem.metrics`: ``value`` ``h(x)``, ``grad_norm2`` ``‖∇h(x)‖²``,
``inner_distance`` ``‖y − y*(x)‖²`` and ``test_error`` (``None`` for the quadratic).

- ``quadratic``: the simulated quadratic problem, ``g_i = ½ zᵀH_i z + ½ xᵀK_i x + xᵀC_i z
  + c_iᵀz + d_iᵀx`` with rank-one ``H_i``, ``K_i``, ``C_i`` drawn as benchopt's
  ``gen_matrices`` draws them (spectra in ``[μ, L]``, cross spectrum in ``[μ, L_cross]``), inner
  dimension 100, outer 10, ``n = 32768`` inner and ``m = 1024`` outer samples, ``μ = 0.1``,
  ``L = 1``, ``L_cross = 0.1`` (config ``quadratics_021424``); torch's generator, not JAX's, so
  the draw differs from benchopt's while the distribution is the same.
- ``ijcnn1`` and ``breast_cancer``: ℓ2-regularised binary logistic regression with one
  hyperparameter per feature, ``g(z, x) = mean log(1 + exp(−y aᵀz)) + ½ Σ_j e^{x_j} z_j²`` and
  ``f`` the unregularised validation loss; ijcnn1 is not on this machine, so a set of its shape
  (49,990 training rows × 22 features, a 91,701-row validation split as ``ijcnn1_test``, and a
  test split, classes 9:1 as in ijcnn1) is drawn by scikit-learn's ``make_classification``: 21
  standardised features and a constant one, which stands for the intercept the uncentred ijcnn1
  features allow; breast-cancer is scikit-learn's own (standardised, no intercept).
- ``digits_multilogreg``: multinomial logistic regression with one hyperparameter per class,
  ``½ Σ_k e^{x_k} ‖z_{:,k}‖²``, on scikit-learn's digits split 64/16/20 as benchopt splits
  covtype; metric test error.
- ``cleaning_{50,70,90}``: data hyper-cleaning with a linear softmax model,
  ``g(z, x) = mean σ(x_i) ℓ_i(z) + 0.2‖z‖²``, on digits with 50/70/90 % of the training labels
  replaced by a random class (as benchopt's MNIST set), ``f`` the clean validation loss; metric
  test error.

The classification problems are built in :mod:`benchmarks.bilevel_classification`; every problem
by name: :func:`benchmarks.bilevel_registry.build`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["BenchProblem", "cg", "quadratic_problem", "rows"]

F64 = torch.float64
Params = dict[str, Tensor]


@dataclass
class BenchProblem:
    """One benchmark problem: its objectives, data, start and converged reference.

    Attributes:
        name: key of :data:`benchmarks.bilevel_registry.PROBLEMS`.
        title: one line for tables.
        f: ``f(x, y, batch)``, the outer loss (a mean over the batch's rows).
        g: ``g(x, y, batch)``, the inner loss (a mean over the rows).
        x0: the starting outer point.
        y0: the starting inner point.
        inner: the inner data, rows and ``"index"``.
        outer: the outer data.
        solve: ``solve(x, y_warm) -> y*(x)`` to the rounding floor.
        hypergradient: ``(x, y*) -> ∇h(x)``.
        test_error: ``y -> error`` on the test split (``None`` for the quadratic).
        curvature_floor: ``x -> `` a lower bound of the smallest eigenvalue of ``∇²_yy g``.
        x_star: the minimiser of ``h`` where it is known in closed form (the quadratic).
        info: sizes and settings for the results file.
    """

    name: str
    title: str
    f: Callable[[Params, Params, Any], Tensor]
    g: Callable[[Params, Params, Any], Tensor]
    x0: Params
    y0: Params
    inner: dict[str, Tensor]
    outer: dict[str, Tensor]
    solve: Callable[[Params, Params | None], Params]
    hypergradient: Callable[[Params, Params], Params]
    test_error: Callable[[Params], float] | None
    curvature_floor: Callable[[Params], float]
    x_star: Params | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_inner(self) -> int:
        """The number of inner samples."""
        return int(self.inner["index"].shape[0])

    @property
    def n_outer(self) -> int:
        """The number of outer samples."""
        return int(self.outer["index"].shape[0])

    def metrics(self, x: Params, y: Params, y_warm: Params | None = None) -> dict[str, Any]:
        """``value``, ``grad_norm2``, ``inner_distance``, ``test_error`` at ``(x, y)``, and
        ``y_star`` (for the next warm start)."""
        with torch.no_grad():
            y_star = self.solve(x, y_warm)
            grad = self.hypergradient(x, y_star)
            out = {"value": float(self.f(x, y_star, self.outer)),
                   "grad_norm2": float(sum(float((t ** 2).sum()) for t in grad.values())),
                   "inner_distance": float(sum(float(((y[n] - y_star[n]) ** 2).sum())
                                               for n in y)),
                   "test_error": None if self.test_error is None else self.test_error(y)}
        return {**out, "y_star": y_star}


def rows(data: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """The batch of rows ``index`` (with their ``"index"``)."""
    return {k: t[index] for k, t in data.items()}


def cg(matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None,
       tol: float = 1e-12, max_iter: int = 10_000) -> Tensor:
    """Conjugate gradients on flat float64 tensors (the references' own solver)."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x)
    p, rs = r.clone(), float(r @ r)
    stop = (tol * float(b.norm())) ** 2
    for _ in range(max_iter):
        if rs <= stop:
            break
        ap = matvec(p)
        alpha = rs / float(p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        rs_new = float(r @ r)
        p, rs = r + (rs_new / rs) * p, rs_new
    return x


# -- the quadratic -------------------------------------------------------------------------------


def _root(gen: torch.Generator, dim: int, spectrum: Tensor) -> Tensor:
    """``U diag(√spectrum) Uᵀ`` with ``U`` the singular vectors of a Gaussian column."""
    u = torch.linalg.svd(torch.randn(dim, 1, generator=gen, dtype=F64), full_matrices=True)[0]
    return (u * spectrum.sqrt()) @ u.T


def _log_spectrum(low: float, high: float, k: int) -> Tensor:
    return torch.logspace(math.log10(low), math.log10(high), k, dtype=F64)


def _quadratic_rows(gen: torch.Generator, n: int, p: int, d: int, l_inner: float,
                    l_outer: float, l_cross: float, mu: float) -> dict[str, Tensor]:
    """benchopt's ``gen_matrices``: ``H_i = a_i a_iᵀ``, ``K_i = b_i b_iᵀ``,
    ``C_i = (U D ξ_i)(V ξ_i)ᵀ``, ``c_i``, ``d_i`` standard normal."""
    a = torch.randn(n, p, generator=gen, dtype=F64) @ _root(gen, p, _log_spectrum(mu, l_inner, p))
    outer_spec = torch.cat([torch.zeros(1, dtype=F64), _log_spectrum(mu, l_outer, d - 1)])
    b = torch.randn(n, d, generator=gen, dtype=F64) @ _root(gen, d, outer_spec)
    u, _, vh = torch.linalg.svd(torch.randn(d, p, generator=gen, dtype=F64))
    k = min(d, p)
    dmat = torch.zeros(d, p, dtype=F64)
    dmat[:k, :k] = torch.diag(_log_spectrum(mu, l_cross, k))
    xi = torch.randn(n, p, generator=gen, dtype=F64)
    return {"a": a, "b": b, "u": xi @ (u @ dmat).T, "w": xi @ vh.T,
            "c": torch.randn(n, p, generator=gen, dtype=F64),
            "d": torch.randn(n, d, generator=gen, dtype=F64), "index": torch.arange(n)}


def _quadratic_loss(x: Params, y: Params, batch: dict[str, Tensor]) -> Tensor:
    z, xx = y["z"], x["x"]
    return (0.5 * (batch["a"] @ z).square() + 0.5 * (batch["b"] @ xx).square()
            + (batch["u"] @ xx) * (batch["w"] @ z) + batch["c"] @ z + batch["d"] @ xx).mean()


def _means(s: dict[str, Tensor]) -> dict[str, Tensor]:
    n = s["a"].shape[0]
    return {"H": s["a"].T @ s["a"] / n, "K": s["b"].T @ s["b"] / n, "C": s["u"].T @ s["w"] / n,
            "c": s["c"].mean(0), "d": s["d"].mean(0)}


def quadratic_problem(dim_inner: int = 100, dim_outer: int = 10, n_inner: int = 32768,
                      n_outer: int = 1024, mu: float = 0.1, l_max: float = 1.0,
                      l_cross: float = 0.1, seed: int = 2442) -> BenchProblem:
    """The simulated quadratic (module docstring), redrawn (up to 20 times, as benchopt does)
    until the Hessian of ``h`` is positive definite.

    ``y*(x) = −H_g⁻¹(c̄_g + C_gᵀx)``, ``∇h(x) = K_f x + C_f y* + d̄_f − C_g H_g⁻¹(H_f y* + C_fᵀx
    + c̄_f)``; ``h`` is quadratic with Hessian ``M = K_f + JᵀH_f J + C_f J + (C_f J)ᵀ``,
    ``J = −H_g⁻¹C_gᵀ``, so ``x* = −M⁻¹∇h(0)``.
    """
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        inner = _quadratic_rows(gen, n_inner, dim_inner, dim_outer, l_max, l_max, l_cross, mu)
        outer = _quadratic_rows(gen, n_outer, dim_inner, dim_outer, l_max, l_max, l_cross, mu)
        g, f = _means(inner), _means(outer)
        jac = -torch.linalg.solve(g["H"], g["C"].T)
        hess = f["K"] + jac.T @ f["H"] @ jac + f["C"] @ jac + (f["C"] @ jac).T
        if float(torch.linalg.eigvalsh(hess)[0]) >= 1e-12:
            break
    else:
        raise ValueError("no draw gave a positive definite Hessian of h")

    def solve(x: Params, y_warm: Params | None = None) -> Params:
        return {"z": -torch.linalg.solve(g["H"], g["c"] + g["C"].T @ x["x"])}

    def hypergradient(x: Params, y: Params) -> Params:
        z, xx = y["z"], x["x"]
        grad_z = f["H"] @ z + f["C"].T @ xx + f["c"]
        grad_x = f["K"] @ xx + f["C"] @ z + f["d"]
        return {"x": grad_x - g["C"] @ torch.linalg.solve(g["H"], grad_z)}

    zero = {"x": torch.zeros(dim_outer, dtype=F64)}
    x_star = {"x": -torch.linalg.solve(hess, hypergradient(zero, solve(zero))["x"])}
    floor = float(torch.linalg.eigvalsh(g["H"])[0])
    return BenchProblem(
        "quadratic", f"quadratic: {dim_inner} inner, {dim_outer} outer, n = {n_inner}, "
        f"m = {n_outer}, mu = {mu:g}, L = {l_max:g}, L_cross = {l_cross:g}",
        _quadratic_loss, _quadratic_loss, zero, {"z": torch.zeros(dim_inner, dtype=F64)},
        inner, outer, solve, hypergradient, None, lambda x: floor, x_star,
        {"dim_inner": dim_inner, "dim_outer": dim_outer, "n_inner": n_inner, "n_outer": n_outer,
         "mu": mu, "L": l_max, "L_cross": l_cross, "seed": seed,
         "h_hessian_min_eig": float(torch.linalg.eigvalsh(hess)[0])})


# -- data ----------------------------------------------------------------------------------------


def _split(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Train/validation/test indices 64/16/20 (20 % test, then 20 % of the rest validation)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(0.2 * n)
    n_val = round(0.2 * (n - n_test))
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(t - mean) / std for t in (train, *others)]


def _table(features: Tensor, labels: Tensor) -> dict[str, Tensor]:
    return {"a": features, "t": labels, "index": torch.arange(len(labels))}
