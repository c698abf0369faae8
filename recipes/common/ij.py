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
``recycled-cg``      deflated CG that keeps the ``recycle_dim`` Ritz vectors of the smallest
                     eigenvalues from one solve to the next within an alternation
                     (:class:`~implicitbilevel.RecycledCG`; positive definite systems, e.g.
                     Gauss–Newton curvature); rebuilt for every alternation's operator
``recycled-minres``  deflated MINRES that keeps the harmonic Ritz vectors nearest zero
                     (:class:`~implicitbilevel.RecycledMINRES`; indefinite systems too, the
                     exact Hessian); its residual never grows
``lanczos-pcg``      CG preconditioned by ``D + VΛ₊Vᵀ/μ``, ``VΛVᵀ`` the ``lanczos_rank``
                     eigenpairs of largest magnitude of the curvature (both signs, positive
                     ones kept), found by block Lanczos once per alternation in
                     ``lanczos_products`` products (:class:`~implicitbilevel.LanczosPreconditioner`)
``lanczos-minres``   MINRES with the same preconditioner (indefinite systems)
``lanczos``          the Woodbury inverse of ``I + VΛVᵀ/μ``: no products per solve; refused,
                     naming the smallest eigenvalue found, unless ``1 + λ_min/μ > 0.01``
                     (:class:`~implicitbilevel.LanczosSolver`)
``dense``            exact (small models only)
===================  ==========================================================================

Settings of the recycled and Lanczos solvers (bounds in :class:`IJSettings`): ``recycle_dim``
(``k``, 1-256, default 16: memory ``2·n·(3k + recycle_window)`` numbers),
``recycle_window`` (directions recorded between two updates of the space, 1-256),
``recycle_lanczos`` (seed the recycle space from the Lanczos eigenpairs, so that the first solve
of an alternation is deflated too, at ``lanczos_products`` extra products per alternation),
``lanczos_rank`` (1-256) and ``lanczos_products`` (``0``: ``max(3k, k + 20)``; else at least
``lanczos_rank``). ``ij_tol`` (every Krylov solver): stop a solve once its relative residual is
at most ``ij_tol`` (``0``, the default: always ``cg_iters`` products, as the thesis). The
recycle space and the Lanczos eigenpairs belong to one alternation's operator: they are rebuilt
for the next one and never enter a checkpoint, so a resumed run (checkpoints fall between
alternations) repeats the uninterrupted one. The lower-level products logged per alternation
(``hessian_products``) include the Lanczos build.

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
    LanczosDeflation,
    LanczosPreconditioner,
    LanczosSolver,
    LinearSolver,
    Neumann,
    NystromPreconditioner,
    NystromSolver,
    OriginalBiSSLCG,
    RecycledCG,
    RecycledMINRES,
)

from .config import Bool, Float, Int, Str, config_block

__all__ = ["IJ_SOLVERS", "IJSettings", "build_solver", "implicit_jacobian", "subset_names"]

_NORM_KINDS = {"batchnorm": nn.modules.batchnorm._NormBase, "layernorm": nn.LayerNorm}

IJSolver = Literal["cg", "reference", "cg-blockwise", "minres", "neumann", "nystrom-pcg",
                   "nystrom-minres", "nystrom", "mfac", "recycled-cg", "recycled-minres",
                   "lanczos-pcg", "lanczos-minres", "lanczos", "dense"]
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
    recycle_dim: Int = Field(16, ge=1, le=256, description="recycled-*: dimension k of the "
                             "space kept from one solve to the next within an alternation")
    recycle_window: Int = Field(20, ge=1, le=256, description="recycled-*: directions recorded "
                                "between two updates of the recycle space")
    recycle_lanczos: Bool = Field(False, description="recycled-*: seed the recycle space from "
                                  "lanczos_rank Lanczos eigenpairs (the first solve deflated too)")
    lanczos_rank: Int = Field(8, ge=1, le=256, description="lanczos-* and recycle_lanczos: "
                              "eigenpairs of the curvature kept")
    lanczos_products: Int = Field(0, ge=0, description="products of the Lanczos build, once per "
                                  "alternation (0: max(3·lanczos_rank, lanczos_rank + 20))")
    ij_tol: Float = Field(0.0, ge=0.0, lt=1.0, description="Krylov solvers: stop once the "
                          "relative residual is at most ij_tol (0: always cg_iters products)")
    warm_start: Bool = Field(False,
                             description="start each solve from the previous one (Krylov solvers)")
    curvature: Literal["hessian", "gauss-newton"] = "hessian"
    solve_over: Literal["coupled", "all"] = Field(
        "coupled", description="all: the concatenated head (Sec. 5.3.4)")
    head_damping: Float = Field(0.0, ge=0.0, description="ridge on the head block (solve_over=all)")
    on_breakdown: Literal["raise", "warn", "ignore"] = "warn"
    ij_subset: Str = Field("none", description="none, batchnorm, layernorm or a regex of backbone "
                           "names: solve the IJ over those only (Sec. 9.1)")
    ij_outside: Literal["identity", "zero"] = Field(
        "identity", description="ij_subset: u = v (identity) or u = 0 on the other names")


def _lanczos(s: IJSettings) -> dict[str, Any]:
    """The Lanczos build's settings."""
    return {"rank": s.lanczos_rank, "products": s.lanczos_products or None}


def build_solver(s: IJSettings) -> LinearSolver:
    """The linear solver named by ``s.ij``."""
    if s.lanczos_products and s.lanczos_products < s.lanczos_rank:
        raise ValueError(f"bissl.lanczos_products = {s.lanczos_products} is below "
                         f"bissl.lanczos_rank = {s.lanczos_rank}: the build needs at least one "
                         "product per eigenpair (0 picks max(3k, k + 20))")
    if s.recycle_lanczos and not s.ij.startswith("recycled-"):
        raise ValueError(f"bissl.recycle_lanczos applies to recycled-cg and recycled-minres, not "
                         f"bissl.ij={s.ij}")
    n = s.cg_iters
    krylov = {"max_iter": n, "tol": s.ij_tol, "warm_start": s.warm_start}
    if s.ij in ("recycled-cg", "recycled-minres"):
        kind = RecycledCG if s.ij == "recycled-cg" else RecycledMINRES
        return kind(**krylov, recycle_dim=s.recycle_dim, window=s.recycle_window,
                    deflation=LanczosDeflation(**_lanczos(s)) if s.recycle_lanczos else None)
    if s.ij in ("lanczos-pcg", "lanczos-minres"):
        kind = CG if s.ij == "lanczos-pcg" else MINRES
        return kind(**krylov, preconditioner=LanczosPreconditioner(**_lanczos(s)))
    if s.ij == "lanczos":
        return LanczosSolver(**_lanczos(s))
    if s.ij == "cg":
        return CG(**krylov)
    if s.ij == "reference":
        return OriginalBiSSLCG(max_iter=n)
    if s.ij == "cg-blockwise":
        return CG(max_iter=n, blockwise=True)
    if s.ij == "minres":
        return MINRES(**krylov)
    if s.ij == "neumann":
        return Neumann(max_iter=n, alpha=s.neumann_alpha)
    if s.ij == "nystrom-pcg":
        return CG(**krylov, preconditioner=NystromPreconditioner(rank=s.nystrom_rank))
    if s.ij == "nystrom-minres":
        return MINRES(**krylov, preconditioner=NystromPreconditioner(rank=s.nystrom_rank))
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
    low_rank = s.ij.startswith(("nystrom", "lanczos")) or s.recycle_lanczos
    if low_rank and s.solve_over == "all":
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
