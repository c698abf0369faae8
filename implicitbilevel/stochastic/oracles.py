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

import warnings
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

__all__ = ["BilevelOracles", "OracleCounts", "as_oracles", "reads_batch"]

INDEX = "index"
_LOOP_WARNED: set[int] = set()


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


def _zeros_over(names: Mapping[str, Tensor], part: Mapping[str, Tensor]) -> Params:
    """``part`` completed with zeros to the names of ``names``."""
    return {n: part[n] if n in part else torch.zeros_like(t) for n, t in names.items()}


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
        return {n: lam * g for n, g in _zeros_over(x, grad).items()}

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
            xd, yd = _detached(x), _detached(y)
            grad = _zeros_over(y, {n: lam * g for n, g in self._reg.lower_grad(xd, yd).items()})
            prod = _zeros_over(y, {n: lam * g for n, g in
                                   self._reg.lower_hvp(xd, yd, v).items()})
        cross = None
        if not self.stochastic_coupling:
            self.counts.cross += 1
            mixed = self._coupling.mixed_vjp(_detached(x), _detached(y), v)
            cross = {n: lam * g for n, g in _zeros_over(x, mixed).items()}
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
        xd, yd, vd = _detached(x), _detached(y), _detached(v)
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
                out["cross"] = {n: lam * m for n, m in _zeros_over(xd, mixed).items()}
            return out

        def outer_row(row: Any) -> dict[str, Params]:
            fx, fy = torch.func.grad(self.upper_loss, argnums=(0, 1))(xd, yd, row)
            return {"fx": fx, "fy": fy}

        def outer_row_loop(row: Any) -> dict[str, Params]:
            self.counts.grad_outer -= 1  # outer_grads counts; this is a part of one call
            fx, fy = self.outer_grads(xd, yd, row)
            return {"fx": fx, "fy": fy}

        with torch.no_grad():
            return {**_map_rows(inner_row, inner_row_loop, lower_batch),
                    **_map_rows(outer_row, outer_row_loop, upper_batch)}


class Curvature:
    """``v ↦ ∇²_yy G · v`` and ``v ↦ ∇²_xy G · v`` at one point and batch
    (:meth:`BilevelOracles.curvature`); each product counts one oracle call.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> oracles = ib.BilevelOracles(lambda x, y, b: 0.5 * (y["w"] ** 2).sum(),  # f
        ...                             lambda y, b: 0.5 * (y["w"] ** 2).sum(),     # G = l + r
        ...                             regularizer=ib.ProximalL2())                # r = |x-y|^2/2
        >>> x, y = ({"w": torch.zeros(2, dtype=torch.float64)} for _ in range(2))
        >>> curv = oracles.curvature(x, y, None)             # products at one point and batch
        >>> v = {"w": torch.tensor([1.0, -1.0], dtype=torch.float64)}
        >>> curv.hvp(v)["w"].tolist(), curv.cross(v)["w"].tolist()   # (I + I) v and -I v
        ([2.0, -2.0], [-1.0, 1.0])
    """

    def __init__(self, oracles: BilevelOracles, x: Params, y: Params, batch: Any, t: int) -> None:
        self._oracles = oracles
        self.x, self.y = _detached(x), _detached(y)
        self.lam = oracles.lam_at(t)
        self._reg = None if oracles._reg is None else oracles._reg.bind(batch)
        self._coupling = oracles._coupling.bind(batch)
        loss = oracles._loss
        self._operator = HessianOperator(lambda yy, xx, bb: loss(yy, xx, bb), self.y, self.x,
                                         batch)

    def hvp(self, v: Params) -> Params:
        """``∇²_yy G · v``."""
        self._oracles.counts.hvp += 1
        out = self._operator(v)
        if self._reg is not None:
            out = _add_scaled(out, self._reg.lower_hvp(self.x, self.y, v), self.lam)
        return out

    def cross(self, v: Params) -> Params:
        """``∇²_xy G · v = ∇_x ⟨∇_y G, v⟩`` (zero for upper names ``G`` does not read)."""
        self._oracles.counts.cross += 1
        mixed = self._coupling.mixed_vjp(self.x, self.y, v)
        return {n: self.lam * g for n, g in _zeros_over(self.x, mixed).items()}


def _detached(p: Mapping[str, Tensor]) -> Params:
    return {n: t.detach() for n, t in p.items()}


def _add_scaled(base: Params, part: Mapping[str, Tensor], scale: float) -> Params:
    out = dict(base)
    for n, t in part.items():
        out[n] = out[n] + scale * t
    return out


def rows_of(batch: Any) -> tuple[dict[str, Any], int]:
    """The ``in_dims`` of a batch's rows for ``torch.func.vmap`` and the number of rows.

    A batch is a dict whose ``"index"`` entry is a 1-D integer tensor (the rows' sample indices);
    its tensor entries with as many leading entries are split into rows, every other entry is
    shared by the rows.
    """
    if not isinstance(batch, Mapping) or INDEX not in batch:
        raise TypeError("a per-sample batch must be a dict with an 'index' entry (the sample "
                        f"indices of its rows), got {type(batch).__name__}")
    index = batch[INDEX]
    if not isinstance(index, Tensor) or index.ndim != 1 or index.is_floating_point():
        raise TypeError("batch['index'] must be a 1-D integer tensor of sample indices")
    b = index.shape[0]
    dims = {k: 0 if isinstance(t, Tensor) and t.ndim >= 1 and t.shape[0] == b else None
            for k, t in batch.items()}
    return dims, b


def _map_rows(fn: Callable[[Any], dict[str, Params]], loop: Callable[[Any], dict[str, Params]],
              batch: Mapping[str, Any]) -> dict[str, Params]:
    """``fn`` on every row of ``batch`` (each a batch of one row) under ``torch.func.vmap``,
    stacked along dim 0; ``loop`` row by row when an operation has no batching rule."""
    dims, b = rows_of(batch)

    def one_row(row: Mapping[str, Any]) -> dict[str, Any]:
        return {k: (t.unsqueeze(0) if dims[k] == 0 else t) for k, t in row.items()}

    try:
        return torch.func.vmap(lambda row: fn(one_row(row)), in_dims=(dims,))(dict(batch))
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
        key = id(fn.__code__)
        if key not in _LOOP_WARNED:
            _LOOP_WARNED.add(key)
            warnings.warn(f"per-row oracles could not be vectorised ({type(err).__name__}: "
                          f"{err}); evaluating the {b} rows one at a time", RuntimeWarning,
                          stacklevel=4)
        rows = [loop(one_row({k: (t[i] if dims[k] == 0 else t) for k, t in batch.items()}))
                for i in range(b)]
        return {key_: {n: torch.stack([r[key_][n] for r in rows]) for n in rows[0][key_]}
                for key_ in rows[0]}


def as_oracles(problem: BilevelProblem | BilevelOracles) -> BilevelOracles:
    """``problem`` as :class:`BilevelOracles` (a problem is converted, oracles kept)."""
    if isinstance(problem, BilevelOracles):
        return problem
    if isinstance(problem, BilevelProblem):
        return BilevelOracles.from_problem(problem)
    raise TypeError("the stochastic methods take a BilevelProblem or BilevelOracles (build one "
                    "from two callables with BilevelOracles.from_functions(f, g)), got "
                    f"{type(problem).__name__}")
