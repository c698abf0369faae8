"""The implicit-Jacobian system and the one implicit step shared by
:class:`~implicitbilevel.BilevelProblem` and :func:`~implicitbilevel.argmin`.

By the implicit function theorem (thesis Theorem 3.2), at a stationary point of the inner objective
``G`` the hypergradient's implicit part is

.. math::

    -\\nabla^2_{xy} G \\, \\big[\\nabla^2_{yy} G\\big]^{-1} v,

``v`` the upper gradient with respect to ``y``. Three pieces live here:

- :class:`ImplicitJacobian`, the value object saying how the system is formed and solved (the
  solver, the curvature and how its products are taken, which variables are solved over, the
  damping, the breakdown policy);
- :class:`IJSystem`, the matrix ``A = ∇²_yy r + ∇²_yy ℓ / μ`` over the solved names as a
  ``matvec``: for the proximal regulariser over the coupled names ``A = I + H/μ`` (eq. 4.8-4.9,
  Algorithm 3), over all lower variables (the concatenated head, Sec. 5.3.4, Cor. 5.6)
  ``A = diag(I, εI) + H_ω/μ``;
- ``implicit_step``: prepare the solver for the operator, solve ``A u = v``, apply the
  breakdown policy and the mixed vector-Jacobian product ``u ↦ ∇_x ⟨∇_y ·, u⟩``.

``BilevelProblem`` splits ``G`` as ``ℓ(y) + λ r(x, y)`` (``A = ∇²r + ∇²ℓ/μ``, mixed term of
``r``), the argmin not at all (``A = ∇²G``, mixed term of ``G``). Within one BiSSL alternation the
lower point and the Hessian batch are fixed, so every upper step solves with the same ``A``: the
curvature operator is built once per alternation
(:meth:`BilevelProblem.lower_hessian <implicitbilevel.BilevelProblem.lower_hessian>`) and a
solver's per-operator work (:meth:`LinearSolver.prepare <implicitbilevel.LinearSolver.prepare>`:
a Nyström sketch, an M-FAC factorisation) is done once for it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ._checks import check_bool, require_finite
from .curvature.gauss_newton import GaussNewton, GaussNewtonOperator
from .curvature.hessian import _MODES, HessianOperator, HVPMode
from .errors import SolverBreakdownError
from .solvers.base import LinearSolver, SolveInfo
from .subset import IJSubset, Outside
from .tree import Params, tree_dot, tree_scale

__all__ = ["IJSystem", "ImplicitJacobian", "ImplicitStep", "implicit_step"]

Curvature = Literal["hessian"] | GaussNewton
BreakdownPolicy = Literal["raise", "warn", "ignore"]


def check_curvature(curvature: Any) -> None:
    """Reject anything but ``"hessian"`` or a :class:`~implicitbilevel.GaussNewton`."""
    if not (curvature == "hessian" or isinstance(curvature, GaussNewton)):
        raise TypeError("curvature must be 'hessian' or a GaussNewton(outputs, output_loss), "
                        f"got {curvature!r}")


def check_policy(on_breakdown: Any) -> None:
    """Reject an unknown breakdown policy."""
    if on_breakdown not in ("raise", "warn", "ignore"):
        raise ValueError(
            f"on_breakdown must be 'raise', 'warn' or 'ignore', got {on_breakdown!r}"
        )


def check_solver(solver: Any, what: str) -> None:
    """Reject a solver that is not a :class:`~implicitbilevel.LinearSolver`."""
    if not isinstance(solver, LinearSolver):
        raise TypeError(f"{what} must be a LinearSolver (CG, MINRES, Neumann, ...), "
                        f"got {type(solver).__name__}")


@dataclass(frozen=True)
class ImplicitJacobian:
    """How the implicit-Jacobian system is formed and solved: one value shared by
    :class:`~implicitbilevel.BilevelProblem` (``ij=``) and :func:`~implicitbilevel.argmin`
    (``ij=``).

    For a bilevel problem the system is ``(∇²_yy r + ∇²_yy ℓ / μ)_{SS} u = ∇_{y_S} f`` with
    ``μ = λ + damping`` (thesis eq. 4.8-4.9, Algorithm 3); for the argmin it is
    ``(∇²_yy g + δI) u = dL/dy*`` with ``δ = damping``.

    Attributes:
        solver: the linear solver (:class:`~implicitbilevel.CG`, :class:`~implicitbilevel.MINRES`,
            :class:`~implicitbilevel.Neumann`, :class:`~implicitbilevel.Dense`,
            :class:`~implicitbilevel.NystromSolver`, :class:`~implicitbilevel.MFAC`, or CG/MINRES
            with a :class:`~implicitbilevel.NystromPreconditioner`). ``None``: ``CG()`` over the
            coupled variables, ``MINRES()`` over all of them, ``CG(max_iter=100, tol=1e-6)`` for
            the argmin.
        damping: ``λ_damp ≥ 0`` (thesis default 10; 0 for the exact hypergradient). For the
            argmin, ``δ ≥ 0`` added to the inner Hessian.
        curvature: ``"hessian"`` (exact) or a :class:`~implicitbilevel.GaussNewton` splitting the
            loss into outputs and a convex output loss (positive semi-definite curvature).
        solve_over: ``"coupled"`` (Prop. 4.2, the pretext head held fixed) or ``"all"`` (the
            concatenated head, Sec. 5.3.4). Bilevel problems only.
        head_damping: ``ε ≥ 0`` added on the head block with ``solve_over="all"``.
        subset: solve over a subset ``S`` of the solved names only (names, or a predicate
            ``name -> bool``), the curvature outside ``S × S`` taken as zero (Sec. 9.1;
            :mod:`implicitbilevel.subset`). ``None``: every solved name.
        outside: with ``subset``, ``u`` on the coupled names outside ``S``: ``"identity"``
            (``u = v``) or ``"zero"`` (``u = 0``).
        hvp_mode: how curvature products are formed (:data:`~implicitbilevel.HVPMode`).
        reuse_graph: build the loss's first-order graph once per operator and reuse it for every
            product (faster, more memory; :mod:`implicitbilevel.curvature.hessian`).
        on_breakdown: ``"raise"`` a :class:`~implicitbilevel.SolverBreakdownError`, ``"warn"``
            and use the iterate reached, or ``"ignore"``.

    Example:
        >>> from implicitbilevel import CG, ImplicitJacobian
        >>> ij = ImplicitJacobian(CG(max_iter=5), damping=10.0)
        >>> ij.damping, ij.solve_over
        (10.0, 'coupled')
    """

    solver: LinearSolver | None = None
    damping: float = 0.0
    curvature: Literal["hessian"] | GaussNewton = "hessian"
    solve_over: Literal["coupled", "all"] = "coupled"
    head_damping: float = 0.0
    subset: Iterable[str] | Callable[[str], bool] | None = field(default=None, compare=False)
    outside: Outside = "identity"
    hvp_mode: HVPMode = "auto"
    reuse_graph: bool = True
    on_breakdown: Literal["raise", "warn", "ignore"] = "raise"

    def __post_init__(self) -> None:
        if self.solver is not None:
            check_solver(self.solver, "solver")
        for name in ("damping", "head_damping"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.solve_over not in ("coupled", "all"):
            raise ValueError(f"solve_over must be 'coupled' or 'all', got {self.solve_over!r}")
        if self.head_damping and self.solve_over != "all":
            raise ValueError("head_damping applies to the head block, which is only solved over "
                             "with solve_over='all'")
        check_curvature(self.curvature)
        if self.outside not in ("identity", "zero"):
            raise ValueError(f"outside must be 'identity' or 'zero', got {self.outside!r}")
        if self.hvp_mode not in _MODES:
            raise ValueError(f"hvp_mode must be one of {_MODES}, got {self.hvp_mode!r}")
        check_bool(self.reuse_graph, "reuse_graph")
        check_policy(self.on_breakdown)

    def ij_subset(self) -> IJSubset | None:
        """The :class:`~implicitbilevel.IJSubset` of ``subset`` and ``outside`` (``None``: all)."""
        return None if self.subset is None else IJSubset(self.subset, self.outside)


#: The keywords :class:`~implicitbilevel.BilevelProblem` took before :class:`ImplicitJacobian`,
#: mapped to its fields (accepted with a ``DeprecationWarning`` for one release).
LEGACY_KEYWORDS = {"ij": "solver", "damping": "damping", "curvature": "curvature",
                   "solve_over": "solve_over", "head_damping": "head_damping",
                   "ij_subset": "subset", "ij_outside": "outside", "hvp_mode": "hvp_mode",
                   "reuse_graph": "reuse_graph", "on_breakdown": "on_breakdown",
                   "solver": "solver"}


def from_legacy(ij: Any, legacy: Mapping[str, Any], who: str, stacklevel: int = 3,
                allowed: Sequence[str] | None = None) -> ImplicitJacobian:
    """The :class:`ImplicitJacobian` meant by ``ij=`` and the old keywords ``legacy``.

    An ``ImplicitJacobian`` is returned as is; a bare :class:`~implicitbilevel.LinearSolver` as
    ``ij``, or any old keyword, builds one with a ``DeprecationWarning`` naming the new spelling.
    Mixing an ``ImplicitJacobian`` with old keywords, or an unknown keyword, is a ``TypeError``.
    """
    known = LEGACY_KEYWORDS if allowed is None else {k: LEGACY_KEYWORDS[k] for k in allowed}
    unknown = sorted(set(legacy) - set(known))
    if unknown:
        raise TypeError(f"{who} got unexpected keyword arguments {unknown}")
    if isinstance(ij, ImplicitJacobian):
        if legacy:
            raise TypeError(f"{who}: give the implicit-Jacobian settings either as "
                            f"ij=ImplicitJacobian(...) or as keywords, not both ({sorted(legacy)})")
        return ij
    fields = {known[k]: v for k, v in legacy.items()}
    if ij is not None:
        fields["solver"] = ij
    if fields:
        spelled = ", ".join(f"{k}=..." for k in fields)
        given = sorted(set(legacy) | ({"ij"} if ij is not None else set()))
        warnings.warn(f"{who}: passing {given} directly is deprecated; write "
                      f"ij=ImplicitJacobian({spelled})",
                      DeprecationWarning, stacklevel=stacklevel)
    try:
        return ImplicitJacobian(**fields)
    except (TypeError, ValueError) as err:  # name the keyword as the caller wrote it
        renamed = [f"{old}= is ImplicitJacobian's {new}" for old, new in known.items()
                   if old in legacy and old != new]
        if not renamed:
            raise
        raise type(err)(f"{err} ({'; '.join(renamed)})") from err


class IJSystem:
    """``z ↦ A z = D z + (H z)/μ``: the implicit-Jacobian matrix as a callable ``matvec``.

    Args:
        curvature: ``z ↦ H z`` over the solved names (:class:`~implicitbilevel.HessianOperator`
            or :class:`~implicitbilevel.GaussNewtonOperator`): has ``names``, ``batched``,
            ``psd`` and a ``memo`` dict.
        mu: ``μ = λ + λ_damp``.
        identity: the names on which ``D`` is the identity (the coupled names of a proximal
            regulariser; ``[]`` for ``A = H/μ``); ``None`` when ``D`` is given by ``lower_hvp``.
        lower_hvp: ``z ↦ ∇²_yy r · z`` (for a general regulariser), used when ``identity`` is
            ``None``.
        ridge: ``ε`` added on ``ridge_names`` (the head block of the concatenated-head system).
        ridge_names: the names the ridge applies to.
        reducer: averages curvature products across data-parallel ranks (``dict``: none).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> H = ib.HessianOperator(lambda p: 0.5 * p["w"] @ Q @ p["w"],
        ...                        {"w": torch.zeros(2, dtype=torch.float64)})
        >>> A = ib.IJSystem(H, mu=2.0, identity=["w"])                    # A = I + Q / 2
        >>> z = {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}
        >>> torch.allclose(A(z)["w"], (torch.eye(2, dtype=torch.float64) + Q / 2) @ z["w"])
        True
    """

    def __init__(
        self,
        curvature: Any,
        mu: float,
        *,
        identity: Sequence[str] | None,
        lower_hvp: Callable[[Params], Params] | None = None,
        ridge: float = 0.0,
        ridge_names: Sequence[str] = (),
        reducer: Callable[[Mapping[Any, Tensor]], dict] = dict,
    ) -> None:
        if identity is None and lower_hvp is None:
            raise ValueError("IJSystem needs the identity names or a lower_hvp")
        self.curvature = curvature
        self.mu = float(mu)
        self.names = list(curvature.names)
        self.identity = None if identity is None else list(identity)
        self.lower_hvp = lower_hvp
        self.ridge = float(ridge)
        self.ridge_names = list(ridge_names) if ridge else []
        self.reducer = reducer
        self.products = 0

    @property
    def identity_plus_curvature(self) -> bool:
        """Whether ``A = I + H/μ`` on every solved name (what the Nyström solvers assume)."""
        return self.identity is not None and set(self.identity) == set(self.names)

    def diagonal(self) -> dict[str, float] | None:
        """``D`` as one scalar per solved name (1 on the identity names, the ridge ``ε`` on the
        head block, 0 elsewhere), or ``None`` when ``D`` is a regulariser's Hessian product
        rather than a per-name diagonal."""
        if self.identity is None:
            return None
        identity, ridge = set(self.identity), set(self.ridge_names)
        return {n: 1.0 if n in identity else (self.ridge if n in ridge else 0.0)
                for n in self.names}

    def curvature_product(self, z: Mapping[str, Tensor]) -> Params:
        """``H z`` (averaged across ranks)."""
        self.products += 1
        return self.reducer(self.curvature(z))

    def curvature_batched(self, zs: Mapping[str, Tensor]) -> Params:
        """``H z_i`` for a leading batch dimension ``k`` on every entry (averaged across ranks)."""
        self.products += next(iter(zs.values())).shape[0]
        return self.reducer(self.curvature.batched(zs))

    def __call__(self, z: Mapping[str, Tensor]) -> Params:
        """``A z``."""
        out = tree_scale(self.curvature_product(z), 1.0 / self.mu)
        if self.identity is not None:
            names = [n for n in self.identity if n in z]
            if names:  # an empty identity block is A = H/μ
                torch._foreach_add_([out[n] for n in names], [z[n] for n in names])
        else:
            reg = self.lower_hvp(z)  # type: ignore[misc]
            torch._foreach_add_([out[n] for n in reg], list(reg.values()))
        if self.ridge_names:
            torch._foreach_add_([out[n] for n in self.ridge_names],
                                [z[n] for n in self.ridge_names], alpha=self.ridge)
        return out


def curvature_operator(
    loss: Callable[..., Tensor],
    curvature: Curvature,
    point: Mapping[str, Tensor],
    args: tuple,
    *,
    embed: Callable[[Params], Any],
    mode: HVPMode,
    reuse: bool,
) -> HessianOperator | GaussNewtonOperator:
    """``z ↦ ∇²_yy loss · z`` over the names of ``point`` (or the Gauss–Newton matrix).

    ``loss(embed(sub), *args)`` (``curvature.outputs(embed(sub), *args)`` for Gauss–Newton) is
    evaluated with ``sub`` the solved variables; ``embed`` completes them to what the loss takes
    (the held-fixed lower variables of a :class:`~implicitbilevel.BilevelProblem`).
    """
    if isinstance(curvature, GaussNewton):
        outputs = curvature.outputs

        def outputs_over_solved(sub: Params, *args_: Any) -> Any:
            return outputs(embed(sub), *args_)

        return GaussNewtonOperator(outputs_over_solved, curvature.output_loss, point, *args,
                                   mode=mode, reuse=reuse)

    def loss_over_solved(sub: Params, *args_: Any) -> Tensor:
        return loss(embed(sub), *args_)

    return HessianOperator(loss_over_solved, point, *args, mode=mode, reuse=reuse)


def handle_breakdown(info: SolveInfo, policy: BreakdownPolicy, where: str, t: int | None = None,
                     stacklevel: int = 2) -> None:
    """Apply the breakdown policy to a solve's diagnostics (``where`` names the solve, ``t`` the
    alternation if there is one)."""
    if info.breakdown is None or policy == "ignore":
        return
    at = "" if t is None else f" at alternation {t}"
    message = f"{where} broke down{at} after {info.iterations} iterations: {info.breakdown}"
    if policy == "raise":
        raise SolverBreakdownError(message, info)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


@dataclass
class ImplicitStep:
    """One implicit step: ``u = A⁻¹ v`` and the mixed product ``∇_x ⟨∇_y ·, u⟩``."""

    u: Params
    info: SolveInfo
    mixed: Params
    prepare_seconds: float = 0.0


def implicit_step(
    system: IJSystem,
    rhs: Mapping[str, Tensor],
    solver: LinearSolver,
    mixed_vjp: Callable[[Params], Params],
    *,
    on_breakdown: BreakdownPolicy,
    check_finite: bool,
    where: str,
    t: int | None = None,
    stacklevel: int = 2,
) -> ImplicitStep:
    """Prepare ``solver`` for ``A`` (once per operator), solve ``A u = v``, apply the breakdown
    policy, return ``u`` and the mixed product ``mixed_vjp(u)`` (the implicit part of the
    hypergradient is its negative)."""
    seconds = solver.prepare(system)
    u, info = solver(system, dict(rhs))
    handle_breakdown(info, on_breakdown, where, t, stacklevel + 1)
    if check_finite:
        require_finite(tree_dot(u, u), "implicit-Jacobian solution", t)
    return ImplicitStep(u, info, mixed_vjp(u), seconds)


