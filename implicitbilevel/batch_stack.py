"""Batch stacks (thesis Sec. 6.1.3): one pass over a loader, regenerated only when needed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchStack"]


class BatchStack:
    """Batches of one pass over a loader, taken in order, regenerated only when needed.

    Before a stage that needs ``k`` batches, :meth:`reserve` starts a fresh pass if fewer than
    ``k`` remain (and the loader has at least ``k``); a loader shorter than ``k`` is simply cycled.
    The random state at the start of each pass is recorded, so the exact position can be restored
    on resume (the already consumed batches of the pass are drawn again and discarded).
    """

    def __init__(self, loader: Iterable) -> None:
        try:
            self.size = len(loader)  # type: ignore[arg-type]
        except TypeError as err:
            raise TypeError(
                "BiSSL data must be re-iterable with a length (e.g. a DataLoader)"
            ) from err
        if self.size == 0:
            raise ValueError("BiSSL data is empty: the loader yields no batch")
        self.loader = loader
        self.consumed = 0
        self.passes = 0
        self._iterator: Iterator | None = None
        self._pass_rng: Tensor | None = None

    @property
    def remaining(self) -> int:
        """Batches left in the current pass."""
        return 0 if self._iterator is None else self.size - self.consumed

    def _start_iterator(self, epoch: int) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle per pass
            sampler.set_epoch(epoch)
        self._iterator = iter(self.loader)

    def _new_pass(self) -> None:
        self._pass_rng = torch.random.get_rng_state()
        self._start_iterator(epoch=self.passes)
        self.passes += 1
        self.consumed = 0

    def reserve(self, k: int) -> None:
        """Start a new pass unless ``k`` batches remain (or the loader is shorter than ``k``)."""
        if self._iterator is None or (self.remaining < k <= self.size):
            self._new_pass()

    def next(self) -> Any:
        """Return the next batch, starting a new pass when the current one is exhausted."""
        if self.remaining == 0:
            self._new_pass()
        assert self._iterator is not None
        batch = next(self._iterator)
        self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Position in the stack, for a checkpoint."""
        return {"consumed": self.consumed, "passes": self.passes, "pass_rng": self._pass_rng}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the position saved by :meth:`state_dict` (replays the current pass's start)."""
        self.passes = int(state["passes"])
        self.consumed = 0
        self._iterator = None
        if state["pass_rng"] is None:
            return
        outer = torch.random.get_rng_state()
        torch.random.set_rng_state(state["pass_rng"])
        self._pass_rng = state["pass_rng"]
        self._start_iterator(epoch=self.passes - 1)
        for _ in range(int(state["consumed"])):
            next(self._iterator)
        self.consumed = int(state["consumed"])
        torch.random.set_rng_state(outer)
