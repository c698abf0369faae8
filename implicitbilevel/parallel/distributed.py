"""Data-parallel averaging of parameter dicts over ``torch.distributed`` ranks.

In data-parallel BiSSL every rank holds a shard of both levels' batches. The hypergradient of the
full batch is recovered when every batch-dependent quantity is averaged across ranks before it is
used: the lower gradient ``∇ℓ``, the upper gradients ``∇_x f`` and ``∇_y f``, and every
Hessian-vector product inside the implicit-Jacobian solve. The solver then sees identical inputs
on every rank, so its state stays replicated without further communication.

:class:`AllReduceMean` does the averaging with a few large collective calls: the tensors of a
dict are packed into flat buckets (``bucket_mb`` each), all-reduced, and unpacked. Pass it to
:class:`~implicitbilevel.BilevelProblem` as ``reducer``. With one process, or without an
initialised process group, it returns its input unchanged.

:func:`broadcast_from_main` makes every replica start from rank 0's tensors, as
``DistributedDataParallel`` does at construction;
:class:`~implicitbilevel.bissl.BiSSLTrainer` calls it before its first alternation. Batch
normalisation over the global batch is in :mod:`implicitbilevel.parallel.sync_batchnorm`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from ..tree import Params

__all__ = ["AllReduceMean", "broadcast_from_main", "is_main_process", "rank", "world_size"]


def rank() -> int:
    """This process's rank (0 without an initialised process group).

    Example:
        >>> import torch
        >>> from implicitbilevel.parallel import distributed
        >>> distributed.rank()
        0
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without an initialised process group).

    Example:
        >>> import torch
        >>> from implicitbilevel.parallel import distributed
        >>> distributed.world_size()
        1
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """``True`` on rank 0, or without an initialised process group.

    Example:
        >>> import torch
        >>> from implicitbilevel.parallel import distributed
        >>> distributed.is_main_process()                   # a single process is the main one
        True
    """
    return rank() == 0


def _buckets(tensors: list[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Consecutive index groups of at most ``bucket_bytes`` (one tensor at least), one dtype and
    device each, so every group packs into one flat buffer."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    key = None
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        t_key = (t.dtype, t.device)
        if current and (size + nbytes > bucket_bytes or t_key != key):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
        key = t_key
    if current:
        buckets.append(current)
    return buckets


def _flat_collective(
    tensors: list[Tensor], bucket_bytes: int, collective: Callable[[Tensor], object]
) -> list[Tensor]:
    """Pack ``tensors`` into flat buckets, run ``collective`` on each bucket in place, and return
    the results unpacked (views of the buckets), in the order of ``tensors``."""
    out: list[Tensor] = []
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in bucket])
        collective(flat)
        offset = 0
        for i in bucket:
            n = tensors[i].numel()
            out.append(flat[offset:offset + n].view_as(tensors[i]))
            offset += n
    return out


def broadcast_from_main(
    tensors: Iterable[Tensor], group: dist.ProcessGroup | None = None, bucket_mb: float = 25.0
) -> None:
    """Overwrite ``tensors`` in place, on every rank, with their values on the group's first rank.

    Packs them into flat buffers of ``bucket_mb`` MiB, as :class:`AllReduceMean` does. Without a
    multi-rank process group it does nothing. Every rank must pass tensors of the same shapes,
    dtypes and order.

    Example:
        >>> import torch
        >>> from implicitbilevel.parallel import distributed
        >>> w = torch.tensor([1.0, 2.0])
        >>> distributed.broadcast_from_main([w])            # one process: nothing to overwrite
        >>> w
        tensor([1., 2.])
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    targets = list(tensors)
    src = 0 if group is None else dist.get_global_rank(group, 0)
    received = _flat_collective(
        targets, int(bucket_mb * 2**20), lambda flat: dist.broadcast(flat, src=src, group=group)
    )
    with torch.no_grad():
        for target, value in zip(targets, received):
            target.copy_(value)


class AllReduceMean:
    """Average parameter dicts (or scalars) across the ranks of a process group.

    Args:
        group: the process group (default: the world).
        bucket_mb: size of the flat buffers the tensors are packed into, in MiB.

    Example:
        >>> import torch
        >>> from implicitbilevel.parallel import distributed
        >>> mean = distributed.AllReduceMean()             # without a process group: the identity
        >>> mean.active, mean({"w": torch.tensor([1.0, 2.0])})
        (False, {'w': tensor([1., 2.])})
    """

    def __init__(self, group: dist.ProcessGroup | None = None, bucket_mb: float = 25.0) -> None:
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.group = group
        self.bucket_bytes = int(bucket_mb * 2**20)

    @property
    def active(self) -> bool:
        """Whether there is more than one rank to average over."""
        if not (dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.group) > 1

    def __call__(self, tree: Mapping[str, Tensor]) -> Params:
        """Return the across-rank mean of every tensor in ``tree`` (a new dict)."""
        if not self.active or not tree:
            return dict(tree)
        scale = 1.0 / dist.get_world_size(self.group)

        def mean(flat: Tensor) -> None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.mul_(scale)

        averaged = _flat_collective(list(tree.values()), self.bucket_bytes, mean)
        return dict(zip(tree.keys(), averaged))

    def scalar(self, value: Tensor) -> Tensor:
        """Return the across-rank mean of a 0-dim tensor (for logged losses)."""
        return self({"value": value.reshape(())})["value"]
