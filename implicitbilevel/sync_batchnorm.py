"""Deprecated: the names of this module now live in
:mod:`implicitbilevel.parallel.sync_batchnorm`; they import from here for one
more release, with a ``DeprecationWarning``."""

from ._deprecated import moved

__getattr__ = moved("implicitbilevel.sync_batchnorm", [
    "implicitbilevel.parallel.sync_batchnorm",
])
