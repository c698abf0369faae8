"""Deprecated: the names of this module now live in
:mod:`implicitbilevel.curvature.gauss_newton`; they import from here for one
more release, with a ``DeprecationWarning``."""

from ._deprecated import moved

__getattr__ = moved("implicitbilevel.gauss_newton", [
    "implicitbilevel.curvature.gauss_newton",
])
