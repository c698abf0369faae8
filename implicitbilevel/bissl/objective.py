"""The BiSSL upper-level objective (thesis eq. 4.4), built from a downstream loss."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from .._checks import name_list
from ..tree import Params

__all__ = ["bissl_upper_loss"]


def bissl_upper_loss(
    downstream_loss: Callable[[Params, Any], Tensor], backbone_names: Iterable[str]
) -> Callable[[Params, Params, Any], Tensor]:
    """The BiSSL upper objective ``f(x, y) = L^D(θ_P, φ_D) + L^D(θ_D, φ_D)`` (eq. 4.4).

    Args:
        downstream_loss: ``L^D(params, batch) -> scalar`` over the downstream model's parameter
            names (backbone and head).
        backbone_names: the backbone names; the first term evaluates the downstream model with the
            lower-level backbone ``θ_P`` substituted for ``θ_D`` under these names.

    Example:
        >>> import torch
        >>> from implicitbilevel.bissl import bissl_upper_loss
        >>> def downstream(p, batch):                      # L^D(theta, phi) on one example
        ...     return (p["theta"] * p["phi"] - batch) ** 2
        >>> f = bissl_upper_loss(downstream, ["theta"])
        >>> x = {"theta": torch.tensor(1.0), "phi": torch.tensor(2.0)}   # theta_D, phi_D
        >>> y = {"theta": torch.tensor(3.0)}                               # theta_P
        >>> f(x, y, 1.0)                                   # (3*2 - 1)^2 + (1*2 - 1)^2
        tensor(26.)
    """
    names = name_list(backbone_names, "backbone_names")

    def upper_loss(upper: Params, lower: Params, batch: Any) -> Tensor:
        substituted = dict(upper)
        substituted.update({n: lower[n] for n in names})
        return downstream_loss(substituted, batch) + downstream_loss(upper, batch)

    return upper_loss
