"""Seeding, device selection and mixed precision: the runtime knobs every recipe shares."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from implicitbilevel.parallel.distributed import AllReduceMean, broadcast_from_main

__all__ = [
    "derive_seed",
    "DEFAULT_PROCESS_GROUP_TIMEOUT",
    "DistributedContext",
    "autocast",
    "broadcast_module",
    "check_shard",
    "init_distributed",
    "loader_kwargs",
    "per_rank_batch_size",
    "seed_everything",
    "select_device",
    "shard_loader",
]


def seed_everything(seed: int, *, deterministic: bool = False) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) and return a CPU generator seeded with ``seed``.

    With ``deterministic=True`` torch is asked for deterministic kernels (slower on GPU; an op
    without a deterministic implementation then raises instead of silently varying).
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed from ``seed`` and ``labels`` (stable across processes and runs), e.g.
    ``derive_seed(seed, "bissl", "rte")`` for one task's lower-level data order."""
    text = "/".join(str(x) for x in (seed, *labels))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def select_device(name: str = "auto") -> torch.device:
    """Return the device called ``name``: ``"auto"`` (CUDA if present, else CPU), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``. Asking for CUDA where none exists raises ``RuntimeError``.

    On CUDA, ``cudnn.benchmark`` is switched on (fixed input shapes in these recipes).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        torch.backends.cudnn.benchmark = True
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use 'auto', 'cpu' or 'cuda[:N]'")
    return device


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """Context for forward passes: bfloat16 autocast on ``device`` when ``bf16`` is true, else a
    no-op. Keep solver arithmetic (CG, optimiser updates) outside it, in float32."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def loader_kwargs(device: torch.device, workers: int) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.data.DataLoader``: ``workers`` processes, pinned memory
    and persistent workers on CUDA."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kwargs["persistent_workers"] = True
    return kwargs


@dataclass
class DistributedContext:
    """Where this process sits in a ``torchrun`` launch (one process: rank 0 of 1).

    Attributes:
        rank: this process's rank.
        world_size: number of processes.
        device: this process's device (``cuda:LOCAL_RANK`` under a multi-GPU launch).
        reducer: averages gradients and Hessian-vector products across ranks (``None`` alone).
    """

    rank: int
    world_size: int
    device: torch.device
    reducer: AllReduceMean | None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` for a data-parallel sampler, or ``None`` alone."""
        return (self.rank, self.world_size) if self.world_size > 1 else None


DEFAULT_PROCESS_GROUP_TIMEOUT = timedelta(hours=6)
"""Collective timeout of :func:`init_distributed`: long, because a rank may wait at a gather
while another finishes a whole fine-tuning run (torch's own default is 10 to 30 minutes)."""


def init_distributed(
    device_name: str = "auto", timeout: timedelta | None = None
) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1``) this initialises NCCL on GPUs or
    gloo on CPUs and picks ``cuda:LOCAL_RANK``; otherwise it returns a single-process context on
    :func:`select_device`'s device.

    Args:
        device_name: as for :func:`select_device`; ``"cpu"`` forces gloo.
        timeout: how long a collective waits for the slowest rank before failing
            (default :data:`DEFAULT_PROCESS_GROUP_TIMEOUT`).
    """
    if timeout is not None and timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(0, 1, select_device(device_name), None)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = select_device(f"cuda:{local_rank}")
    else:
        device = select_device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=timeout or DEFAULT_PROCESS_GROUP_TIMEOUT
        )
    return DistributedContext(dist.get_rank(), dist.get_world_size(), device, AllReduceMean())


def per_rank_batch_size(batch_size: int, world_size: int, key: str) -> int:
    """``batch_size // world_size``, the per-rank share of a configured (global) batch size.

    Raises ``ValueError`` naming the config ``key`` when the ranks cannot share it evenly, since
    an uneven split would change the batch the averaged gradients correspond to.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if batch_size % world_size:
        raise ValueError(
            f"{key}={batch_size} must be divisible by the number of ranks ({world_size}) for a "
            f"data-parallel run; set {key} to a multiple of {world_size}"
        )
    return batch_size // world_size


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank, in place, in bucketed
    broadcasts (a no-op without a multi-rank process group)."""
    broadcast_from_main([*module.parameters(), *module.buffers()])


def check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``shard`` (``(0, 1)`` for ``None``); ``ValueError`` unless
    ``0 <= rank < world_size``."""
    rank, world = shard if shard is not None else (0, 1)
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world_size), 0 <= rank < world_size; got {shard}")
    return rank, world


def shard_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset``, or over this rank's share of it.

    With ``shard=(rank, world_size)`` a ``DistributedSampler`` seeded with ``seed`` gives every
    rank an equal, disjoint share of each pass (a remainder dropped, so the ranks' batches stay the
    same size), reshuffled per pass through ``set_epoch``; ``batch_size`` is the per-rank batch.
    Without it, ``shuffle`` draws from ``generator`` (``None``: torch's global generator).
    ``kwargs`` go to the ``DataLoader`` (workers, ``collate_fn``, ...).
    """
    if shard is None:
        return DataLoader(
            dataset, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
            **kwargs,
        )
    rank, world = check_shard(shard)
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
    )
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
