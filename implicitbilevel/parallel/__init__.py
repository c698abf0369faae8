"""Data-parallel pieces on ``torch.distributed``: bucketed all-reduce and broadcast of parameter
dicts (:mod:`~implicitbilevel.parallel.distributed`) and a BatchNorm synchronised over all ranks
that is twice differentiable (:mod:`~implicitbilevel.parallel.sync_batchnorm`)."""

from .distributed import AllReduceMean, broadcast_from_main, is_main_process, rank, world_size
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "AllReduceMean",
    "SyncBatchNorm",
    "broadcast_from_main",
    "convert_sync_batchnorm",
    "is_main_process",
    "rank",
    "world_size",
]
