"""Deprecated: the names of this module now live in
:mod:`implicitbilevel.bissl.run_log`; they import from here for one
more release, with a ``DeprecationWarning``."""

from ._deprecated import moved

__getattr__ = moved("implicitbilevel.run_log", [
    "implicitbilevel.bissl.run_log",
])
