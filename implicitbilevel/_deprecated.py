"""Old module paths kept for one release: each re-exports its names from where they live now and
says so with a ``DeprecationWarning`` when a name is taken from it."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any


def moved(old: str, new: Sequence[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the old module ``old`` whose names now live in the modules
    ``new`` (searched in order)."""

    def __getattr__(name: str) -> Any:
        if name == "__all__":  # the names the old module offers, without a warning
            return [n for target in new for n in getattr(importlib.import_module(target),
                                                         "__all__", [])]
        for target in new:
            module = importlib.import_module(target)
            if hasattr(module, name):
                warnings.warn(f"{old} is deprecated and will be removed in the next release: "
                              f"import {name} from {target}", DeprecationWarning, stacklevel=2)
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
