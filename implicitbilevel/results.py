"""What :class:`~implicitbilevel.BilevelProblem` returns.

:class:`UpperGradient` and :class:`LowerGradient` carry a level's gradient dict (ready for
``torch.optim`` through :func:`assign_grads`) and what was computed on the way. All three are
importable from the package as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from .tree import Params, tree_norm, tree_sub

if TYPE_CHECKING:
    from .implicit_jacobian import IJSystem
    from .solvers.base import SolveInfo

__all__ = [
    "LAM_RHO",
    "LowerGradient",
    "UpperGradient",
    "assign_grads",
]

#: The name under which a learnable λ's ``ρ`` is a problem parameter
#: (:attr:`BilevelProblem.params <implicitbilevel.BilevelProblem.params>`) and has its gradient in
#: :attr:`UpperGradient.grads`.
LAM_RHO = "lam.rho"


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
        prepare_seconds: the seconds the solver spent on per-operator work for this step
            (:meth:`LinearSolver.prepare <implicitbilevel.LinearSolver.prepare>`; 0 when it was
            already prepared for this operator).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> b, c = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> lam = torch.tensor(0.5, dtype=torch.float64)
        >>> def lower_loss(y, batch):                     # l(y) = 1/2 y^T Q y - b^T y
        ...     return 0.5 * y["w"] @ Q @ y["w"] - b @ y["w"]
        >>> def upper_loss(x, y, batch):                  # f(x, y) = 1/2 ||y - c||^2
        ...     return 0.5 * ((y["w"] - c) ** 2).sum()
        >>> x = {"w": torch.tensor([0.2, -0.1], dtype=torch.float64, requires_grad=True)}
        >>> QL = Q + lam * torch.eye(2, dtype=torch.float64)
        >>> y = {"w": torch.linalg.solve(QL, b + lam * x["w"].detach()).requires_grad_()}  # y*(x)
        >>> problem = ib.BilevelProblem(upper_loss, lower_loss, lam=float(lam),
        ...                             regularizer=ib.ProximalL2(),
        ...                             ij=ib.ImplicitJacobian(ib.CG(10)))
        >>> out = problem.upper_grad(x, y, upper_batch=None, lower_batch=None)
        >>> torch.allclose(out.system(out.u)["w"], out.rhs["w"])     # u solves A u = v
        True
        >>> out.lam, out.info.converged
        (0.5, True)
    """

    grads: Params
    loss: Tensor
    u: Params
    info: SolveInfo
    lam: float
    rhs: Params
    system: IJSystem
    prepare_seconds: float = 0.0

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

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> b, c = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> lam = torch.tensor(0.5, dtype=torch.float64)
        >>> def lower_loss(y, batch):                     # l(y) = 1/2 y^T Q y - b^T y
        ...     return 0.5 * y["w"] @ Q @ y["w"] - b @ y["w"]
        >>> def upper_loss(x, y, batch):                  # f(x, y) = 1/2 ||y - c||^2
        ...     return 0.5 * ((y["w"] - c) ** 2).sum()
        >>> x = {"w": torch.tensor([0.2, -0.1], dtype=torch.float64, requires_grad=True)}
        >>> QL = Q + lam * torch.eye(2, dtype=torch.float64)
        >>> y = {"w": torch.linalg.solve(QL, b + lam * x["w"].detach()).requires_grad_()}  # y*(x)
        >>> problem = ib.BilevelProblem(upper_loss, lower_loss, lam=float(lam),
        ...                             regularizer=ib.ProximalL2())
        >>> y0 = {"w": torch.zeros(2, dtype=torch.float64, requires_grad=True)}
        >>> low = problem.lower_grad(x, y0, batch=None)            # -b + lam (0 - x)
        >>> torch.allclose(low.grads["w"], -b - lam * x["w"].detach()), low.lam
        (True, 0.5)
    """

    grads: Params
    loss: Tensor
    regularizer: Tensor
    lam: float


def assign_grads(params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
    """Write ``grads`` into ``params[name].grad`` so a ``torch.optim`` optimiser can step.

    Names in ``params`` without a gradient get ``None`` (the optimiser skips them).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> params = {n: torch.zeros(2, requires_grad=True) for n in ("w", "b")}
        >>> ib.assign_grads(params, {"w": torch.tensor([1.0, 2.0])})
        >>> torch.optim.SGD(params.values(), lr=0.5).step()
        >>> params["w"].tolist(), params["b"].grad is None
        ([-0.5, -1.0], True)
    """
    for name, p in params.items():
        g = grads.get(name)
        p.grad = None if g is None else g.detach().to(p.dtype)
