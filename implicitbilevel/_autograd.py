"""Autograd helpers shared by :class:`~implicitbilevel.BilevelProblem` and
:func:`~implicitbilevel.argmin`: a loss is a scalar, gradients are taken with respect to fresh
leaves, and a leaf the loss does not depend on gets a zero gradient."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .tree import Params

__all__ = ["check_loss", "grads_of", "leaves"]


def leaves(params: Mapping[str, Tensor]) -> Params:
    """Detached copies of ``params`` that require grad (fresh leaves of a new graph)."""
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}


def check_loss(loss: Any, which: str) -> Tensor:
    """``loss`` if it is a scalar tensor; a ``ValueError`` naming the ``which`` loss otherwise."""
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the {which} loss must return a scalar tensor, got {shape}; reduce it "
                         "(e.g. .mean()) first")
    return loss


def grads_of(loss: Tensor, wrt: Mapping[Any, Tensor]) -> dict:
    """``∂loss/∂wrt[k]`` for every key (zeros for a leaf the loss does not depend on)."""
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    return {
        n: g if g is not None else torch.zeros_like(p)
        for (n, p), g in zip(wrt.items(), grads)
    }
