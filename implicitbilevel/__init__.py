"""implicitbilevel: implicit differentiation through bilevel problems in PyTorch.

The pieces, bottom to top: parameter-dict arithmetic (:mod:`implicitbilevel.tree`), Hessian-vector
products on ``torch.func`` (:mod:`implicitbilevel.hessian`), linear solvers over parameter dicts
(:mod:`implicitbilevel.solvers`), λ schedules (:mod:`implicitbilevel.schedules`), regularisers
(:mod:`implicitbilevel.regularizers`), the :class:`BilevelProblem` (:mod:`implicitbilevel.problem`)
and the BiSSL trainer (:mod:`implicitbilevel.bissl`). Data-parallel runs use
:mod:`implicitbilevel.distributed` (bucketed all-reduce and broadcast) and
:mod:`implicitbilevel.sync_batchnorm` (BatchNorm over all ranks, twice differentiable).
"""

from .hessian import HessianOperator, HVPMode, HVPModeError, functional_module, hvp, in_hvp
from .problem import BilevelProblem, LowerGradient, NonFiniteError, UpperGradient, assign_grads
from .regularizers import BaseRegularizer, ProximalL2, Regularizer
from .schedules import (
    ConstantSchedule,
    CosineDecay,
    CosineIncrease,
    ExponentialIncrease,
    LambdaSchedule,
    LearnableLambda,
)
from .solvers import (
    CG,
    ConcatenatedHeadCG,
    Dense,
    LinearSolver,
    Neumann,
    SolveInfo,
    SolverBreakdownError,
)
from .tree import Params

__version__ = "0.1.0"

__all__ = [
    "CG",
    "BaseRegularizer",
    "BilevelProblem",
    "ConcatenatedHeadCG",
    "ConstantSchedule",
    "CosineDecay",
    "CosineIncrease",
    "Dense",
    "ExponentialIncrease",
    "HVPMode",
    "HVPModeError",
    "HessianOperator",
    "LambdaSchedule",
    "LearnableLambda",
    "LinearSolver",
    "LowerGradient",
    "Neumann",
    "NonFiniteError",
    "Params",
    "ProximalL2",
    "Regularizer",
    "SolveInfo",
    "SolverBreakdownError",
    "UpperGradient",
    "assign_grads",
    "functional_module",
    "hvp",
    "in_hvp",
]
