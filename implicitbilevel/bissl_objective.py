"""Deprecated: the names of this module now live in
:mod:`implicitbilevel.bissl.objective`; they import from here for one
more release, with a ``DeprecationWarning``."""

from ._deprecated import moved

__getattr__ = moved("implicitbilevel.bissl_objective", [
    "implicitbilevel.bissl.objective",
])
