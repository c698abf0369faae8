"""What :class:`~implicitbilevel.BilevelProblem` returns, and the checks on what it is given.

:class:`UpperGradient` and :class:`LowerGradient` carry a level's gradient dict (ready for
``torch.optim`` through :func:`assign_grads`) and what was computed on the way;
:class:`NonFiniteError` is raised on a NaN or infinite loss, solution or gradient. The helpers
below check a loss is a scalar and take gradients with respect to fresh leaves. The classes, the
error and :func:`assign_grads` are importable from :mod:`implicitbilevel.problem` and the package
as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .solvers import SolveInfo
from .system import IJSystem
from .tree import Params, tree_norm, tree_sub

__all__ = [
    "LAM_RHO",
    "LowerGradient",
    "NonFiniteError",
    "UpperGradient",
    "assign_grads",
]

#: The name under which a learnable λ's ``ρ`` is a problem parameter
#: (:attr:`BilevelProblem.params <implicitbilevel.BilevelProblem.params>`) and has its gradient in
#: :attr:`UpperGradient.grads`.
LAM_RHO = "lam.rho"


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite."""


@dataclass
class UpperGradient:
    """The upper-level hypergradient and what was computed on the way.

    Attributes:
        grads: ``dF/dx`` for every upper variable (same names as the upper dict), and ``dF/dp``
            for every parameter of the problem itself (``BilevelProblem.params``: ``"lam.rho"``
            for a :class:`~implicitbilevel.LearnableLambda`), so one :func:`assign_grads` over
            the upper dict and the problem's parameters serves them all.
        loss: ``f(x, y)``, detached.
        u: the implicit-Jacobian solution over the solved lower variables.
        info: the linear solver's diagnostics.
        lam: the λ used.
        rhs: the right-hand side ``v = ∇_{y_S} f`` of the solve.
        system: the implicit-Jacobian operator ``A`` that was solved with.
    """

    grads: Params
    loss: Tensor
    u: Params
    info: SolveInfo
    lam: float
    rhs: Params
    system: IJSystem

    @property
    def lam_grad(self) -> Tensor | None:
        """``dF/dρ`` of a learnable λ (``grads["lam.rho"]``), else ``None``."""
        return self.grads.get(LAM_RHO)

    def true_relative_residual(self) -> float:
        """``‖v − A u‖ / ‖v‖``, measured with one more product (0 when ``v = 0``).

        Unlike ``info.relative_residual`` (what the solver tracks) this is measured, so it is
        comparable across solvers; above 1, ``u`` is further from the solution than ``u = 0``.
        """
        rhs_norm = float(tree_norm(self.rhs))
        if rhs_norm == 0:
            return 0.0
        return float(tree_norm(tree_sub(self.rhs, self.system(self.u)))) / rhs_norm


@dataclass
class LowerGradient:
    """The lower-level gradient ``∇_y ℓ + λ ∇_y r`` and the loss terms.

    Attributes:
        grads: the gradient for every lower variable (same names as the lower dict).
        loss: ``ℓ(y)``, detached.
        regularizer: ``r(x, y)``, detached.
        lam: the λ used.
    """

    grads: Params
    loss: Tensor
    regularizer: Tensor
    lam: float


def assign_grads(params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
    """Write ``grads`` into ``params[name].grad`` so a ``torch.optim`` optimiser can step.

    Names in ``params`` without a gradient get ``None`` (the optimiser skips them).
    """
    for name, p in params.items():
        g = grads.get(name)
        p.grad = None if g is None else g.detach().to(p.dtype)


def leaves(params: Mapping[str, Tensor]) -> Params:
    """Detached copies of ``params`` that require grad (fresh leaves of a new graph)."""
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}


def check_loss(loss: Any, which: str) -> Tensor:
    """``loss`` if it is a scalar tensor; a ``ValueError`` naming the ``which`` loss otherwise."""
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the {which} loss must return a scalar tensor, got {shape}; reduce it "
                         "(e.g. .mean()) first")
    return loss


def grads_of(loss: Tensor, wrt: Mapping[Any, Tensor]) -> dict:
    """``∂loss/∂wrt[k]`` for every key (zeros for a leaf the loss does not depend on)."""
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    return {
        n: g if g is not None else torch.zeros_like(p)
        for (n, p), g in zip(wrt.items(), grads)
    }


def require_finite(value: Tensor, what: str, t: int | None = None) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` (and alternation ``t``) unless finite."""
    value = value.detach()
    if not bool(torch.isfinite(value)):
        where = "" if t is None else f" at alternation {t}"
        raise NonFiniteError(f"non-finite {what} ({float(value)}){where}")
