"""Deprecated: the names of this module now live in
:mod:`implicitbilevel.results`; they import from here for one
more release, with a ``DeprecationWarning``."""

from ._deprecated import moved

__getattr__ = moved("implicitbilevel.gradients", [
    "implicitbilevel.results",
    "implicitbilevel.errors",
    "implicitbilevel._autograd",
    "implicitbilevel._checks",
])
