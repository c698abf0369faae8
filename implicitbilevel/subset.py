"""The implicit Jacobian over a named subset of the lower variables (thesis Sec. 9.1, third item).

Split the solved lower variables into a subset ``S`` (for a ResNet backbone: the BatchNorm affine
parameters) and the rest ``O``, and take the curvature of the lower loss outside ``S × S`` as zero,
``H ≈ [[H_SS, 0], [0, 0]]``. With the proximal regulariser (``∇²_yy r = I``, eq. 4.8-4.9) the
implicit-Jacobian system ``A u = v`` of :class:`~implicitbilevel.BilevelProblem`,
``A = I + H/μ``, becomes block diagonal:

.. math::

    \\Big(I + \\tfrac{1}{\\mu} H_{SS}\\Big) u_S = v_S, \\qquad u_O = v_O,

so the solve touches only ``H_SS`` (Hessian-vector products restricted to ``S``, the rest of the
lower point held fixed), the solver's vectors have the size of ``S``, and on ``O`` the implicit
Jacobian acts as the identity: the upper gradient still reaches every coupled name through the
proximal term. ``outside="zero"`` holds ``O`` fixed instead (``u_O = 0``): the lower solution is
assumed not to respond on ``O`` at all, so the proximal term passes no implicit gradient there and
only ``∇_x f`` remains.

For a general regulariser only ``outside="zero"`` is offered: it solves
``(∇²_SS r + H_SS/μ) u_S = v_S``, while ``u_O = v_O`` is the solution only where ``∇²_yy r`` is the
identity. Lower variables outside ``S`` that the regulariser does not couple (the pretext head with
``solve_over="all"``) get ``u = 0``: they never enter the mixed term ``∇_x ⟨∇_y r, u⟩``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor

from .tree import Params

__all__ = ["IJSubset", "Outside"]

Outside = Literal["identity", "zero"]


class IJSubset:
    """The lower variables an implicit-Jacobian solve is restricted to, and what ``u`` is elsewhere.

    Args:
        select: the names of ``S`` (an iterable of names, each of which must be solved over), or a
            predicate ``name -> bool`` over the solved names (e.g. ``re.compile(p).search``).
        outside: ``"identity"`` (``u = v`` on the coupled names outside ``S``) or ``"zero"``
            (``u = 0`` there, those names held fixed).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> def lower_loss(y, batch):                     # couples "a" and "b" through a product
        ...     return (y["a"] * y["b"]).sum() ** 2 + (y["a"] ** 2).sum() + (y["b"] ** 2).sum()
        >>> def upper_loss(x, y, batch):
        ...     return ((y["a"] - 1) ** 2).sum() + ((y["b"] + 1) ** 2).sum()
        >>> x = {n: torch.zeros(2, dtype=torch.float64, requires_grad=True) for n in "ab"}
        >>> y = {n: torch.full((2,), 0.5, dtype=torch.float64, requires_grad=True) for n in "ab"}
        >>> ij = ib.ImplicitJacobian(ib.Dense(), subset=["a"])   # solve over "a" only
        >>> isinstance(ij.ij_subset(), ib.IJSubset)
        True
        >>> problem = ib.BilevelProblem(upper_loss, lower_loss, lam=1.0,
        ...                             regularizer=ib.ProximalL2(), ij=ij)
        >>> out = problem.upper_grad(x, y, upper_batch=None, lower_batch=None)
        >>> sorted(out.u)                                  # the solve covers S = {"a"}
        ['a']
        >>> out.grads["b"].tolist()                       # u = v = 2 (y_b + 1) outside S
        [3.0, 3.0]
    """

    def __init__(
        self, select: Iterable[str] | Callable[[str], bool], outside: Outside = "identity"
    ) -> None:
        if isinstance(select, str):
            raise TypeError("subset (ij_subset): pass a list of parameter names or a predicate "
                            f"name -> bool (e.g. re.compile({select!r}).search), not a string")
        if outside not in ("identity", "zero"):
            raise ValueError(f"outside (ij_outside) must be 'identity' or 'zero', got {outside!r}")
        self.predicate = select if callable(select) else None
        self.listed = None if callable(select) else list(dict.fromkeys(select))
        if self.listed is not None and not self.listed:
            raise ValueError("subset (ij_subset): the list of names is empty")
        self.outside = outside

    def names(self, solved: list[str]) -> list[str]:
        """``S``: the selected names among ``solved``, in ``solved``'s order."""
        if self.listed is not None:
            unknown = [n for n in self.listed if n not in set(solved)]
            if unknown:
                raise KeyError(f"subset (ij_subset): {unknown[:5]} are not lower variables the "
                               f"implicit Jacobian is solved over (e.g. {solved[:3]})")
            chosen = set(self.listed)
            return [n for n in solved if n in chosen]
        names = [n for n in solved if self.predicate(n)]  # type: ignore[misc]
        if not names:
            raise ValueError("subset (ij_subset): the predicate selects none of the solved lower "
                             f"variables (e.g. {solved[:3]})")
        return names

    def complete(self, u: Mapping[str, Tensor], rhs: Mapping[str, Tensor],
                 coupled: Iterable[str]) -> Params:
        """``u`` over ``S`` extended to the coupled names: ``v`` there (identity) or zeros."""
        out = dict(u)
        for n in coupled:
            if n not in out:
                out[n] = rhs[n] if self.outside == "identity" else torch.zeros_like(rhs[n])
        return out
