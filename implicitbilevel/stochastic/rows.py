"""The rows of a batch, evaluated one by one under ``torch.func.vmap`` (SABA's per-sample terms).

A per-sample batch is a dict whose ``"index"`` entry is a 1-D integer tensor of the rows' sample
indices (the sampler contract of :mod:`implicitbilevel.stochastic.memory`); its tensor entries
with as many leading entries are split into rows, every other entry is shared by the rows.
:func:`map_rows` evaluates a function on every row, each seen as a batch of one row, under
``torch.func.vmap`` and stacks the results along a leading dimension; where an operation has no
batching rule it warns once per function and loops over the rows instead, with the same result.
:meth:`BilevelOracles.per_sample <implicitbilevel.BilevelOracles.per_sample>` is built on it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..tree import Params

__all__ = ["map_rows", "rows_of"]

INDEX = "index"
_LOOP_WARNED: set[int] = set()


def rows_of(batch: Any) -> tuple[dict[str, Any], int]:
    """The ``in_dims`` of a batch's rows for ``torch.func.vmap`` and the number of rows.

    A batch is a dict whose ``"index"`` entry is a 1-D integer tensor (the rows' sample indices);
    its tensor entries with as many leading entries are split into rows, every other entry is
    shared by the rows.
    """
    if not isinstance(batch, Mapping) or INDEX not in batch:
        raise TypeError("a per-sample batch must be a dict with an 'index' entry (the sample "
                        f"indices of its rows), got {type(batch).__name__}")
    index = batch[INDEX]
    if not isinstance(index, Tensor) or index.ndim != 1 or index.is_floating_point():
        raise TypeError("batch['index'] must be a 1-D integer tensor of sample indices")
    b = index.shape[0]
    dims = {k: 0 if isinstance(t, Tensor) and t.ndim >= 1 and t.shape[0] == b else None
            for k, t in batch.items()}
    return dims, b


def map_rows(fn: Callable[[Any], dict[str, Params]], loop: Callable[[Any], dict[str, Params]],
             batch: Mapping[str, Any]) -> dict[str, Params]:
    """``fn`` on every row of ``batch`` (each a batch of one row) under ``torch.func.vmap``,
    stacked along dim 0; ``loop`` row by row when an operation has no batching rule."""
    dims, b = rows_of(batch)

    def one_row(row: Mapping[str, Any]) -> dict[str, Any]:
        return {k: (t.unsqueeze(0) if dims[k] == 0 else t) for k, t in row.items()}

    try:
        return torch.func.vmap(lambda row: fn(one_row(row)), in_dims=(dims,))(dict(batch))
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
        key = id(fn.__code__)
        if key not in _LOOP_WARNED:
            _LOOP_WARNED.add(key)
            warnings.warn(f"per-row oracles could not be vectorised ({type(err).__name__}: "
                          f"{err}); evaluating the {b} rows one at a time", RuntimeWarning,
                          stacklevel=4)
        rows = [loop(one_row({k: (t[i] if dims[k] == 0 else t) for k, t in batch.items()}))
                for i in range(b)]
        return {key_: {n: torch.stack([r[key_][n] for r in rows]) for n in rows[0][key_]}
                for key_ in rows[0]}
