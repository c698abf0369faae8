"""SABA's variance-reduction memory: one entry per sample index, and the sampler contract.

SAGA (Defazio, Bach & Lacoste-Julien 2014), as SABA uses it for every direction (Dagréou et al.
2022, Sec. 3.2): for a finite sum ``φ = (1/n) Σ_i φ_i`` the memory holds ``w_i``, the last value
of ``φ_i`` seen for sample ``i`` (zero before), and their mean ``w̄``. On a batch ``B`` of
distinct indices with fresh values ``φ_i(θ)``,

.. math::

    D = \\frac{1}{|B|} \\sum_{i \\in B} \\big(\\varphi_i(\\theta) - w_i\\big) + \\bar w, \\qquad
    \\bar w \\leftarrow \\bar w + \\frac1n \\sum_{i \\in B} \\big(\\varphi_i(\\theta) - w_i\\big),
    \\qquad w_i \\leftarrow \\varphi_i(\\theta) \\ (i \\in B).

``D`` is unbiased for ``∇φ(θ)`` whatever the memory holds, and its variance vanishes as the
iterates settle, which is what lets SABA take constant step sizes.

**The sampler contract.** A batch is a dict with an ``"index"`` entry: a 1-D integer tensor of
distinct sample indices in ``[0, n)``; its other tensors with that many leading entries are the
rows of those samples (other entries are shared). The loss of a batch must be the mean over its
rows of the loss of each row alone (a finite sum), so that a row's term is the sample's. SABA
checks the indices on every step and the finite-sum property on its first step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..tree import Params

__all__ = ["SampleMemory", "check_indices"]


def check_indices(batch: Mapping[str, Any], n: int, what: str) -> Tensor:
    """The batch's sample indices, checked against the sampler contract (module docstring).

    Example:
        >>> import torch
        >>> from implicitbilevel.stochastic import check_indices
        >>> check_indices({"index": torch.tensor([2, 0])}, 3, "lower")
        tensor([2, 0])
        >>> try:
        ...     check_indices({"index": torch.tensor([1, 1])}, 3, "lower")
        ... except ValueError as err:
        ...     print(str(err).split(";")[0])
        SABA: the lower batch repeats a sample index
    """
    if not isinstance(batch, Mapping) or "index" not in batch:
        raise TypeError(f"SABA: the {what} batch must be a dict with an 'index' entry holding "
                        "the sample indices of its rows (see implicitbilevel.stochastic.memory)")
    index = batch["index"]
    if not isinstance(index, Tensor) or index.ndim != 1 or index.is_floating_point():
        raise TypeError(f"SABA: {what} batch['index'] must be a 1-D integer tensor")
    if index.numel() == 0:
        raise ValueError(f"SABA: the {what} batch is empty")
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"SABA: {what} sample indices must lie in [0, {n}), got [{lo}, {hi}] "
                         f"(n_{what} = {n} is the number of samples of the {what} finite sum)")
    if torch.unique(index).numel() != index.numel():
        raise ValueError(f"SABA: the {what} batch repeats a sample index; draw batches without "
                         "replacement (each index at most once per batch)")
    return index


class SampleMemory:
    """The SAGA memory of one direction: ``w_i`` for every sample ``i`` and their mean ``w̄``.

    Args:
        n: the number of samples of the finite sum.
        like: one value of ``φ_i`` (names and shapes; a table of ``n`` rows each is allocated).

    Example:
        >>> import torch
        >>> from implicitbilevel.stochastic import SampleMemory
        >>> memory = SampleMemory(3, {"w": torch.zeros(1, dtype=torch.float64)})   # n = 3 samples
        >>> fresh = {"w": torch.tensor([[3.0], [6.0]], dtype=torch.float64)}   # samples 0 and 1
        >>> memory.direction(torch.tensor([0, 1]), fresh)["w"]   # mean(fresh - 0) + 0
        tensor([4.5000], dtype=torch.float64)
        >>> zero = {"w": torch.zeros(1, 1, dtype=torch.float64)}                # sample 2
        >>> memory.direction(torch.tensor([2]), zero)["w"]        # 0 - 0 + mean of memory (3 + 6)/3
        tensor([3.], dtype=torch.float64)
    """

    def __init__(self, n: int, like: Mapping[str, Tensor]) -> None:
        self.n = int(n)
        self.table: Params = {k: t.new_zeros((self.n, *t.shape)) for k, t in like.items()}
        self.mean: Params = {k: torch.zeros_like(t) for k, t in like.items()}

    def direction(self, index: Tensor, values: Mapping[str, Tensor]) -> Params:
        """``D`` for the rows ``index`` with fresh values ``values[k]`` of shape ``(b, ...)``;
        then the memory of those rows and the mean are updated (module docstring)."""
        out: Params = {}
        for k, fresh in values.items():
            old = self.table[k][index]
            diff = fresh - old
            out[k] = diff.mean(0) + self.mean[k]
            self.mean[k] = self.mean[k] + diff.sum(0) / self.n
            self.table[k][index] = fresh
        return out

    def state_dict(self) -> dict[str, Any]:
        """The table and the mean (copies)."""
        return {"n": self.n, "table": {k: t.clone() for k, t in self.table.items()},
                "mean": {k: t.clone() for k, t in self.mean.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if int(state["n"]) != self.n or set(state["table"]) != set(self.table):
            raise ValueError(f"a memory of {state['n']} samples over {sorted(state['table'])} "
                             f"cannot be loaded into one of {self.n} over {sorted(self.table)}")
        for k in self.table:
            self.table[k].copy_(state["table"][k])
            self.mean[k].copy_(state["mean"][k])
