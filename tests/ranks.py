"""Run a function on several gloo ranks for the data-parallel tests.

Every rank joins through a file store in the test's temporary folder (no TCP port to race for, no
rank that hosts a store the others still need) and waits at a barrier before the group is torn
down, so no rank closes its connections while another still reads from them. A rank that fails
fails the test with its traceback; a rank that finished exits at once (no interpreter teardown).
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, fn, world, init_file, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank that finished leaves without the interpreter's teardown: a C++ thread still joinable
    # at static destruction can abort it there ("terminate called without an active exception")
    # after all its work is done, which spawn would report as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, *args, world: int = 2) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` spawned gloo ranks and wait for all of them."""
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        mp.spawn(_rank_main, args=(fn, world, init_file, args), nprocs=world, join=True)
