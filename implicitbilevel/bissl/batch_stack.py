"""Batch stacks (thesis Sec. 6.1.3): one pass over a loader, regenerated only when needed; and
moving a batch to the training device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchStack", "to_device"]


def to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with its tensors (in nested tuples, lists and dicts) moved to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(moved) if isinstance(batch, list) else tuple(moved)
    return batch


def _full_batches(loader: Iterable) -> int | None:
    """The number of full batches per pass when the loader's last batch is partial, else ``None``.

    Known only for loaders with a ``batch_size`` (a ``DataLoader`` over a sized sampler); ``None``
    also when the loader drops the partial batch itself or has no full batch at all.
    """
    batch_size = getattr(loader, "batch_size", None)
    if not isinstance(batch_size, int) or batch_size < 1 or getattr(loader, "drop_last", False):
        return None
    try:
        examples = len(loader.sampler)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None
    full = examples // batch_size
    return full if examples % batch_size and full >= 1 else None


class BatchStack:
    """Batches of one pass over a loader, taken in order, regenerated only when needed.

    Before a stage that needs ``k`` batches, :meth:`reserve` starts a fresh pass if fewer than
    ``k`` remain (and a pass has at least ``k``). When a pass has fewer than ``k`` batches (a small
    downstream dataset), :meth:`next` starts a new pass, reshuffled by the loader, whenever the
    current one is exhausted, so a stage spans several passes.

    A trailing partial batch is never used: for a loader with a ``batch_size`` (a ``DataLoader``)
    whose last batch of a pass has fewer examples, the pass ends after the full batches, i.e. the
    stack is remade once fewer examples than a batch remain (thesis Sec. 6.1.3). Only a loader
    with a single, partial batch yields it. Loaders without a ``batch_size`` are taken as they
    are, every batch of a pass included.

    The random state at the start of each pass is recorded, so the exact position can be restored
    on resume (the already consumed batches of the pass are drawn again and discarded).

    Attributes:
        size: the batches used per pass (full batches only, see above).

    Example:
        >>> from implicitbilevel.bissl import BatchStack
        >>> stack = BatchStack([10, 20, 30])               # any iterable of batches: one pass
        >>> stack.reserve(2)
        >>> [stack.next(), stack.next()]
        [10, 20]
        >>> stack.reserve(2)                                # one batch left: a fresh pass starts
        >>> [stack.next(), stack.next(), stack.next()], stack.passes
        ([10, 20, 30], 2)
    """

    def __init__(self, loader: Iterable) -> None:
        try:
            size = len(loader)  # type: ignore[arg-type]
        except TypeError as err:
            raise TypeError(
                "BiSSL data must be re-iterable with a length (e.g. a DataLoader)"
            ) from err
        if size == 0:
            raise ValueError("BiSSL data is empty: the loader yields no batch")
        full = _full_batches(loader)
        self.size = size if full is None else full
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
        """Start a new pass unless ``k`` batches remain (or a pass is shorter than ``k``)."""
        if self._iterator is None or (self.remaining < k <= self.size):
            self._new_pass()

    def next(self) -> Any:
        """Return the next batch, starting a new pass when the current one is exhausted."""
        if self.remaining == 0:
            self._new_pass()
        assert self._iterator is not None
        batch = self._draw()
        self.consumed += 1
        return batch

    def _draw(self) -> Any:
        assert self._iterator is not None
        try:
            return next(self._iterator)
        except StopIteration:
            raise RuntimeError(
                f"the loader's pass ended after {self.consumed} batches, but its length says "
                f"{self.size}: a pass must yield as many batches as len(loader) (an iterable "
                "dataset shorter than its __len__, e.g. a corpus smaller than the pass, must be "
                "read again to fill the pass)") from None

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
            self._draw()
            self.consumed += 1
        torch.random.set_rng_state(outer)
