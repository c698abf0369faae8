"""Deprecated: the names of this module now live in
:mod:`implicitbilevel.lam`; they import from here for one
more release, with a ``DeprecationWarning``."""

from ._deprecated import moved

__getattr__ = moved("implicitbilevel.schedules", [
    "implicitbilevel.lam",
])
