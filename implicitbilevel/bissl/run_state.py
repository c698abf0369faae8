"""Run state for exact resume and for replicas that stay identical.

:class:`RunState` gathers the live objects of a training run under names (parameter dicts,
modules, optimisers, schedulers, batch stacks) and turns them into one checkpointable dict of
tensors and plain containers, restores such a dict in place, and broadcasts everything replicas
must share from rank 0. Positions in the batch stacks and the random-number states differ per
rank; they are gathered from every rank into the dict's ``"ranks"`` list, and each rank resumes its
own. The checkpoint file itself is written by :func:`save_on_main` (atomically, on rank 0, see
:mod:`implicitbilevel.checkpoint`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import CheckpointError
from ..parallel.distributed import broadcast_from_main, is_main_process, rank, world_size
from ..results import LAM_RHO
from .batch_stack import BatchStack
from .checkpoint import save_checkpoint

__all__ = ["RunState", "config_changes", "gather_per_rank", "rng_state", "save_on_main",
           "set_rng_state", "upgrade_v1"]


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, Python and numpy random states, as tensors and plain containers."""
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss]
    except ImportError:  # numpy is optional for the library
        pass
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states :func:`rng_state` returned."""
    torch.random.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss_value = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss_value))


def gather_per_rank(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``local`` dict, in rank order (``[local]`` in a single process)."""
    if world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def save_on_main(state: Any, path: str | os.PathLike) -> None:
    """Write ``state`` atomically to ``path`` on rank 0; every rank waits until it is written."""
    if is_main_process():
        save_checkpoint(state, path)
    if world_size() > 1:
        dist.barrier()


class RunState:
    """The named live objects of a run, saved, restored and broadcast together.

    Args:
        params: parameter dicts by group name (e.g. ``{"upper_params": {...}, ...}``); their
            tensors are saved by value and restored in place.
        optimizers: optimisers by name.
        schedulers: learning-rate schedulers by name; ``None`` entries are skipped.
        stacks: batch stacks by name; their positions are saved per rank.
        modules: modules whose full ``state_dict`` (buffers included) is saved, by name.

    Example:
        >>> import torch
        >>> from implicitbilevel.bissl import BatchStack
        >>> from implicitbilevel.bissl.run_state import RunState
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> stacks = {"data": BatchStack([1, 2])}
        >>> state = RunState({"params": {"w": w}}, {"sgd": opt}, {}, stacks, {})
        >>> saved = state.state_dict()
        >>> with torch.no_grad():
        ...     _ = w.mul_(0)                               # the run goes on ...
        >>> state.load_state_dict(saved)                    # ... and is restored in place
        >>> w.detach().tolist()
        [1.0, 2.0]
    """

    def __init__(
        self,
        params: Mapping[str, Mapping[str, Tensor]],
        optimizers: Mapping[str, torch.optim.Optimizer],
        schedulers: Mapping[str, Any],
        stacks: Mapping[str, BatchStack],
        modules: Mapping[str, nn.Module],
    ) -> None:
        self.params = {group: dict(tensors) for group, tensors in params.items()}
        self.optimizers = dict(optimizers)
        self.schedulers = {n: s for n, s in schedulers.items() if s is not None}
        self.stacks = dict(stacks)
        self.modules = dict(modules)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain containers: one entry per group, optimiser and scheduler,
        ``"modules"``, and ``"ranks"`` (every rank's stack positions and random states).

        Every rank must call it in a multi-rank run (the per-rank entries are gathered).
        """
        state: dict[str, Any] = {
            group: {n: p.detach().clone() for n, p in tensors.items()}
            for group, tensors in self.params.items()
        }
        state["modules"] = {name: m.state_dict() for name, m in self.modules.items()}
        for name, optimizer in self.optimizers.items():
            state[name] = optimizer.state_dict()
        for name, scheduler in self.schedulers.items():
            state[name] = scheduler.state_dict()
        local = {name: stack.state_dict() for name, stack in self.stacks.items()}
        state["ranks"] = gather_per_rank({**local, "rng": rng_state()})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` into the live objects.

        Each rank resumes its own data position and random state (rank 0's for a single process
        resuming a multi-rank run).

        Raises:
            CheckpointError: a parameter group's names or shapes differ from the live ones.
        """
        for group, params in self.params.items():
            saved = state[group]
            if saved.keys() != params.keys():
                raise CheckpointError(f"checkpoint {group} names differ from this run's "
                                      f"parameters: {sorted(saved.keys() ^ params.keys())}")
            with torch.no_grad():
                for n, p in params.items():
                    if saved[n].shape != p.shape:
                        raise CheckpointError(f"checkpoint {group}[{n!r}] has shape "
                                              f"{tuple(saved[n].shape)}, expected {tuple(p.shape)}")
                    p.copy_(saved[n])
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state[name])
        ranks = state["ranks"]
        mine = ranks[rank()] if rank() < len(ranks) else ranks[0]
        for name, stack in self.stacks.items():
            stack.load_state_dict(mine[name])
        set_rng_state(mine["rng"])

    def replicated_tensors(self) -> list[Tensor]:
        """Every tensor that must be identical on all ranks, once each, in a fixed order: the
        parameter groups', then the modules' (buffers included)."""
        tensors: dict[int, Tensor] = {}
        for group in self.params.values():
            for t in group.values():
                tensors.setdefault(id(t), t)
        for name in sorted(self.modules):
            for t in self.modules[name].state_dict(keep_vars=True).values():
                if isinstance(t, Tensor):
                    tensors.setdefault(id(t), t)
        return list(tensors.values())

    def broadcast(self) -> None:
        """Overwrite :meth:`replicated_tensors` with rank 0's values (no-op in one process)."""
        if world_size() > 1:
            broadcast_from_main(self.replicated_tensors())


def upgrade_v1(state: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint of format 1 in format 2: a learnable λ's ``ρ`` joins the upper parameters."""
    upgraded = {k: v for k, v in state.items() if k != "lam_rho"}
    if "lam_rho" in state:
        upgraded["upper_params"] = {**state["upper_params"], LAM_RHO: state["lam_rho"]}
    upgraded["format"] = "implicitbilevel.bissl/2"
    return upgraded


def config_changes(saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> dict[str, tuple]:
    """``{key: (saved, now)}`` for every setting that differs (none for a checkpoint written
    before settings were recorded)."""
    if saved is None:
        return {}
    return {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
