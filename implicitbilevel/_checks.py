"""Checks on what users hand the library, so a bad input fails at once with a message instead of
giving a silently wrong hypergradient.

- Names are lists of strings, never one string (``ProximalL2("theta")`` would otherwise couple
  the five names ``"t"``, ``"h"``, ...).
- Integer-valued settings (iterations, ranks, seeds) are ints, not floats that ``range`` or a
  generator would truncate.
- The two levels of a bilevel problem are distinct variables: the proximal term
  ``½‖θ_D − θ_P‖²`` of BiSSL (thesis eq. 4.3) compares two copies of the backbone, so a coupled
  name must have the same shape, dtype and device at both levels (no broadcasting), and the two
  dicts must not share a tensor, which would make the term identically zero.
- With ``check_finite`` the returned gradients are finite, not only the losses.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import NonFiniteError

__all__ = [
    "check_bool",
    "check_coupled",
    "check_distinct_levels",
    "check_int",
    "name_list",
    "require_finite",
    "require_finite_grads",
]


def name_list(names: Iterable[str], what: str) -> list[str]:
    """``names`` as a list of strings; a single string (or a non-string entry) is refused."""
    if isinstance(names, (str, bytes)):
        raise TypeError(f"{what} must be a list of names, got the single string {names!r}; "
                        f"write [{names!r}]")
    out = list(names)
    bad = [n for n in out if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what} must hold parameter names (str), got {bad[:3]!r}")
    return out


def check_int(value: Any, what: str, minimum: int | None = None) -> int:
    """``value`` if it is an integer (not a bool or float) ``>= minimum``; ``ValueError`` else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
            minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{what} must be an int{bound}, got {value!r}")
    return int(value)


def check_bool(value: Any, what: str) -> bool:
    """``value`` if it is a bool; ``TypeError`` else (``2`` or ``"no"`` are not switches)."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")
    return value


def check_coupled(upper: Mapping[str, Tensor], lower: Mapping[str, Tensor],
                  names: Iterable[str], who: str) -> None:
    """Every coupled name has the same shape, dtype and device at both levels, and the two levels
    hold different memory under it (the coupling of two copies, thesis eq. 4.3)."""
    for n in names:
        a, b = upper[n], lower[n]
        for what, x, y in (("shape", tuple(a.shape), tuple(b.shape)), ("dtype", a.dtype, b.dtype),
                           ("device", a.device, b.device)):
            if x != y:
                raise ValueError(f"{who}: coupled parameter {n!r} has {what} {x} at the upper "
                                 f"level but {y} at the lower level; the two copies must match "
                                 "exactly (no broadcasting)")
        if _same_memory(a, b):
            raise ValueError(f"{who}: the upper and lower dicts hold the same tensor under "
                             f"{n!r}, so the coupling is identically zero; give the lower level "
                             "its own copy (e.g. copy.deepcopy of the model)")


def check_distinct_levels(upper: Mapping[str, Tensor], lower: Mapping[str, Tensor]) -> None:
    """Refuse upper and lower dicts that share a tensor object (under any names)."""
    ids = {id(t): n for n, t in upper.items()}
    shared = [(ids[id(t)], n) for n, t in lower.items() if id(t) in ids]
    if shared:
        pairs = ", ".join(f"upper {u!r} is lower {lo!r}" for u, lo in shared[:3])
        raise ValueError(f"the upper and lower variables share tensors ({pairs}); each level "
                         "needs its own tensors (e.g. copy.deepcopy of the model for the lower "
                         "level)")


def _same_memory(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    if a.numel() == 0 or a.device.type == "meta":
        return False
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def require_finite_grads(grads: Mapping[str, Tensor], what: str, t: int | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite entry of ``grads`` (one host
    synchronisation for the whole dict)."""
    if not grads:
        return
    device = next(iter(grads.values())).device
    finite = torch.stack([torch.isfinite(g.detach()).all().to(device) for g in grads.values()])
    if bool(finite.all()):
        return
    name = list(grads)[int((~finite).nonzero()[0])]
    where = "" if t is None else f" at alternation {t}"
    raise NonFiniteError(f"non-finite {what} of {name!r}{where}")


def require_finite(value: Tensor, what: str, t: int | None = None) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` (and alternation ``t``) unless finite."""
    value = value.detach()
    if not bool(torch.isfinite(value)):
        where = "" if t is None else f" at alternation {t}"
        raise NonFiniteError(f"non-finite {what} ({float(value)}){where}")
