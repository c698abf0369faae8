"""Bilevel problems defined by others, with their hypergradients computed without the library.

Both are problems of the benchopt bilevel benchmark (Dagréou, Ablin, Vaiter & Moreau, NeurIPS
2022, ``benchopt/benchmark_bilevel``), rebuilt from its published definition:

- :func:`quadratic_problem`: the *quadratic bilevel problem*. Inner and outer objectives are
  finite sums of quadratics over ``n`` samples,

  .. math::

      g(z, x) = \\frac1n \\sum_i \\tfrac12 z^\\top H^z_i z + \\tfrac12 x^\\top H^x_i x
                + x^\\top C_i z + c_i^\\top z + d_i^\\top x,

  and ``f`` the same form with its own samples. Every ``H_i`` is a rank-one empirical
  correlation ``a_i a_iᵀ`` of a Gaussian whose covariance has a log-spaced spectrum in
  ``[μ, L]``; ``C_i = (U D ξ_i)(V ξ_i)ᵀ`` with log-spaced singular values ``D`` in
  ``[μ, L_cross]``; ``c_i, d_i`` standard normal. Defaults are the benchmark's (``μ = 0.1``,
  ``L = 1``, ``L_cross = 0.1``, 100 inner and 100 outer unknowns, 1024 samples each).
- :func:`logistic_problem`: the *regularisation selection* problem with per-feature penalties,
  ``g(w, a) = mean log-loss on the training split + ½ Σ_j exp(a_j) w_j²`` and ``f`` the
  validation log-loss (Pedregosa 2016, "HOAG"), on scikit-learn's bundled breast-cancer data:
  the data, objective and Newton inner solver of ``examples/logreg_feature_penalties.py``.

The hypergradient (thesis Theorem 3.2, eq. 3.2-3.3),
``dF/dx = ∇_x f − ∇²_xy g [∇²_yy g]⁻¹ ∇_y f``, is computed here from the closed-form
matrices in float64 (no autograd, no library solver): the reference every method is measured
against.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["ExternalProblem", "logistic_problem", "quadratic_problem"]

F64 = torch.float64
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclass
class ExternalProblem:
    """One bilevel problem at a fixed outer point ``x`` with its inner solution ``y = y*(x)``.

    Attributes:
        name: short key (``"quadratic"``, ``"logreg"``).
        title: one line for tables and plots.
        inner: ``g(y, x) -> scalar`` over flat float64 tensors.
        outer: ``f(y, x) -> scalar``.
        x: the outer point.
        y: the inner solution at ``x``.
        reference: ``dF/dx`` from the closed-form matrices (float64, without the library).
        hessian: ``∇²_yy g`` at ``(y, x)``, dense (for its spectrum: Neumann's step and the
            Nyström split are set from it).
        jax_functions: ``() -> (g, f)``, the same objectives in ``jax.numpy`` for JAXopt.
        info: sizes and settings recorded with the results.
    """

    name: str
    title: str
    inner: Callable[[Tensor, Tensor], Tensor]
    outer: Callable[[Tensor, Tensor], Tensor]
    x: Tensor
    y: Tensor
    reference: Tensor
    hessian: Tensor
    jax_functions: Callable[[], tuple[Callable, Callable]]
    info: dict[str, Any] = field(default_factory=dict)

    def eigenvalues(self) -> tuple[float, float]:
        """Smallest and largest eigenvalue of ``∇²_yy g``."""
        ev = torch.linalg.eigvalsh(self.hessian)
        return float(ev[0]), float(ev[-1])


# -- the quadratic problem -------------------------------------------------------------------


def _root_of_spectrum(gen: torch.Generator, dim: int, low: float, high: float) -> Tensor:
    """A symmetric ``S`` whose square has eigenvalues log-spaced in ``[low, high]``."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
    s = torch.logspace(math.log10(low) / 2, math.log10(high) / 2, dim, dtype=F64)
    return (q * s) @ q.T


def _quadratic_samples(gen: torch.Generator, n: int, p: int, d: int, l_inner: float,
                       l_outer: float, l_cross: float, mu: float) -> dict[str, Tensor]:
    """Per-sample factors: ``H^z_i = a_i a_iᵀ``, ``H^x_i = b_i b_iᵀ``, ``C_i = P_i Q_iᵀ``."""
    a = torch.randn(n, p, generator=gen, dtype=F64) @ _root_of_spectrum(gen, p, mu, l_inner)
    b = torch.randn(n, d, generator=gen, dtype=F64) @ _root_of_spectrum(gen, d, mu, l_outer)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=F64))
    m = min(p, d)
    singular = torch.logspace(math.log10(mu), math.log10(l_cross), m, dtype=F64)
    xi = torch.randn(n, p, generator=gen, dtype=F64)
    return {"a": a, "b": b, "P": (xi[:, :m] * singular) @ u[:, :m].T, "Q": xi @ v.T,
            "c": torch.randn(n, p, generator=gen, dtype=F64),
            "d": torch.randn(n, d, generator=gen, dtype=F64)}


def _quadratic_value(s: dict[str, Tensor], z: Tensor, x: Tensor) -> Tensor:
    """``(1/n) Σ_i ½(a_i·z)² + ½(b_i·x)² + (P_i·x)(Q_i·z) + c_i·z + d_i·x``."""
    return (0.5 * (s["a"] @ z).square() + 0.5 * (s["b"] @ x).square()
            + (s["P"] @ x) * (s["Q"] @ z) + s["c"] @ z + s["d"] @ x).mean()


def _quadratic_means(s: dict[str, Tensor]) -> dict[str, Tensor]:
    """``H^z = mean a aᵀ``, ``H^x``, ``C = mean P Qᵀ`` (``d × p``), ``c̄``, ``d̄``."""
    n = s["a"].shape[0]
    return {"Hz": s["a"].T @ s["a"] / n, "Hx": s["b"].T @ s["b"] / n, "C": s["P"].T @ s["Q"] / n,
            "c": s["c"].mean(0), "d": s["d"].mean(0)}


def quadratic_problem(dim_inner: int = 100, dim_outer: int = 100, n_samples: int = 1024,
                      mu: float = 0.1, l_max: float = 1.0, l_cross: float = 0.1,
                      seed: int = 2442) -> ExternalProblem:
    """The benchopt quadratic bilevel problem at a random outer point (see the module docstring).

    ``z*(x) = −(H^z_g)⁻¹(c̄_g + C_gᵀ x)`` in closed form, and
    ``dF/dx = H^x_f x + C_f z* + d̄_f − C_g (H^z_g)⁻¹ (H^z_f z* + C_fᵀ x + c̄_f)``.
    """
    gen = torch.Generator().manual_seed(seed)
    inner_s = _quadratic_samples(gen, n_samples, dim_inner, dim_outer, l_max, l_max, l_cross, mu)
    outer_s = _quadratic_samples(gen, n_samples, dim_inner, dim_outer, l_max, l_max, l_cross, mu)
    g, f = _quadratic_means(inner_s), _quadratic_means(outer_s)
    x = torch.randn(dim_outer, generator=gen, dtype=F64)
    z = -torch.linalg.solve(g["Hz"], g["c"] + g["C"].T @ x)
    grad_z_f = f["Hz"] @ z + f["C"].T @ x + f["c"]
    grad_x_f = f["Hx"] @ x + f["C"] @ z + f["d"]
    reference = grad_x_f - g["C"] @ torch.linalg.solve(g["Hz"], grad_z_f)

    def jax_functions() -> tuple[Callable, Callable]:
        import jax.numpy as jnp

        def make(s: dict[str, Tensor]) -> Callable:
            a, b, p, q, c, d = (jnp.asarray(s[k].numpy()) for k in ("a", "b", "P", "Q", "c", "d"))

            def value(zz: Any, xx: Any) -> Any:
                return jnp.mean(0.5 * (a @ zz) ** 2 + 0.5 * (b @ xx) ** 2 + (p @ xx) * (q @ zz)
                                + c @ zz + d @ xx)
            return value

        return make(inner_s), make(outer_s)

    return ExternalProblem(
        name="quadratic",
        title=(f"benchopt quadratic: {dim_inner} inner, {dim_outer} outer unknowns, "
               f"{n_samples} samples, mu = {mu:g}, L = {l_max:g}, L_cross = {l_cross:g}"),
        inner=lambda zz, xx: _quadratic_value(inner_s, zz, xx),
        outer=lambda zz, xx: _quadratic_value(outer_s, zz, xx),
        x=x, y=z, reference=reference, hessian=g["Hz"], jax_functions=jax_functions,
        info={"dim_inner": dim_inner, "dim_outer": dim_outer, "n_samples": n_samples, "mu": mu,
              "L": l_max, "L_cross": l_cross, "seed": seed},
    )


# -- logistic regression with per-feature penalties ------------------------------------------


def load_example(name: str) -> Any:
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no example {EXAMPLES / (name + '.py')}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def logistic_problem(log_penalty: float = -3.0, spread: float = 1.0,
                     seed: int = 0) -> ExternalProblem:
    """Per-feature ℓ2 penalties of a logistic regression on breast-cancer (module docstring).

    The outer point is ``a_j = log_penalty + spread · N(0, 1)`` (seeded); ``w*(a)`` by Newton's
    method. With ``σ`` the sigmoid, ``X`` the training design (bias column last, unpenalised):
    ``∇²_ww g = Xᵀ diag(σ(1−σ)) X / n + diag(exp(a), 0)``,
    ``∇²_aw g = [diag(exp(a) ⊙ w_{:−1}), 0]``,
    ``∇_w f = X_valᵀ(σ(X_val w) − t_val)/n_val``, ``∇_a f = 0``, so
    ``dF/da = −exp(a) ⊙ w_{:−1} ⊙ [(∇²_ww g)⁻¹ ∇_w f]_{:−1}``.
    """
    ex = load_example("logreg_feature_penalties")
    data = ex.make_data(seed)
    dim = data["x_tr"].shape[1] - 1
    gen = torch.Generator().manual_seed(seed)
    a = log_penalty + spread * torch.randn(dim, generator=gen, dtype=F64)
    w = ex.solve_inner(a, data)
    w = ex.solve_inner(a, data, w)  # a second pass: Newton from w*, to the rounding floor
    xt, tt, xv, tv = data["x_tr"], data["t_tr"], data["x_val"], data["t_val"]
    prob = torch.sigmoid(xt @ w)
    hessian = (xt.T * (prob * (1 - prob))) @ xt / len(tt)
    hessian[:dim, :dim] += torch.diag(a.exp())
    grad_w_f = xv.T @ (torch.sigmoid(xv @ w) - tv) / len(tv)
    reference = -(a.exp() * w[:dim]) * torch.linalg.solve(hessian, grad_w_f)[:dim]

    def jax_functions() -> tuple[Callable, Callable]:
        import jax.numpy as jnp

        xt_j, tt_j, xv_j, tv_j = (jnp.asarray(t.numpy()) for t in (xt, tt, xv, tv))

        def log_loss(ww: Any, xx: Any, tt_: Any) -> Any:
            s = xx @ ww
            return jnp.mean(jnp.logaddexp(0.0, s) - tt_ * s)

        def inner(ww: Any, aa: Any) -> Any:
            return log_loss(ww, xt_j, tt_j) + 0.5 * jnp.sum(jnp.exp(aa) * ww[:-1] ** 2)

        return inner, lambda ww, aa: log_loss(ww, xv_j, tv_j)

    return ExternalProblem(
        name="logreg",
        title=(f"logistic regression, per-feature penalties, breast-cancer "
               f"({len(tt)} train / {len(tv)} validation, {dim + 1} weights, {dim} penalties)"),
        inner=lambda ww, aa: ex.inner_objective({"w": ww}, {"a": aa}, data),
        outer=lambda ww, aa: ex.log_loss(ww, xv, tv),
        x=a, y=w, reference=reference, hessian=hessian, jax_functions=jax_functions,
        info={"n_train": len(tt), "n_validation": len(tv), "weights": dim + 1,
              "penalties": dim, "log_penalty": log_penalty, "spread": spread, "seed": seed},
    )
