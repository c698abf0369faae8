"""Deprecated: the names of this module now live in
:mod:`implicitbilevel.curvature.hessian`; they import from here for one
more release, with a ``DeprecationWarning``."""

from ._deprecated import moved

__getattr__ = moved("implicitbilevel.hessian", [
    "implicitbilevel.curvature.hessian",
    "implicitbilevel.errors",
])
