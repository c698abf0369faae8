"""The gradient window of M-FAC: the ``m`` most recent gradients and their inner products.

:class:`~implicitbilevel.MFAC` (:mod:`implicitbilevel.solvers.mfac`) solves
``(D + F̂/μ) u = v`` with ``F̂ = GᵀG/k`` through the Woodbury identity, which touches the ``k × n``
matrix ``G`` of the ``k ≤ m`` held gradients only through three products, all kept here:

.. math::

    K = G D^{-1} G^\\top = \\sum_{\\text{name}} K_{\\text{name}} / D_{\\text{name}}, \\qquad
    G D^{-1} v, \\qquad G^\\top c = \\sum_i c_i g_i,

over all names or over a block of them. The inner products ``K_name[i, j] = ⟨g_i, g_j⟩`` are held
per parameter name, so any per-name diagonal ``D`` and any block of names reads its ``k × k``
matrix from them without touching the gradients again. A new gradient replaces the oldest one
(a ring buffer) and updates one row and one column of each ``K_name``: ``O(m·n)``. ``version``
counts the changes, so a solver can cache what it factorises from ``K`` until the window moves.

Memory: ``m·n`` numbers for the gradients (``n`` unknowns), ``m²`` per parameter tensor for the
inner products (float64), on the gradients' device or on ``device``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..tree import Params, tree_norm

__all__ = ["GradientWindow"]


def validate_m(m: Any) -> None:
    """Refuse a window capacity ``m`` that is not an int ``>= 1`` (``ValueError``)."""
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
        raise ValueError(f"m (the number of gradients M-FAC keeps) must be an int >= 1, got {m!r}")


class GradientWindow:
    """The ``m`` most recent gradients (a ring buffer) and their inner products per name.

    Attributes:
        m: the window's capacity.
        count: ``k``, the gradients held (``min(observed, m)``).
        names: the parameter names, fixed by the first gradient (``[]`` before).
        buffer: ``{name: Tensor of shape (m, *shape)}``; rows ``0 … k−1`` hold gradients.
        gram: ``{name: (m, m) float64}``, ``gram[name][i, j] = ⟨g_i[name], g_j[name]⟩``.
        version: incremented by every change (a key for what is cached from the window).

    Example:
        >>> import torch
        >>> import implicitbilevel as ib
        >>> window = ib.GradientWindow(m=2)
        >>> for g in ([1.0, 0.0], [0.0, 2.0], [3.0, 0.0]):  # the third replaces the first
        ...     window.observe({"w": torch.tensor(g, dtype=torch.float64)})
        >>> window.count, sorted(window.buffer["w"].sum(dim=1).tolist())
        (2, [2.0, 3.0])
    """

    def __init__(self, m: int, device: str | torch.device | None = None) -> None:
        validate_m(m)
        self.m = int(m)
        self.device = None if device is None else torch.device(device)  # None: the gradients'
        self.reset()

    def reset(self) -> None:
        """Forget every gradient."""
        self.names: list[str] = []
        self.buffer: Params = {}
        self.gram: Params = {}
        self.count = 0
        self.position = 0
        self.version = getattr(self, "version", 0) + 1

    def observe(self, grads: Mapping[str, Tensor]) -> None:
        """Add one gradient, replacing the oldest when the window is full (``O(m·n)``).

        Raises:
            ValueError: an empty or non-finite gradient, or names or shapes that differ from the
                window's.
        """
        if not grads:
            raise ValueError("M-FAC needs a gradient with at least one parameter")
        if not self.names:
            self._allocate(grads)
        self.to(self.device or next(iter(grads.values())).device)
        if list(grads) != self.names and set(grads) != set(self.names):
            raise ValueError(f"the gradient has names {sorted(grads)}, the M-FAC window "
                             f"{sorted(self.names)}")
        for n in self.names:
            if grads[n].shape != self.buffer[n].shape[1:]:
                raise ValueError(f"gradient {n!r} has shape {tuple(grads[n].shape)}, the window "
                                 f"{tuple(self.buffer[n].shape[1:])}")
        if not math.isfinite(float(tree_norm(grads))):
            raise ValueError("M-FAC was given a non-finite gradient")
        slot = self.position
        filled = min(self.count + 1, self.m)  # slots 0 … filled−1 hold gradients after this one
        with torch.no_grad():
            for n in self.names:
                rows = self.buffer[n]
                rows[slot].copy_(grads[n].detach().to(rows.device))
                flat = rows[:filled].reshape(filled, -1)
                dots = (flat @ flat[slot]).to(torch.float64)
                self.gram[n][slot, :filled] = dots
                self.gram[n][:filled, slot] = dots
        self.count = filled
        self.position = (slot + 1) % self.m
        self.version += 1

    def _allocate(self, grads: Mapping[str, Tensor]) -> None:
        self.names = list(grads)
        for n, g in grads.items():
            dtype = torch.promote_types(g.dtype, torch.float32)
            device = self.device or g.device
            self.buffer[n] = torch.zeros(self.m, *g.shape, dtype=dtype, device=device)
            self.gram[n] = torch.zeros(self.m, self.m, dtype=torch.float64, device=device)

    def kernel(self, diagonal: Mapping[str, float], names: list[str] | None = None) -> Tensor:
        """``K = G D⁻¹ Gᵀ = Σ_name K_name / D_name`` over the ``k`` held gradients (``k × k``),
        over ``names`` (a block; default all)."""
        k = self.count
        return sum(self.gram[n][:k, :k] / diagonal[n]  # type: ignore[return-value]
                   for n in (self.names if names is None else names))

    def project(self, v: Mapping[str, Tensor], diagonal: Mapping[str, float],
                names: list[str] | None = None) -> Tensor:
        """``G D⁻¹ v``: the ``k`` inner products ``⟨g_i, D⁻¹ v⟩`` (``O(k·n)``), float64, over
        ``names`` (a block; default all)."""
        k = self.count
        parts = [(self.buffer[n][:k].reshape(k, -1)
                  @ v[n].reshape(-1).to(self.buffer[n].device, self.buffer[n].dtype))
                 .to(torch.float64) / diagonal[n]
                 for n in (self.names if names is None else names)]
        return torch.stack(parts).sum(0)

    def combine(self, c: Tensor, names: list[str] | None = None) -> Params:
        """``Gᵀ c = Σ_i c_i g_i`` for coefficients ``c`` of shape ``(k,)`` (``O(k·n)``), over
        ``names`` (a block; default all)."""
        k = self.count
        return {n: torch.tensordot(c.to(self.buffer[n].device, self.buffer[n].dtype),
                                   self.buffer[n][:k], dims=1)
                for n in (self.names if names is None else names)}

    def state_dict(self) -> dict[str, Any]:
        """The gradients, their inner products and the ring position (tensors and plain types)."""
        return {"m": self.m, "names": list(self.names), "count": self.count,
                "position": self.position,
                "buffer": {n: t.clone() for n, t in self.buffer.items()},
                "gram": {n: t.clone() for n, t in self.gram.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the capacity ``m`` must match)."""
        if int(state["m"]) != self.m:
            raise ValueError(f"the saved M-FAC window holds m = {state['m']} gradients, this "
                             f"solver m = {self.m}")
        self.reset()
        self.names = list(state["names"])
        self.buffer = {n: state["buffer"][n].clone() for n in self.names}
        self.gram = {n: state["gram"][n].clone() for n in self.names}
        self.count = int(state["count"])
        self.position = int(state["position"])
        self.version += 1
        if self.device is not None:
            self.to(self.device)

    def to(self, device: torch.device) -> None:
        """Move the window to ``device`` (a checkpoint may be loaded onto another device)."""
        device = self.device or torch.device(device)
        if self.names and self.buffer[self.names[0]].device != device:
            self.buffer = {n: t.to(device) for n, t in self.buffer.items()}
            self.gram = {n: t.to(device) for n, t in self.gram.items()}
