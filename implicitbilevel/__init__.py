"""implicitbilevel: implicit differentiation through bilevel problems in PyTorch."""

from .hvp import HessianOperator, HVPModeError, functional_module, hvp, in_hvp
from .tree import Params

__version__ = "0.1.0"
