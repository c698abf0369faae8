"""A differentiable argmin: ``y*(x)`` as a tensor dict whose backward is the implicit function
theorem.

Solve the inner problem however you like (a loop of ``torch.optim`` steps, L-BFGS, a closed form,
scikit-learn), then hand the solution to :func:`argmin`::

    y_star = argmin(g, y_solved, x, batch)      # y*(x) = argmin_y g(y, x, batch)
    loss = f(y_star, x)                          # any autograd computation
    loss.backward()                              # x[n].grad = dL/dx[n] by Theorem 3.2

By the implicit function theorem (thesis Theorem 3.2, eq. 3.2-3.3), at a point where
``∇_y g(y*, x) = 0`` and ``∇²_yy g`` is invertible, ``y*`` is a differentiable function of ``x``
with Jacobian ``dy*/dx = −[∇²_yy g]⁻¹ ∇²_yx g``, so a cotangent ``w = dL/dy*`` is pulled back as

.. math::

    \\frac{dL}{dx} = -\\nabla^2_{xy} g \\, \\big[\\nabla^2_{yy} g\\big]^{-1} \\frac{dL}{dy^*}
                   = -\\nabla_x \\big\\langle \\nabla_y g(y^*, x), u \\big\\rangle, \\qquad
    \\nabla^2_{yy} g \\; u = \\frac{dL}{dy^*}.

This is the same TorchOpt's ``custom_root``, JAXopt's ``custom_root`` and Optimistix's
``ImplicitAdjoint`` give; here the backward pass is this library's implicit step, shared with
:meth:`BilevelProblem.upper_grad <implicitbilevel.BilevelProblem.upper_grad>`: the linear system
over the Hessian-vector products of ``g`` (every :data:`~implicitbilevel.HVPMode`, or one kept
first-order graph), any :class:`~implicitbilevel.LinearSolver`, and the mixed product
``∇_x ⟨∇_y g, u⟩`` by ``torch.func`` over ``g``. ``BilevelProblem`` splits the inner objective as
``ℓ(y) + λ r(x, y)``; the argmin takes it whole.

A function rather than a decorator: the inner solver stays free (any loop, under
``torch.no_grad``, any signature), and the result is plain tensors that compose with first-order
autograd (several inner problems in one graph, chained ones, ``y*`` used twice, any upper loss,
``torch.optim`` on ``x``). The gradient is differentiable again (``create_graph=True``, e.g. a
gradient penalty on ``dL/dx``): the backward pass then keeps ``y*(x)``, the solution of the linear
system and the explicit ``x`` in the graph, which gives the second-order terms of the implicit
function theorem (``implicitbilevel._second_order``; exact Hessian, one process).

The premise is checked: in each backward pass the argmin measures how far the given ``y`` is from
a stationary point of ``g`` (one gradient and one curvature product) and warns, or raises with
``on_nonstationary="raise"``, when it is not (:mod:`implicitbilevel.stationarity`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ._checks import require_finite
from ._second_order import second_order_backward
from .curvature.hessian import _hvp_context
from .implicit_jacobian import (
    IJSystem,
    ImplicitJacobian,
    curvature_operator,
    from_legacy,
    implicit_step,
)
from .regularizers import Regularizer
from .solvers.base import LinearSolver, SolveInfo
from .solvers.cg import CG
from .stationarity import Stationarity, inner_gradient, measure_stationarity
from .tree import Params, tree_norm, tree_scale, tree_sub

__all__ = ["ArgminSolve", "argmin"]

InnerObjective = Callable[..., Tensor]
_ARGMIN_LEGACY = ("solver", "curvature", "hvp_mode", "reuse_graph", "damping", "on_breakdown")


@dataclass
class ArgminSolve:
    """What one backward pass through :func:`argmin` computed (handed to ``on_solve``).

    Attributes:
        u: the solution of ``(∇²_yy g + δI) u = dL/dy*``, by the names of ``y``.
        info: the linear solver's diagnostics.
        rhs: the right-hand side the solver saw (``dL/dy*``, divided by ``δ`` when damped).
        system: the operator ``A`` the solver saw: ``∇²_yy g`` (``δ = 0``) or ``I + ∇²_yy g/δ``.
            It holds the curvature operator (with ``reuse_graph``, ``g``'s first-order graph):
            drop the record to free it.
        grads: ``dL/dx`` for every entry of ``x`` that requires grad.
        stationarity: how far the given ``y`` is from a stationary point of ``g``
            (:class:`~implicitbilevel.stationarity.Stationarity`), ``None`` with
            ``on_nonstationary="ignore"``.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> x = {"a": torch.tensor(2.0, dtype=torch.float64, requires_grad=True)}
        >>> def g(y, x):                                  # y* = a / 3
        ...     return 1.5 * (y["w"] ** 2).sum() - x["a"] * y["w"].sum()
        >>> records = []
        >>> y = ib.argmin(g, {"w": torch.tensor([2.0 / 3], dtype=torch.float64)}, x,
        ...               ij=ib.ImplicitJacobian(ib.CG(max_iter=3)), on_solve=records.append)
        >>> y["w"].sum().backward()
        >>> solve = records[0]                            # A = H = 3, v = dL/dy* = 1: u = 1/3
        >>> round(float(solve.u["w"]), 12), round(float(x["a"].grad), 12)
        (0.333333333333, 0.333333333333)
    """

    u: Params
    info: SolveInfo
    rhs: Params
    system: IJSystem
    grads: Params
    stationarity: Stationarity | None = None

    def true_relative_residual(self) -> float:
        """``‖rhs − A u‖ / ‖rhs‖``, measured with one more product (0 when ``rhs = 0``)."""
        rhs_norm = float(tree_norm(self.rhs))
        if rhs_norm == 0:
            return 0.0
        return float(tree_norm(tree_sub(self.rhs, self.system(self.u)))) / rhs_norm


@dataclass
class _Spec:
    objective: InnerObjective
    y_names: list[str]
    x_names: list[str]
    args: tuple
    ij: ImplicitJacobian
    solver: LinearSolver
    check_finite: bool
    reducer: Callable[[Mapping[Any, Tensor]], dict]
    on_solve: Callable[[ArgminSolve], Any] | None
    on_nonstationary: str
    stationarity_tol: float


class _Argmin(torch.autograd.Function):
    """Identity on ``y`` in the forward pass; the implicit step in the backward pass."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.spec = spec
        ctx.save_for_backward(*tensors)
        return tuple(t.detach().clone() for t in tensors[len(spec.x_names):])

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        spec: _Spec = ctx.spec
        saved = ctx.saved_tensors
        n_x = len(spec.x_names)
        x = dict(zip(spec.x_names, (t.detach() for t in saved[:n_x])))
        y = dict(zip(spec.y_names, (t.detach() for t in saved[n_x:])))
        wanted = [n for n, need in zip(spec.x_names, ctx.needs_input_grad[1:n_x + 1]) if need]
        if not wanted:  # only y_solved asked for a gradient: it is a constant here
            return (None,) * (1 + len(saved))
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable again
            grads = second_order_backward(spec, _Argmin.apply, list(saved[:n_x]),
                                          list(saved[n_x:]), cotangents, wanted)
        else:
            grads = _implicit_backward(spec, x, y, dict(zip(spec.y_names, cotangents)), wanted)
        return (None, *(grads.get(n) for n in spec.x_names), *(None for _ in spec.y_names))


def _implicit_backward(
    spec: _Spec, x: Params, y: Params, cotangent: Params, wanted: list[str]
) -> Params:
    """``dL/dx`` over ``wanted`` for the cotangent ``dL/dy*`` (the module docstring's equation)."""
    objective, args = spec.objective, spec.args
    rhs = spec.reducer({n: cotangent[n].to(y[n].dtype) for n in spec.y_names})
    ij = spec.ij
    operator = curvature_operator(objective, ij.curvature, y, (x, *args), embed=lambda s: s,
                                  mode=ij.hvp_mode, reuse=ij.reuse_graph)
    if spec.check_finite and operator.loss is not None:
        require_finite(operator.loss, "inner objective")
    if ij.damping > 0:  # (H + δI) u = v  ⇔  (I + H/δ) u = v/δ: the form the Nyström solvers take
        system = IJSystem(operator, ij.damping, identity=spec.y_names, reducer=spec.reducer)
        rhs = tree_scale(rhs, 1.0 / ij.damping)
    else:
        system = IJSystem(operator, 1.0, identity=[], reducer=spec.reducer)

    stationarity = None
    if spec.on_nonstationary != "ignore":
        stationarity = _check_stationary(spec, operator, x, y)

    fixed = {n: x[n] for n in x if n not in wanted}
    coupling = Regularizer(lambda xx, yy: objective(yy, {**fixed, **xx}, *args))

    def mixed_vjp(u: Params) -> Params:
        # Under the HVP context: BatchNorm in a functional_module runs on copies of its running
        # statistics, as in every other second-order product of the library.
        with _hvp_context():
            mixed = coupling.mixed_vjp({n: x[n] for n in wanted}, y, u)
        return spec.reducer(mixed)

    step = implicit_step(system, rhs, spec.solver, mixed_vjp, on_breakdown=ij.on_breakdown,
                         check_finite=spec.check_finite, where="argmin implicit solve",
                         stacklevel=3)
    grads = {n: (-step.mixed[n]).to(x[n].dtype) for n in wanted}
    if spec.on_solve is not None:
        spec.on_solve(ArgminSolve(step.u, step.info, rhs, system, grads, stationarity))
    return grads


def _check_stationary(spec: _Spec, operator: Any, x: Params, y: Params) -> Stationarity:
    """Measure how stationary ``y`` is; warn or raise per ``spec.on_nonstationary``."""
    grad = spec.reducer(inner_gradient(spec.objective, y, x, spec.args))
    found = measure_stationarity(grad, y, lambda t: spec.reducer(operator(t)))
    if found.relative > spec.stationarity_tol:
        message = (f"argmin: y is not a stationary point of g: ‖∇_y g‖ = {found.grad_norm:.3g}, "
                   f"an estimated distance to the stationary point of {found.step:.3g} "
                   f"({found.relative:.3g} relative to max(1, ‖y‖), tolerance "
                   f"{spec.stationarity_tol:g}). The implicit gradient assumes ∇_y g(y, x) = 0: "
                   "solve the inner problem further (or pass on_nonstationary='ignore')")
        if spec.on_nonstationary == "raise":
            raise ValueError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    return found


def _tensor_dict(value: Any, what: str) -> dict[str, Tensor]:
    if not isinstance(value, Mapping) or not value:
        raise TypeError(f"{what} must be a non-empty dict of tensors, got {type(value).__name__}")
    bad = [n for n, t in value.items() if not isinstance(t, Tensor)]
    if bad:
        raise TypeError(f"{what} must map names to tensors; {bad[:5]} are not tensors")
    return dict(value)


def _args_requiring_grad(args: tuple) -> list[int]:
    flat = []
    for i, a in enumerate(args):
        leaves = (a.values() if isinstance(a, Mapping)
                  else a if isinstance(a, (list, tuple)) else [a])
        if any(isinstance(t, Tensor) and t.requires_grad for t in leaves):
            flat.append(i)
    return flat


def argmin(
    objective: InnerObjective,
    y: Mapping[str, Tensor],
    x: Mapping[str, Tensor],
    *args: Any,
    ij: ImplicitJacobian | LinearSolver | None = None,
    check_finite: bool = True,
    reducer: Callable[[Mapping[Any, Tensor]], dict] | None = None,
    on_solve: Callable[[ArgminSolve], Any] | None = None,
    on_nonstationary: Literal["warn", "raise", "ignore"] = "warn",
    stationarity_tol: float = 1e-4,
    **legacy: Any,
) -> dict[str, Tensor]:
    """``y*(x) = argmin_y g(y, x, *args)``, differentiable in ``x`` by the implicit function
    theorem.

    Returns a dict with the names and values of ``y`` whose backward pass is
    ``dL/dx = −∇²_xy g [∇²_yy g + δI]⁻¹ dL/dy*`` (thesis Theorem 3.2, eq. 3.2-3.3; ``δ`` is
    ``damping``, 0 for the exact gradient). See the module docstring for the derivation.

    Args:
        objective: ``g(y, x, *args) -> scalar``, twice differentiable in ``y`` and differentiable
            in ``x`` (both parameter dicts).
        y: the inner solution, found by any means (detached is fine: it is taken as a constant;
            it should be a stationary point, ``∇_y g ≈ 0``, for the gradient to be the exact one).
        x: the outer variables; the entries that require grad receive gradients.
        *args: further arguments of ``g`` (the batch), held fixed; they receive no gradient (a
            tensor that requires grad here raises: pass it in ``x``).
        ij: how ``[∇²_yy g + δI] u = dL/dy*`` is formed and solved, an
            :class:`~implicitbilevel.ImplicitJacobian` (its ``solve_over``, ``head_damping`` and
            ``subset`` are for bilevel problems and must keep their defaults here):

            - ``solver``: :class:`~implicitbilevel.CG` (default ``CG(max_iter=100, tol=1e-6)``,
              for a positive definite Hessian), :class:`~implicitbilevel.MINRES` (indefinite),
              :class:`~implicitbilevel.Neumann`, :class:`~implicitbilevel.Dense`, and, with
              ``damping > 0`` (the system is then ``I + H/δ``),
              :class:`~implicitbilevel.NystromSolver` or CG with a
              :class:`~implicitbilevel.NystromPreconditioner`;
            - ``curvature``: ``"hessian"`` (exact ``∇²_yy g``) or a
              :class:`~implicitbilevel.GaussNewton` with ``outputs(y, x, *args)`` and
              ``output_loss(z, x, *args)`` (``g`` must equal their composition; the mixed term
              always uses ``g`` itself);
            - ``hvp_mode`` and ``reuse_graph``: how products are taken (``reuse_graph`` builds
              ``g``'s first-order graph once per backward pass);
            - ``damping``: ``δ ≥ 0`` added to the inner Hessian (a ridge on the implicit system,
              as in Algorithm 3); 0 is the exact gradient;
            - ``on_breakdown``: ``"raise"`` a :class:`~implicitbilevel.SolverBreakdownError` (out
              of ``backward()``), ``"warn"`` and use the iterate reached, or ``"ignore"``.

            The keywords ``solver``, ``curvature``, ``hvp_mode``, ``reuse_graph``, ``damping``
            and ``on_breakdown`` of earlier releases are still accepted with a
            ``DeprecationWarning``.
        check_finite: raise :class:`~implicitbilevel.NonFiniteError` on a NaN/inf objective or
            solution.
        reducer: averages ``dL/dy*``, every curvature product and the mixed product across
            data-parallel ranks (e.g. :class:`~implicitbilevel.distributed.AllReduceMean`), for a
            ``g`` that depends on each rank's batch. ``None``: a single process.
        on_nonstationary: what to do when ``y`` is not a stationary point of ``g`` (the premise
            of the implicit function theorem): ``"warn"`` (a ``RuntimeWarning`` naming the
            measured values), ``"raise"`` a ``ValueError``, or ``"ignore"`` (and skip the
            measurement). Measured in each backward pass with one gradient and one curvature
            product: the Cauchy step ``s = ‖∇g‖³ / |∇gᵀ H ∇g|``, an estimate of ``‖y − y*‖``,
            relative to ``max(1, ‖y‖)`` (:mod:`implicitbilevel.stationarity`).
        stationarity_tol: the largest relative ``s`` accepted as stationary.
        on_solve: called after every backward pass with an :class:`ArgminSolve` (``u``, the
            :class:`~implicitbilevel.SolveInfo`, the system, the gradients), e.g.
            ``records.append``.

    Raises:
        TypeError: ``y`` or ``x`` is not a non-empty dict of tensors; a bad solver or curvature.
        ValueError: ``g`` does not return a scalar (checked once here, with ``g`` evaluated at
            ``y``); a bad ``damping`` or ``on_breakdown``; a tensor in ``args`` requires grad.

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
        >>> t = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
        >>> x = {"lam": torch.tensor(0.5, dtype=torch.float64, requires_grad=True)}
        >>> def ridge(y, x):                      # 1/2 ||Xw - t||^2 + lam/2 ||w||^2
        ...     return 0.5 * ((X @ y["w"] - t) ** 2).sum() + 0.5 * x["lam"] * (y["w"] ** 2).sum()
        >>> K = X.T @ X + 0.5 * torch.eye(2, dtype=torch.float64)
        >>> w = torch.linalg.solve(K, X.T @ t)             # the inner solution, found any way
        >>> w_star = ib.argmin(ridge, {"w": w}, x, ij=ib.ImplicitJacobian(ib.Dense()))
        >>> w_star["w"].sum().backward()                   # d(sum w*)/d lam = -1^T K^-1 w*
        >>> torch.allclose(x["lam"].grad, -torch.linalg.solve(K, w).sum())
        True
    """
    y = _tensor_dict(y, "y (the inner solution)")
    x = _tensor_dict(x, "x (the outer variables)")
    floats = [n for n, t in y.items() if not t.is_floating_point()]
    if floats:
        raise TypeError(f"the inner variables must be floating-point tensors; {floats[:5]} are not")
    spec_ij = from_legacy(ij, legacy, "argmin", allowed=_ARGMIN_LEGACY)
    bilevel_only = [name for name, value in (("solve_over", spec_ij.solve_over != "coupled"),
                                             ("head_damping", spec_ij.head_damping != 0),
                                             ("subset", spec_ij.subset is not None)) if value]
    if bilevel_only:
        raise ValueError(f"argmin solves over every inner variable: ImplicitJacobian's "
                         f"{bilevel_only} apply to bilevel problems only")
    solver = CG(max_iter=100, tol=1e-6) if spec_ij.solver is None else spec_ij.solver
    if solver.observes_gradients:
        raise ValueError(f"argmin cannot use {type(solver).__name__}: it builds its curvature from "
                         "gradients a training loop feeds it (LinearSolver.observe), and argmin "
                         "has none to give; use CG, MINRES, Neumann, Dense or a Nyström solver")
    if on_nonstationary not in ("warn", "raise", "ignore"):
        raise ValueError("on_nonstationary must be 'warn', 'raise' or 'ignore', got "
                         f"{on_nonstationary!r}")
    if (isinstance(stationarity_tol, bool) or not isinstance(stationarity_tol, (int, float))
            or not stationarity_tol >= 0):
        raise ValueError(f"stationarity_tol must be a number >= 0, got {stationarity_tol!r}")
    grad_args = _args_requiring_grad(args)
    if grad_args:
        raise ValueError(
            f"argmin: positional argument(s) {grad_args} after x require grad, but *args are held "
            "fixed and get no gradient; pass such tensors in x (e.g. another argmin's output)"
        )
    with torch.no_grad():
        value = objective({n: t.detach() for n, t in y.items()},
                          {n: t.detach() for n, t in x.items()}, *args)
    if not isinstance(value, Tensor) or value.ndim != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"argmin: the inner objective g(y, x, *args) must return a scalar tensor, "
                         f"got {shape}; reduce it (e.g. .mean()) first")
    if check_finite:
        require_finite(value, "inner objective")
    spec = _Spec(objective, list(y), list(x), args, spec_ij, solver, check_finite,
                 reducer if reducer is not None else dict, on_solve, on_nonstationary,
                 float(stationarity_tol))
    outputs = _Argmin.apply(spec, *x.values(), *y.values())
    return dict(zip(spec.y_names, outputs))
