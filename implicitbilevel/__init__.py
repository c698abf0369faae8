"""implicitbilevel: implicit differentiation through bilevel problems in PyTorch.

The package is layered, each layer knowing only those below it:

1. :mod:`implicitbilevel.tree`: arithmetic on parameter dicts ``{name: Tensor}``.
2. :mod:`implicitbilevel.curvature`: products with the lower-level curvature (the exact Hessian on
   ``torch.func``, the generalised Gauss–Newton matrix), one tangent or ``k`` batched.
3. :mod:`implicitbilevel.solvers`: linear solvers over parameter dicts (CG, MINRES, Neumann,
   dense, Nyström, M-FAC), each preparing once per operator and solving per right-hand side.
4. :mod:`implicitbilevel.implicit_jacobian`: the implicit-Jacobian system, its settings
   (:class:`ImplicitJacobian`) and the one implicit step shared by the two entry points below.
5. :class:`BilevelProblem` (:mod:`implicitbilevel.problem`) and the differentiable :func:`argmin`
   (:mod:`implicitbilevel.implicit_argmin`), with regularisers (:mod:`implicitbilevel.regularizers`)
   and λ constant, scheduled or learnable (:mod:`implicitbilevel.lam`); what they return is in
   :mod:`implicitbilevel.results`, what they raise in :mod:`implicitbilevel.errors`.
6. :mod:`implicitbilevel.bissl`: the BiSSL trainer (thesis Algorithm 2) with its batch stacks,
   run state, log and checkpoints; :mod:`implicitbilevel.parallel`: all-reduce helpers and a
   twice-differentiable SyncBatchNorm for data-parallel runs.
"""

from .curvature import (
    CurvatureOperator,
    GaussNewton,
    GaussNewtonOperator,
    HessianOperator,
    HVPMode,
    functional_module,
    hvp,
    in_hvp,
)
from .errors import CheckpointError, HVPModeError, NonFiniteError, SolverBreakdownError
from .implicit_argmin import ArgminSolve, argmin
from .implicit_jacobian import IJSystem, ImplicitJacobian
from .lam import (
    ConstantSchedule,
    CosineDecay,
    CosineIncrease,
    ExponentialIncrease,
    LambdaSchedule,
    LearnableLambda,
)
from .problem import BilevelProblem
from .regularizers import BaseRegularizer, ProximalL2, Regularizer, SumRegularizer
from .results import LowerGradient, UpperGradient, assign_grads
from .solvers import (
    CG,
    MFAC,
    MINRES,
    Dense,
    Eigenpairs,
    GradientWindow,
    LanczosDeflation,
    LanczosPreconditioner,
    LanczosSolver,
    LinearSolver,
    LowRank,
    Neumann,
    NystromPreconditioner,
    NystromSolver,
    OriginalBiSSLCG,
    RecycledCG,
    RecycledMINRES,
    RecycleStats,
    SolveInfo,
    lanczos_eigenpairs,
    nystrom_approximation,
)
from .stochastic import (
    BOME,
    F2SA,
    SABA,
    SOBA,
    AmIGO,
    BilevelOracles,
    PolynomialDecay,
    StocBiO,
)
from .subset import IJSubset
from .tree import Params

__version__ = "0.1.0"

__all__ = [
    "BOME",
    "CG",
    "F2SA",
    "SABA",
    "SOBA",
    "AmIGO",
    "ArgminSolve",
    "BaseRegularizer",
    "BilevelOracles",
    "BilevelProblem",
    "CheckpointError",
    "ConstantSchedule",
    "CosineDecay",
    "CosineIncrease",
    "CurvatureOperator",
    "Dense",
    "Eigenpairs",
    "ExponentialIncrease",
    "GaussNewton",
    "GaussNewtonOperator",
    "GradientWindow",
    "HVPMode",
    "HVPModeError",
    "HessianOperator",
    "IJSubset",
    "IJSystem",
    "ImplicitJacobian",
    "LanczosDeflation",
    "LanczosPreconditioner",
    "LanczosSolver",
    "LambdaSchedule",
    "LearnableLambda",
    "LinearSolver",
    "LowRank",
    "LowerGradient",
    "MFAC",
    "MINRES",
    "Neumann",
    "NonFiniteError",
    "NystromPreconditioner",
    "NystromSolver",
    "OriginalBiSSLCG",
    "Params",
    "PolynomialDecay",
    "ProximalL2",
    "Regularizer",
    "RecycleStats",
    "RecycledCG",
    "RecycledMINRES",
    "SolveInfo",
    "SolverBreakdownError",
    "StocBiO",
    "SumRegularizer",
    "UpperGradient",
    "argmin",
    "assign_grads",
    "functional_module",
    "hvp",
    "in_hvp",
    "lanczos_eigenpairs",
    "nystrom_approximation",
]
