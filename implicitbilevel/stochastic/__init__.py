"""Stochastic bilevel methods on the objectives of a :class:`~implicitbilevel.BilevelProblem`.

Where :class:`~implicitbilevel.BilevelProblem` and :func:`~implicitbilevel.argmin` compute one
hypergradient at a (nearly) solved lower level, these methods move the upper variables, the lower
variables and, where the method has one, the linear-system variable ``v`` a little at every
minibatch, with optimiser-like classes (:mod:`implicitbilevel.stochastic.base`):

- :class:`SOBA` and :class:`SABA` (:mod:`~implicitbilevel.stochastic.joint`): the three
  directions of Dagréou et al. (2022), plain or with SAGA's per-sample memory
  (:mod:`~implicitbilevel.stochastic.memory`);
- :class:`StocBiO` and :class:`AmIGO` (:mod:`~implicitbilevel.stochastic.inner_loop`): inner SGD
  steps, then ``v`` by a Neumann series or by warm-started SGD;
- :class:`F2SA` and :class:`BOME` (:mod:`~implicitbilevel.stochastic.first_order`): gradients
  only, through a penalty on the value-function gap.

All of them call the same :class:`BilevelOracles` (:mod:`~implicitbilevel.stochastic.oracles`),
built from a problem or from two callables ``f(x, y, batch)`` and ``g(x, y, batch)``, whose
products (:class:`Curvature`, :mod:`~implicitbilevel.stochastic.products`) are the library's
Hessian-vector and mixed products.
"""

from .base import PolynomialDecay, StepInfo, StepSize, StochasticBilevel
from .first_order import BOME, F2SA
from .inner_loop import AmIGO, StocBiO
from .joint import SABA, SOBA
from .memory import SampleMemory, check_indices
from .oracles import BilevelOracles, OracleCounts
from .products import Curvature

__all__ = [
    "BOME",
    "F2SA",
    "SABA",
    "SOBA",
    "AmIGO",
    "BilevelOracles",
    "Curvature",
    "OracleCounts",
    "PolynomialDecay",
    "SampleMemory",
    "StepInfo",
    "StepSize",
    "StocBiO",
    "StochasticBilevel",
    "check_indices",
]
