"""The original BiSSL code's implicit-Jacobian computation, reproduced exactly.

For reproducing the thesis's published numbers (Tables 6.1, 6.3, 6.4, F.1-F.8), which were made
with it. Starting from ``x₀ = 0``, ``r₀ = d₀ = b``, it runs exactly ``N_c`` iterations of

.. math::

    \\alpha_k = \\frac{r_k^\\top r_k}{d_k^\\top A d_k + \\epsilon}, \\quad
    x_k \\mathrel{+}= \\alpha_k d_k, \\quad r_k' = r_k - \\alpha_k (A d)_k, \\quad
    \\beta_k = \\frac{r_k'^\\top r_k'}{r_k^\\top r_k + \\epsilon}, \\quad
    d_k \\leftarrow r_k' + \\beta_k d_k

separately for every parameter tensor ``k`` while the product ``A d`` couples all of them
(``ε = 10⁻¹²``), whatever the curvature ``dᵀAd`` turns out to be, and replaces non-finite entries
of the result as ``torch.nan_to_num`` does (NaN by 0, ±∞ by the largest finite values).

It is a heuristic, not CG on the full system: on an indefinite system (the exact Hessian of a
network away from a lower minimum) it runs on where :class:`~implicitbilevel.CG` stops and
:class:`~implicitbilevel.MINRES` keeps minimising the residual. What this implementation does not
copy: the original recomputed the forward pass for every product and left BatchNorm in training
mode, so every product also moved the running statistics; here products never touch them.
Repairs are reported: when non-finite values were replaced, ``SolveInfo.breakdown`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_int
from ..tree import Params, tree_block_dots, tree_clone, tree_norm, tree_zeros_like
from .base import LinearSolver, MatVec, SolveInfo, check_real

__all__ = ["OriginalBiSSLCG"]


@dataclass
class OriginalBiSSLCG(LinearSolver):
    """``A x = b`` by the original BiSSL code's per-tensor CG (the module docstring's recurrence).

    Attributes:
        max_iter: ``N_c``, the number of iterations (= products; thesis: 5).
        eps: the ``ε`` added to both denominators (the original: ``1e-12``).

    Diagnostics: ``iterations = max_iter``; ``residual_norm`` from the recurrence (``‖r‖`` over
    all blocks; the trainer measures the true residual); ``converged`` is ``False`` (there is no
    stopping test); ``breakdown`` names the non-finite entries that were replaced, if any.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> b = {"w": torch.tensor([1.0, -1.0], dtype=torch.float64)}
        >>> x, info = ib.OriginalBiSSLCG(max_iter=2)(lambda v: {"w": Q @ v["w"]}, b)
        >>> torch.allclose(x["w"], torch.linalg.solve(Q, b["w"]))   # CG is exact after n = 2 steps
        True
    """

    max_iter: int = 5
    eps: float = 1e-12

    def __post_init__(self) -> None:
        check_int(self.max_iter, "max_iter", 1)
        check_real(self.eps, "eps")

    def __call__(
        self, matvec: MatVec, b: Mapping[str, Tensor], x0: Mapping[str, Tensor] | None = None
    ) -> tuple[Params, SolveInfo]:
        """Run the recurrence from ``x₀ = 0`` (``x0`` is ignored, as in the original)."""
        b = dict(b)
        keys = list(b)
        x, r, d = tree_zeros_like(b), tree_clone(b), tree_clone(b)
        for _ in range(self.max_iter):
            ad = matvec(d)
            rs = tree_block_dots(r, r)
            alpha = rs / (tree_block_dots(d, ad) + self.eps)
            x = dict(zip(keys, torch._foreach_add(
                [x[k] for k in keys], torch._foreach_mul([d[k] for k in keys], alpha.unbind()))))
            r = dict(zip(keys, torch._foreach_sub(
                [r[k] for k in keys], torch._foreach_mul([ad[k] for k in keys], alpha.unbind()))))
            beta = tree_block_dots(r, r) / (rs + self.eps)
            d = dict(zip(keys, torch._foreach_add(
                [r[k] for k in keys], torch._foreach_mul([d[k] for k in keys], beta.unbind()))))
        finite = torch.stack([torch.isfinite(x[k]).all() for k in keys])
        breakdown = None
        if not bool(finite.all()):
            bad = [k for k, ok in zip(keys, finite.tolist()) if not ok]
            breakdown = (f"non-finite values in {bad[:5]} replaced as torch.nan_to_num does (the "
                         "original BiSSL code's repair)")
            x = {k: torch.nan_to_num(t) for k, t in x.items()}
        rhs_norm = float(tree_norm(b))
        residual = float(tree_norm(r))
        if breakdown is None and not math.isfinite(residual):
            breakdown = "non-finite residual"
        return x, SolveInfo(self.max_iter, residual, rhs_norm, False, breakdown)
