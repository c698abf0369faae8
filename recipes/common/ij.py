"""The implicit-Jacobian settings of the BiSSL stage, shared by the vision and GPT recipes.

One config block and one builder, so every solver and curvature option exists in both recipes:

===================  ==========================================================================
``bissl.ij``         solver
===================  ==========================================================================
``cg``               conjugate gradients (thesis Algorithm 1), ``cg_iters`` products
``reference``        the original BiSSL code's computation exactly (per-tensor α and β with
                     ``ε = 1e-12``, all ``cg_iters`` iterations whatever the curvature,
                     non-finite values replaced): to reproduce the thesis's numbers
``cg-blockwise``     a cleaned-up per-tensor CG variant (no ``ε``, zero steps on zero blocks)
``minres``           MINRES: symmetric, possibly indefinite systems, ``cg_iters`` products
``neumann``          truncated Neumann series (Sec. 9.1), ``cg_iters`` products, step
                     ``neumann_alpha``
``nystrom-pcg``      CG preconditioned by a rank-``nystrom_rank`` randomized Nyström
                     approximation of the curvature, built once per alternation
``nystrom-minres``   MINRES with the same preconditioner
``nystrom``          the Woodbury inverse of ``I + Ĥ/μ``: no products per solve
``mfac``             M-FAC (Sec. 9.1): the Woodbury inverse of ``I + F̂/μ``, ``F̂`` the
                     empirical Fisher of the last ``mfac_m`` lower-level gradients, one inverse
                     for all names or one per block (``mfac_blocks``); no products
``dense``            exact (small models only)
===================  ==========================================================================

``bissl.curvature``: ``hessian`` (exact) or ``gauss-newton`` (``Jᵀ∇²L J`` of the pretext loss split
into outputs and a convex output loss; positive semi-definite, so CG converges).
``bissl.solve_over``: ``coupled`` (Prop. 4.2) or ``all`` (the concatenated head, Sec. 5.3.4), with
``bissl.head_damping`` on the head block.
``bissl.ij_subset`` (Sec. 9.1, :mod:`implicitbilevel.subset`): solve only over the backbone's
``batchnorm`` or ``layernorm`` affine parameters, or the names a regular expression matches
(``none``: the whole backbone); ``bissl.ij_outside``: ``u = v`` (``identity``) or ``u = 0``
(``zero``) on the other backbone names.
"""

import re
from typing import Any, Literal, get_args

from pydantic import Field
from torch import nn

from implicitbilevel import (
    CG,
    MFAC,
    MINRES,
    Dense,
    GaussNewton,
    ImplicitJacobian,
    LinearSolver,
    Neumann,
    NystromPreconditioner,
    NystromSolver,
    OriginalBiSSLCG,
)

from .config import Bool, Float, Int, Str, config_block

__all__ = ["IJ_SOLVERS", "IJSettings", "build_solver", "implicit_jacobian", "subset_names"]

_NORM_KINDS = {"batchnorm": nn.modules.batchnorm._NormBase, "layernorm": nn.LayerNorm}

IJSolver = Literal["cg", "reference", "cg-blockwise", "minres", "neumann", "nystrom-pcg",
                   "nystrom-minres", "nystrom", "mfac", "dense"]
IJ_SOLVERS = get_args(IJSolver)


@config_block
class IJSettings:
    """Implicit-Jacobian fields of a BiSSL stage config (``bissl.*`` in both recipes)."""

    damping: Float = Field(10.0, ge=0.0, description="λ_damp: the IJ system uses μ = λ + λ_damp")
    ij: IJSolver = Field("cg", description="the IJ solver (see recipes.common.ij)")
    cg_iters: Int = Field(5, ge=1, description="N_c: curvature products per solve")
    neumann_alpha: Float = Field(1.0, gt=0.0, description="step α of the Neumann series")
    nystrom_rank: Int = Field(20, ge=1, description="rank of the Nyström curvature (nystrom-*)")
    mfac_m: Int = Field(20, ge=1, description="gradients in the M-FAC window (mfac)")
    mfac_blocks: Str = Field("global", description="mfac: one Woodbury inverse for all solved "
                             "names (global), one per module (layer), or one per first match of a "
                             r"regular expression (e.g. 'blocks\.\d+': per transformer block)")
    mfac_window_device: Literal["same", "cpu"] = Field(
        "same", description="mfac: keep the gradient window with the parameters or on the CPU")
    warm_start: Bool = Field(False,
                             description="start each solve from the previous one (cg, minres)")
    curvature: Literal["hessian", "gauss-newton"] = "hessian"
    solve_over: Literal["coupled", "all"] = Field(
        "coupled", description="all: the concatenated head (Sec. 5.3.4)")
    head_damping: Float = Field(0.0, ge=0.0, description="ridge on the head block (solve_over=all)")
    on_breakdown: Literal["raise", "warn", "ignore"] = "warn"
    ij_subset: Str = Field("none", description="none, batchnorm, layernorm or a regex of backbone "
                           "names: solve the IJ over those only (Sec. 9.1)")
    ij_outside: Literal["identity", "zero"] = Field(
        "identity", description="ij_subset: u = v (identity) or u = 0 on the other names")


def build_solver(s: IJSettings) -> LinearSolver:
    """The linear solver named by ``s.ij``."""
    n = s.cg_iters
    if s.ij == "cg":
        return CG(max_iter=n, warm_start=s.warm_start)
    if s.ij == "reference":
        return OriginalBiSSLCG(max_iter=n)
    if s.ij == "cg-blockwise":
        return CG(max_iter=n, blockwise=True)
    if s.ij == "minres":
        return MINRES(max_iter=n, warm_start=s.warm_start)
    if s.ij == "neumann":
        return Neumann(max_iter=n, alpha=s.neumann_alpha)
    if s.ij == "nystrom-pcg":
        return CG(max_iter=n, warm_start=s.warm_start,
                  preconditioner=NystromPreconditioner(rank=s.nystrom_rank))
    if s.ij == "nystrom-minres":
        return MINRES(max_iter=n, warm_start=s.warm_start,
                      preconditioner=NystromPreconditioner(rank=s.nystrom_rank))
    if s.ij == "nystrom":
        return NystromSolver(rank=s.nystrom_rank)
    if s.ij == "mfac":
        return MFAC(m=s.mfac_m, blocks=s.mfac_blocks,
                    window_device=None if s.mfac_window_device == "same" else "cpu")
    if s.ij == "dense":
        return Dense()
    raise ValueError(f"bissl.ij: unknown solver {s.ij!r}; choose one of {list(IJ_SOLVERS)}")


def subset_names(spec: str, model: nn.Module | None, backbone: list[str]) -> list[str] | None:
    """The backbone names ``bissl.ij_subset`` selects (``None`` for ``none``).

    ``batchnorm`` and ``layernorm`` select the affine parameters of the model's BatchNorm or
    LayerNorm modules; anything else is a regular expression searched in each backbone name.
    """
    if spec == "none":
        return None
    if spec in _NORM_KINDS:
        if model is None:
            raise ValueError(f"bissl.ij_subset={spec} needs the model to find its norm layers")
        kind = _NORM_KINDS[spec]
        owned = {f"{m}.{p}" if m else p for m, sub in model.named_modules()
                 if isinstance(sub, kind) for p, _ in sub.named_parameters(recurse=False)}
        names = [n for n in backbone if n in owned]
    else:
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ValueError(f"bissl.ij_subset: {spec!r} is neither none, batchnorm, layernorm "
                             f"nor a valid regular expression ({err})") from err
        names = [n for n in backbone if pattern.search(n)]
    if not names:
        raise ValueError(f"bissl.ij_subset={spec} selects no backbone parameter of this model "
                         f"(e.g. {backbone[:3]}); choose none, batchnorm, layernorm or a regex")
    return names


def implicit_jacobian(
    s: IJSettings, gauss_newton: GaussNewton | None, model: nn.Module | None = None,
    backbone: list[str] | None = None,
) -> ImplicitJacobian:
    """The :class:`~implicitbilevel.ImplicitJacobian` of these settings, for
    :class:`~implicitbilevel.BilevelProblem`.

    ``gauss_newton`` is the recipe's split of its pretext loss (outputs, convex output loss); it is
    used when ``s.curvature == "gauss-newton"``. ``model`` (the pretext model) and ``backbone``
    (its coupled names) resolve ``s.ij_subset``.
    """
    if s.curvature == "gauss-newton":
        if gauss_newton is None:
            raise ValueError("bissl.curvature=gauss-newton needs the pretext loss's output split")
        curvature: Any = gauss_newton
    else:
        curvature = "hessian"
    if s.head_damping and s.solve_over != "all":
        raise ValueError("bissl.head_damping applies only with bissl.solve_over=all")
    if s.ij.startswith("nystrom") and s.solve_over == "all":
        raise ValueError(f"bissl.ij={s.ij} assumes the system I + H/μ over the coupled names; "
                         "use bissl.solve_over=coupled, or bissl.ij=minres for the concatenated "
                         "head")
    if s.ij == "mfac" and s.solve_over == "all" and not s.head_damping:
        raise ValueError("bissl.ij=mfac with bissl.solve_over=all needs bissl.head_damping > 0 "
                         "(M-FAC inverts the damping D of D + F̂/μ)")
    return ImplicitJacobian(
        build_solver(s),
        damping=s.damping,
        solve_over=s.solve_over,
        head_damping=s.head_damping,
        curvature=curvature,
        on_breakdown=s.on_breakdown,
        subset=subset_names(s.ij_subset, model, list(backbone or [])),
        outside=s.ij_outside,
        # M-FAC takes no curvature products: keep no graph (the logged residual re-runs the loss).
        reuse_graph=s.ij != "mfac",
    )
