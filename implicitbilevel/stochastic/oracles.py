"""The derivatives every stochastic method asks for, at one point and one batch.

Writing the inner objective of a :class:`~implicitbilevel.BilevelProblem` as
``G(x, y) = ℓ(y) + λ r(x, y)`` (thesis eq. 4.2-4.3) and the outer one as ``f(x, y)``, the
single-loop and two-loop stochastic methods need, on a minibatch:

- ``∇_y G = ∇_y ℓ + λ ∇_y r`` (the inner gradient) and ``∇_x G = λ ∇_x r`` (first-order methods);
- ``∇_x f`` and ``∇_y f`` (one pass for both);
- ``∇²_yy G · v = ∇²ℓ · v + λ ∇²_yy r · v``, the curvature product, from the library's
  :class:`~implicitbilevel.HessianOperator` (one kept first-order graph per point and batch, so
  several products there cost one backward pass each) and the regulariser's ``lower_hvp``;
- ``∇²_xy G · v = λ ∇_x ⟨∇_y r, v⟩``, the mixed product, from the regulariser's ``mixed_vjp``
  (closed form for :class:`~implicitbilevel.ProximalL2`, ``torch.func`` otherwise).

Two callables ``f(x, y, batch)`` and ``g(x, y, batch)`` (how the benchmark problems are written)
are the same thing with ``ℓ`` replaced by ``g`` read at a fixed ``x`` for the ``y``-derivatives,
and ``r`` by :class:`~implicitbilevel.Regularizer` ``(g, uses_batch=True)`` for the
``x``-derivatives: :meth:`BilevelOracles.from_functions`. Every method runs on one
:class:`BilevelOracles`, whichever way it was built.

:meth:`BilevelOracles.per_sample` gives the same quantities for every row of a batch at once
(``torch.func.vmap`` over the rows), for SABA's memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .._autograd import check_loss, grads_of, leaves
from ..curvature.hessian import HessianOperator
from ..lam import LambdaSchedule, LearnableLambda, as_lambda
from ..problem import BilevelProblem
from ..regularizers import BaseRegularizer, ProximalL2, Regularizer, SumRegularizer
from ..tree import Params, tree_axpy
from .products import Curvature, detached, zeros_over
from .rows import INDEX as INDEX  # re-exported: the per-row helpers lived here before
from .rows import map_rows
from .rows import rows_of as rows_of

__all__ = ["BilevelOracles", "OracleCounts", "as_oracles", "reads_batch"]

@dataclass
class OracleCounts:
    """Oracle calls so far, one per minibatch evaluation (a product with ``k`` tangents, or a
    per-row evaluation of a batch, counts once per batch).

    Attributes:
        grad_inner: gradients of ``G`` (``∇_y G``, ``∇_x G`` or both at one point).
        grad_outer: gradients of ``f`` (``∇_x f`` and ``∇_y f`` together).
        hvp: curvature products ``∇²_yy G · v``.
        cross: mixed products ``∇²_xy G · v``.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> oracles = ib.BilevelOracles(lambda x, y, b: 0.5 * (y["w"] ** 2).sum(),  # f
        ...                             lambda y, b: 0.5 * (y["w"] ** 2).sum(),     # G = l + r
        ...                             regularizer=ib.ProximalL2())                # r = |x-y|^2/2
        >>> x, y = ({"w": torch.zeros(2, dtype=torch.float64)} for _ in range(2))
        >>> gx, gy = oracles.outer_grads(x, y, None)         # one call gives both gradients of f
        >>> oracles.counts.as_dict()
        {'grad_inner': 0, 'grad_outer': 1, 'hvp': 0, 'cross': 0, 'total': 1}
    """

    grad_inner: int = 0
    grad_outer: int = 0
    hvp: int = 0
    cross: int = 0

    @property
    def total(self) -> int:
        """All oracle calls."""
        return self.grad_inner + self.grad_outer + self.hvp + self.cross

    def as_dict(self) -> dict[str, int]:
        """The counts by kind and their ``total``."""
        return {**asdict(self), "total": self.total}


def reads_batch(reg: BaseRegularizer | None) -> bool:
    """Whether the regulariser reads the lower batch (a :class:`Regularizer` with
    ``uses_batch=True``, or a sum holding one); such a term is stochastic."""
    if reg is None:
        return False
    if isinstance(reg, SumRegularizer):
        return any(reads_batch(term) for term in reg.terms)
    if isinstance(reg, Regularizer):
        return reg.uses_batch
    return type(reg).bind is not BaseRegularizer.bind  # a regulariser of its own that binds data


class BilevelOracles:
    """``G = ℓ(y) + λ r(x, y)`` and ``f(x, y)`` as minibatch oracles (module docstring).

    Args:
        upper_loss: ``f(upper, lower, batch) -> scalar``.
        lower_loss: ``ℓ(lower, batch) -> scalar``.
        regularizer: ``r(x, y)``; default :class:`~implicitbilevel.ProximalL2` over the shared
            names, as for :class:`~implicitbilevel.BilevelProblem`.
        lam: λ > 0, a float or a :class:`~implicitbilevel.LambdaSchedule` evaluated at the step
            ``t`` (a learnable λ is not supported here).

    Attributes:
        counts: the :class:`~implicitbilevel.stochastic.OracleCounts` so far.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> oracles = ib.BilevelOracles(lambda x, y, b: 0.5 * (y["w"] ** 2).sum(),  # f
        ...                             lambda y, b: 0.5 * (y["w"] ** 2).sum(),     # G = l + r
        ...                             regularizer=ib.ProximalL2())                # r = |x-y|^2/2
        >>> x, y = ({"w": torch.zeros(2, dtype=torch.float64)} for _ in range(2))
        >>> x0 = {"w": torch.tensor([2.0, 0.0], dtype=torch.float64)}
        >>> oracles.inner_grad(x0, y, None)["w"].tolist()   # y + (y - x) at y = 0
        [-2.0, 0.0]
        >>> oracles.counts.grad_inner
        1
    """

    def __init__(
        self,
        upper_loss: Callable[[Params, Params, Any], Tensor],
        lower_loss: Callable[[Params, Any], Tensor],
        *,
        regularizer: BaseRegularizer | None = None,
        lam: float | LambdaSchedule = 1.0,
    ) -> None:
        if isinstance(lam, LearnableLambda):
            raise ValueError("the stochastic methods take a constant or scheduled λ; a learnable "
                             "λ is an upper variable of BilevelProblem.upper_grad only")
        self.upper_loss = upper_loss
        self.lam = as_lambda(lam)
        reg = ProximalL2() if regularizer is None else regularizer
        self._setup(lambda y, x, batch: lower_loss(y, batch), reg, reg)

    def _setup(self, loss: Callable[[Params, Params, Any], Tensor], reg: BaseRegularizer | None,
               coupling: BaseRegularizer) -> None:
        self._loss = loss  # the y-part read at a fixed x: ℓ(y), or g(x, y)
        self._reg = reg  # added to the y-derivatives (times λ), None for two callables
        self._coupling = coupling  # every x-derivative of G (times λ)
        self.counts = OracleCounts()

    @classmethod
    def from_problem(cls, problem: BilevelProblem) -> BilevelOracles:
        """The oracles of a :class:`~implicitbilevel.BilevelProblem`.

        The stochastic methods estimate the undamped hypergradient over every lower variable;
        a problem whose ``ij`` asks for damping, a subset or Gauss–Newton curvature, or that
        averages across ranks, is refused rather than silently solved another way.
        """
        ij = problem.ij
        if ij.damping or ij.subset is not None or ij.curvature != "hessian":
            raise ValueError("the stochastic methods estimate the exact (undamped, full-Hessian) "
                             "hypergradient; build the BilevelProblem with "
                             "ij=ImplicitJacobian() (damping 0, no subset, curvature='hessian')")
        if problem.reducer is not dict:
            raise ValueError("the stochastic methods run in one process (no reducer)")
        return cls(problem.upper_loss, problem.lower_loss, regularizer=problem.regularizer,
                   lam=problem.lam)

    @classmethod
    def from_functions(cls, f: Callable[[Params, Params, Any], Tensor],
                       g: Callable[[Params, Params, Any], Tensor]) -> BilevelOracles:
        """The oracles of ``min_x f(x, y*(x))``, ``y*(x) = argmin_y g(x, y)``, from two callables
        ``f(x, y, batch)`` and ``g(x, y, batch)`` (``λ = 1``)."""
        self = cls.__new__(cls)
        self.upper_loss = f
        self.lam = as_lambda(1.0)
        self._setup(lambda y, x, batch: g(x, y, batch), None, Regularizer(g, uses_batch=True))
        return self

    def lam_at(self, t: int) -> float:
        """λ at step ``t``."""
        return float(self.lam(t))

    # -- gradients ---------------------------------------------------------------------------

    def inner_grad(self, x: Params, y: Params, batch: Any, t: int = 0) -> Params:
        """``∇_y G(x, y)`` on ``batch``."""
        self.counts.grad_inner += 1
        xd = {n: p.detach() for n, p in x.items()}
        y_leaves = leaves(y)
        with torch.enable_grad():
            grads = grads_of(check_loss(self._loss(y_leaves, xd, batch), "lower"), y_leaves)
        if self._reg is not None:
            yd = {n: p.detach() for n, p in y.items()}
            grads = dict(grads)
            reg = self._reg.bind(batch).lower_grad(xd, yd)
            grads.update(tree_axpy(self.lam_at(t), reg, {n: grads[n] for n in reg}))
        return grads

    def inner_grad_x(self, x: Params, y: Params, batch: Any, t: int = 0) -> Params:
        """``∇_x G(x, y) = λ ∇_x r(x, y)`` on ``batch`` (zero for names ``r`` does not read)."""
        self.counts.grad_inner += 1
        yd = {n: p.detach() for n, p in y.items()}
        coupling = self._coupling.bind(batch)
        if isinstance(coupling, ProximalL2):  # ∇_x ½‖x − y‖² = x − y
            grad = {n: -g for n, g in coupling.lower_grad(x, yd).items()}
        else:
            x_leaves = leaves(x)
            with torch.enable_grad():
                grad = grads_of(coupling.value(x_leaves, yd), x_leaves)
        lam = self.lam_at(t)
        return {n: lam * g for n, g in zeros_over(x, grad).items()}

    def outer_grads(self, x: Params, y: Params, batch: Any) -> tuple[Params, Params]:
        """``(∇_x f, ∇_y f)`` on ``batch``, from one backward pass."""
        self.counts.grad_outer += 1
        x_leaves, y_leaves = leaves(x), leaves(y)
        with torch.enable_grad():
            loss = check_loss(self.upper_loss(x_leaves, y_leaves, batch), "upper")
            grads = grads_of(loss, {**{("x", n): p for n, p in x_leaves.items()},
                                    **{("y", n): p for n, p in y_leaves.items()}})
        return ({n: grads[("x", n)] for n in x}, {n: grads[("y", n)] for n in y})

    # -- products ----------------------------------------------------------------------------

    def curvature(self, x: Params, y: Params, batch: Any, t: int = 0) -> Curvature:
        """The products of ``G`` at ``(x, y)`` and ``batch``: build once, multiply many times."""
        return Curvature(self, x, y, batch, t)

    def second_order(self, x: Params, y: Params, v: Params, batch: Any, t: int = 0
                     ) -> tuple[Params, Params, Params]:
        """``(∇_y G, ∇²_yy G · v, ∇²_xy G · v)`` on one batch (SOBA's three inner oracles)."""
        grad = self.inner_grad(x, y, batch, t)
        curvature = self.curvature(x, y, batch, t)
        return grad, curvature.hvp(v), curvature.cross(v)

    # -- per row (SABA) ----------------------------------------------------------------------

    @property
    def stochastic_coupling(self) -> bool:
        """Whether ``∇²_xy G`` depends on the batch (else it is exact, not a memory entry)."""
        return reads_batch(self._coupling)

    def deterministic_terms(self, x: Params, y: Params, v: Params, t: int = 0
                            ) -> tuple[Params, Params, Params | None]:
        """The batch-free parts of ``(∇_y G, ∇²_yy G · v, ∇²_xy G · v)``: the regulariser's, when
        it reads no batch (zeros, and ``None`` for a stochastic mixed product, otherwise)."""
        lam = self.lam_at(t)
        zeros = {n: torch.zeros_like(p) for n, p in y.items()}
        if self._reg is None or reads_batch(self._reg):
            grad, prod = zeros, dict(zeros)
        else:
            xd, yd = detached(x), detached(y)
            grad = zeros_over(y, {n: lam * g for n, g in self._reg.lower_grad(xd, yd).items()})
            prod = zeros_over(y, {n: lam * g for n, g in
                                   self._reg.lower_hvp(xd, yd, v).items()})
        cross = None
        if not self.stochastic_coupling:
            self.counts.cross += 1
            mixed = self._coupling.mixed_vjp(detached(x), detached(y), v)
            cross = {n: lam * g for n, g in zeros_over(x, mixed).items()}
        return grad, prod, cross

    def per_sample(self, x: Params, y: Params, v: Params, lower_batch: Mapping[str, Any],
                   upper_batch: Mapping[str, Any], t: int = 0) -> dict[str, Params]:
        """Every row's stochastic terms, stacked along a leading dimension (one call per batch).

        Returns ``{"grad": ∇_y G_i, "hvp": ∇²_yy G_i v, "cross": ∇²_xy G_i v (only when the
        coupling reads the batch), "fx": ∇_x f_j, "fy": ∇_y f_j}`` where ``G_i`` is the
        batch-dependent part of ``G`` on row ``i`` (:meth:`deterministic_terms` holds the rest).
        Rows are split by ``rows_of``. Under ``torch.func.vmap`` the three inner terms of a
        row come from one ``torch.func.vjp`` of its gradient ``∇_y G_i`` with respect to
        ``(x, y)``, which yields ``(∇²_xy G_i v, ∇²_yy G_i v)`` by reverse-over-reverse, the
        product :class:`~implicitbilevel.HessianOperator` forms; where an operation has no
        batching rule the rows are looped over with the batch oracles.
        """
        self.counts.grad_inner += 1
        self.counts.hvp += 1
        self.counts.grad_outer += 1
        if self.stochastic_coupling:
            self.counts.cross += 1
        xd, yd, vd = detached(x), detached(y), detached(v)
        lam = self.lam_at(t)
        reg = self._reg if reads_batch(self._reg) else None
        stochastic_cross = self.stochastic_coupling

        def g_row(yy: Params, xx: Params, row: Any) -> Tensor:
            value = self._loss(yy, xx, row)
            return value if reg is None else value + lam * reg.bind(row).value(xx, yy)

        def inner_row(row: Any) -> dict[str, Params]:
            def grad_y(xx: Params, yy: Params) -> Params:
                return torch.func.grad(g_row)(yy, xx, row)

            grad, vjp = torch.func.vjp(grad_y, xd, yd)
            cross, prod = vjp(vd)
            out = {"grad": grad, "hvp": prod}
            if stochastic_cross:
                out["cross"] = cross
            return out

        def inner_row_loop(row: Any) -> dict[str, Params]:
            y_leaves = leaves(yd)
            with torch.enable_grad():
                grad = grads_of(check_loss(g_row(y_leaves, xd, row), "lower"), y_leaves)
            prod = HessianOperator(g_row, yd, xd, row)(vd)
            out = {"grad": grad, "hvp": prod}
            if stochastic_cross:
                mixed = self._coupling.bind(row).mixed_vjp(xd, yd, vd)
                out["cross"] = {n: lam * m for n, m in zeros_over(xd, mixed).items()}
            return out

        def outer_row(row: Any) -> dict[str, Params]:
            fx, fy = torch.func.grad(self.upper_loss, argnums=(0, 1))(xd, yd, row)
            return {"fx": fx, "fy": fy}

        def outer_row_loop(row: Any) -> dict[str, Params]:
            self.counts.grad_outer -= 1  # outer_grads counts; this is a part of one call
            fx, fy = self.outer_grads(xd, yd, row)
            return {"fx": fx, "fy": fy}

        with torch.no_grad():
            return {**map_rows(inner_row, inner_row_loop, lower_batch),
                    **map_rows(outer_row, outer_row_loop, upper_batch)}


def as_oracles(problem: BilevelProblem | BilevelOracles) -> BilevelOracles:
    """``problem`` as :class:`BilevelOracles` (a problem is converted, oracles kept)."""
    if isinstance(problem, BilevelOracles):
        return problem
    if isinstance(problem, BilevelProblem):
        return BilevelOracles.from_problem(problem)
    raise TypeError("the stochastic methods take a BilevelProblem or BilevelOracles (build one "
                    "from two callables with BilevelOracles.from_functions(f, g)), got "
                    f"{type(problem).__name__}")
