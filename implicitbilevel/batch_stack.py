"""Deprecated: the names of this module now live in
:mod:`implicitbilevel.bissl.batch_stack`; they import from here for one
more release, with a ``DeprecationWarning``."""

from ._deprecated import moved

__getattr__ = moved("implicitbilevel.batch_stack", [
    "implicitbilevel.bissl.batch_stack",
])
