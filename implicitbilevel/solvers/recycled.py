"""Recycled Krylov solvers: one matrix, many right-hand sides.

Within one BiSSL alternation every upper step solves ``A x = b`` with the same
``A = D + H/μ`` (thesis eq. 4.8-4.9, Algorithm 3) and a new ``b``. A Krylov solve discovers the
eigenvectors of ``A`` that slow it down (the smallest eigenvalues for CG, those nearest zero for
MINRES) and then forgets them; these solvers keep them. Each solve records the vectors it
multiplied by ``A`` and their products, and extracts from them (and the space it already had) a
``k``-dimensional space ``W`` with ``AW`` known, by Rayleigh–Ritz (CG: the smallest Ritz values)
or harmonic Rayleigh–Ritz (MINRES: the harmonic Ritz values nearest zero; Paige, Parlett &
van der Vorst 1995). The next solve on the same operator is **deflated** by ``W``: the
Galerkin projection onto ``W`` is solved exactly, and the Krylov method (CG or MINRES, unchanged:
the same stopping rules and breakdown reports) only has to resolve what is left:

- **CG** (Saad et al. 2000): ``x = x0 + W E⁻¹ Wᵀ r0 + x̃``, ``E = WᵀAW``, and CG on
  ``A x̃ = P_D r0`` (``P_D = I − AW E⁻¹ Wᵀ``) preconditioned by the symmetric positive definite
  ``P_Dᵀ M⁻¹ P_D + W E⁻¹ Wᵀ`` (the balancing form, Mandel 1993, which Tang, Nabben, Vuik &
  Erlangga 2009 find the most robust to rounding and to an inexact ``W``): its iterates are
  A-orthogonal to ``W``, so CG runs as on ``A`` with the eigenvalues of ``W`` removed;
- **MINRES** (GCRO form, Parks et al. 2006; RMINRES, Wang, de Sturler & Paulino 2007): with
  ``C = AU`` orthonormal (``U = W R⁻¹``, ``AW = CR``) and ``Π = I − CCᵀ``,
  ``x = x0 + U Cᵀ r0 + x̃ − U Cᵀ A x̃`` and MINRES on ``(ΠAΠ + σCCᵀ) x̃ = Π r0``, symmetric and
  equal to ``A`` compressed to ``C⊥`` there, so the residual ``b − A x = Π r0 − ΠA x̃`` is
  minimised over ``span(U) ⊕ K_m`` and non-increasing. ``Cᵀ A x̃`` costs no product: it is
  ``B y`` for MINRES's coefficients ``y`` (from the Lanczos tridiagonal the operator records)
  and ``B = CᵀAV`` (computed for the projection anyway). ``σ`` keeps the ``C`` directions away
  from an eigenvalue 0, where the Lanczos recurrence would amplify their rounding errors.

Per product: ``O(nk)`` for the projections; ``AW`` comes from recorded products, so the Galerkin
start costs none (with a preconditioner, RecycledMINRES spends one product on ``A x̃``).

The space is rebuilt when the operator changes (the solvers' ``prepare`` compares the curvature
operator of an :class:`~implicitbilevel.IJSystem`, held by weak reference, and ``μ``,
``D``, the ridge; for a plain callable, the callable itself): it is per-operator state and is
**not** checkpointed (:meth:`~implicitbilevel.LinearSolver.state_dict` stays empty; after a
resume the first solve rebuilds it). The BiSSL trainer checkpoints between alternations, and
every alternation brings a new operator, so a resumed run repeats the uninterrupted one.
:class:`~implicitbilevel.LanczosDeflation` seeds it from eigenpairs of ``H`` so that the first
solve is deflated too.

References:
    Y. Saad, M. Yeung, J. Erhel, F. Guyomarc'h. A deflated version of the conjugate gradient
    algorithm. SIAM J. Sci. Comput. 21(5), 1909-1926, 2000.
    J. Frank, C. Vuik. On the construction of deflation-based preconditioners. SIAM J. Sci.
    Comput. 23(2), 442-462, 2001.
    J. M. Tang, R. Nabben, C. Vuik, Y. A. Erlangga. Comparison of two-level preconditioners
    derived from deflation, domain decomposition and multigrid methods. J. Sci. Comput. 39,
    340-370, 2009.
    M. L. Parks, E. de Sturler, G. Mackey, D. D. Johnson, S. Maiti. Recycling Krylov subspaces
    for sequences of linear systems. SIAM J. Sci. Comput. 28(5), 1651-1674, 2006.
    S. Wang, E. de Sturler, G. H. Paulino. Large-scale topology optimization using
    preconditioned Krylov subspace methods with recycling. Int. J. Numer. Meth. Eng. 69(12),
    2441-2468, 2007 (RMINRES).
    C. C. Paige, B. N. Parlett, H. A. van der Vorst. Approximate solutions and eigenvalue bounds
    from Krylov subspaces. Numer. Linear Algebra Appl. 2(2), 115-133, 1995.
    J. Mandel. Balancing domain decomposition. Commun. Numer. Methods Eng. 9(3), 233-241, 1993.
"""

from .recycled_base import RecycleStats
from .recycled_cg import RecycledCG
from .recycled_minres import RecycledMINRES

__all__ = ["RecycleStats", "RecycledCG", "RecycledMINRES"]
