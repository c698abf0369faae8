"""The transfer monitor during BiSSL (thesis Sec. 9.1, last item), as a trainer callback.

Every ``bissl.monitor_every`` alternations (and after the last) the callback embeds *unlabelled*
pairs of views of downstream inputs with the current lower-level backbone θ_P and logs the
measures of :mod:`recipes.common.monitor` into that alternation's record of ``metrics.jsonl``:
``rankme``, ``alignment``, ``uniformity``, ``gaussian_mi`` and, as the one labelled reference,
``knn_accuracy`` (leave-one-out k-NN on the validation split), plus ``monitor_seconds``.

The recipe supplies a :class:`MonitorData`: the views (inputs only: the unsupervised measures
never see a label), the embedding function and, separately, the labelled probe batches. The
views are drawn under a fixed seed inside a forked random state, so every monitored alternation
sees the same views and the trainer's random stream (hence a resumed run) is unchanged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .monitor import knn_accuracy, representation_measures

__all__ = ["MonitorData", "embed_all", "transfer_monitor"]


@dataclass
class MonitorData:
    """What a recipe hands the transfer monitor.

    Attributes:
        views: re-iterable batches ``(view1, view2)`` of *unlabelled* downstream inputs (two
            augmentations of the same inputs, paired by row).
        embed: ``embed(inputs) -> (B, d)``: θ_P's representation of a batch of inputs (the live
            pretext backbone, so it follows the lower level).
        modules: put in eval mode while embedding (then restored).
        probe: re-iterable labelled validation batches ``(inputs, labels)`` for the k-NN probe,
            or ``None``.
        limit: at most this many inputs are embedded (``bissl.monitor_samples``).
    """

    views: Iterable[tuple[Any, Any]]
    embed: Callable[[Any], Tensor]
    modules: Sequence[nn.Module] = ()
    probe: Iterable[tuple[Any, Tensor]] | None = None
    limit: int = 512


def _identity(x: Tensor) -> Tensor:
    return x


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    modes = [[m.training for m in mod.modules()] for mod in modules]
    try:
        for mod in modules:
            mod.eval()
        yield
    finally:
        for mod, flags in zip(modules, modes, strict=True):
            for m, flag in zip(mod.modules(), flags, strict=True):
                m.training = flag


def embed_all(batches: Iterable[Sequence[Any]], fns: Sequence[Callable[[Any], Tensor]],
              limit: int) -> list[Tensor]:
    """Apply ``fns[i]`` to the ``i``-th element of every batch, over the first ``limit`` rows
    of ``batches``; returns the results stacked on the CPU (one tensor per element)."""
    out: list[list[Tensor]] = [[] for _ in fns]
    seen = 0
    for batch in batches:
        for i, fn in enumerate(fns):
            out[i].append(fn(batch[i]).detach().cpu())
        seen += len(out[0][-1])
        if seen >= limit:
            break
    return [torch.cat(chunks)[:limit] for chunks in out]


def transfer_monitor(data: MonitorData, every: int, knn_k: int = 10, seed: int = 0,
                     ) -> Callable[[Any, int, dict[str, Any]], Mapping[str, float] | None]:
    """A :class:`~implicitbilevel.bissl.BiSSLTrainer` callback logging the monitor every
    ``every`` alternations (``t % every == 0``) and after the last; ``knn_k = 0`` or
    ``data.probe = None`` leaves out the k-NN probe."""
    if every < 1:
        raise ValueError(f"bissl.monitor_every must be >= 1 to monitor, got {every}")

    def callback(trainer: Any, t: int, record: dict[str, Any]) -> Mapping[str, float] | None:
        if t % every and t != trainer.config.alternations - 1:
            return None
        start = time.perf_counter()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _eval_mode(data.modules):
            torch.manual_seed(seed)
            z1, z2 = embed_all(data.views, (data.embed, data.embed), data.limit)
            out = representation_measures(z1, z2)
            if knn_k and data.probe is not None:
                z, labels = embed_all(data.probe, (data.embed, _identity), data.limit)
                out["knn_accuracy"] = knn_accuracy(z, labels, k=knn_k)
        out["monitor_seconds"] = time.perf_counter() - start
        return out

    return callback
