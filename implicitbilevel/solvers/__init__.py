"""Linear solvers over parameter dicts: ``A x = b`` given only ``matvec(v) = A v``.

Every solver has the same shape, ``solver(matvec, b, x0=None) -> (x, SolveInfo)``, so swapping one
for another is changing one name. The matrix is never a type, only a callable; :class:`Dense`
materialises it column by column for small problems and reference checks. Work that depends only
on the matrix happens once per operator in :meth:`LinearSolver.prepare`, the rest per right-hand
side (``implicitbilevel.solvers.base``).

In a bilevel problem the system is the implicit-Jacobian system of thesis eq. 4.8-4.9 (Algorithm 3):

.. math::
    \\Big(I + \\tfrac{1}{\\lambda + \\lambda_{damp}} \\nabla^2_\\theta \\mathcal{L}^P\\Big) u = v,

but the solvers are generic: which system is solved is the problem's choice
(:class:`~implicitbilevel.ImplicitJacobian`'s ``solve_over`` and ``head_damping``).

=========================  ================================================  =====================
solver                     system                                            products per solve
=========================  ================================================  =====================
:class:`CG`                symmetric positive definite                       ``max_iter``
:class:`MINRES`            symmetric, possibly indefinite                    ``max_iter``
:class:`Neumann`           eigenvalues of ``αA`` in ``(0, 2)``               ``max_iter``
:class:`Dense`             any non-singular (small)                          one per unknown
:class:`NystromSolver`     ``I + H/μ``, ``H`` positive semi-definite         0 (``k`` per operator)
:class:`MFAC`              ``D + F̂/μ``, ``F̂`` an empirical Fisher            0
:class:`OriginalBiSSLCG`   the original BiSSL code's per-tensor CG (exact)   ``max_iter``
:class:`RecycledCG`        symmetric positive definite, many ``b``           fewer after the first
:class:`RecycledMINRES`    symmetric, possibly indefinite, many ``b``        fewer after the first
:class:`LanczosSolver`     ``I + H/μ``, ``1 + λ_min(H)/μ`` not small         0 (``m`` per operator)
=========================  ================================================  =====================
"""

from .base import LinearSolver, MatVec, Preconditioner, SolveInfo, SolverBreakdownError
from .block_lanczos import Eigenpairs, lanczos_eigenpairs
from .cg import CG
from .dense import Dense
from .lanczos import LanczosDeflation, LanczosPreconditioner, LanczosSolver
from .mfac import MFAC, GradientWindow
from .minres import MINRES
from .neumann import Neumann
from .nystrom import NystromPreconditioner, NystromSolver
from .original import OriginalBiSSLCG
from .randomized_nystrom import LowRank, nystrom_approximation
from .recycled import RecycledCG, RecycledMINRES, RecycleStats

__all__ = [
    "CG",
    "MFAC",
    "MINRES",
    "Dense",
    "Eigenpairs",
    "GradientWindow",
    "LanczosDeflation",
    "LanczosPreconditioner",
    "LanczosSolver",
    "LinearSolver",
    "LowRank",
    "MatVec",
    "Neumann",
    "NystromPreconditioner",
    "NystromSolver",
    "OriginalBiSSLCG",
    "Preconditioner",
    "RecycleStats",
    "RecycledCG",
    "RecycledMINRES",
    "SolveInfo",
    "SolverBreakdownError",
    "lanczos_eigenpairs",
    "nystrom_approximation",
]
