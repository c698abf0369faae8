"""implicitbilevel: implicit differentiation through bilevel problems in PyTorch.

The pieces, bottom to top: parameter-dict arithmetic (:mod:`implicitbilevel.tree`), Hessian-vector
products on ``torch.func`` (:mod:`implicitbilevel.hessian`), linear solvers over parameter dicts
(:mod:`implicitbilevel.solvers`: CG, MINRES, Neumann, dense), generalised Gauss–Newton curvature
(:mod:`implicitbilevel.gauss_newton`), randomized Nyström curvature reused across solves
(:mod:`implicitbilevel.nystrom`), the M-FAC empirical-Fisher solve
(:mod:`implicitbilevel.mfac`), the implicit-Jacobian operator (:mod:`implicitbilevel.system`),
λ schedules (:mod:`implicitbilevel.schedules`), regularisers
(:mod:`implicitbilevel.regularizers`), the :class:`BilevelProblem` (:mod:`implicitbilevel.problem`),
the differentiable :func:`argmin` (:mod:`implicitbilevel.implicit_argmin`, the same implicit step
for an inner problem solved by any means) and the BiSSL trainer (:mod:`implicitbilevel.bissl`).
Data-parallel runs use :mod:`implicitbilevel.distributed` (bucketed all-reduce and broadcast) and
:mod:`implicitbilevel.sync_batchnorm` (BatchNorm over all ranks, twice differentiable).
"""

from .gauss_newton import GaussNewton, GaussNewtonOperator
from .hessian import HessianOperator, HVPMode, HVPModeError, functional_module, hvp, in_hvp
from .implicit_argmin import ArgminSolve, argmin
from .mfac import MFAC, GradientWindow
from .nystrom import LowRank, NystromPreconditioner, NystromSolver, nystrom_approximation
from .problem import BilevelProblem, LowerGradient, NonFiniteError, UpperGradient, assign_grads
from .regularizer_sum import SumRegularizer
from .regularizers import BaseRegularizer, ProximalL2, Regularizer
from .schedules import (
    ConstantSchedule,
    CosineDecay,
    CosineIncrease,
    ExponentialIncrease,
    LambdaSchedule,
    LearnableLambda,
)
from .solvers import CG, Dense, LinearSolver, Neumann, SolveInfo, SolverBreakdownError
from .solvers.minres import MINRES
from .subset import IJSubset
from .system import IJSystem
from .tree import Params

__version__ = "0.1.0"

__all__ = [
    "CG",
    "ArgminSolve",
    "BaseRegularizer",
    "BilevelProblem",
    "ConstantSchedule",
    "CosineDecay",
    "CosineIncrease",
    "Dense",
    "ExponentialIncrease",
    "GaussNewton",
    "GaussNewtonOperator",
    "GradientWindow",
    "HVPMode",
    "HVPModeError",
    "HessianOperator",
    "IJSubset",
    "IJSystem",
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
    "Params",
    "ProximalL2",
    "Regularizer",
    "SolveInfo",
    "SolverBreakdownError",
    "SumRegularizer",
    "UpperGradient",
    "argmin",
    "assign_grads",
    "functional_module",
    "hvp",
    "in_hvp",
    "nystrom_approximation",
]
