"""The GPT recipe's inputs to the transfer monitor (:mod:`recipes.common.transfer_monitor`).

The pretext GPT (θ_P) holds only the ``V`` pretrained embedding rows, so the monitor reads the
*content* tokens of a task's examples (the first view, special tokens ``s``, ``d``, ``e`` removed)
and embeds them as the mean of θ_P's final hidden states over the real positions. The two views of
a text are two random token deletions (each content token dropped with probability 0.1, at least
one kept), the input-level augmentation counterpart of the vision recipe's crops. The k-NN probe
uses the validation labels of classification tasks; regression tasks (STS-B) get no probe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from recipes.common.transfer_monitor import MonitorData

from .model import GPTPretextModel, positions
from .tasks import PAD_ID, EncodedTask, TaskSpec

__all__ = ["compact", "content_tokens", "gpt_monitor_data", "token_dropout_views"]

Inputs = tuple[Tensor, Tensor]


def compact(ids: Tensor, keep: Tensor) -> Inputs:
    """Move the kept tokens of each row of ``ids`` (B, L) to the front, in order, pad the rest
    with ``PAD_ID``; returns ``(ids, lengths)``."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    lengths = keep.sum(dim=1)
    out = torch.gather(ids, 1, order)
    pos = torch.arange(ids.shape[1], device=ids.device)
    return torch.where(pos < lengths[:, None], out, PAD_ID), lengths


def content_tokens(data: EncodedTask, base_vocab: int) -> Inputs:
    """The first view's tokens below ``base_vocab`` (no special tokens, no padding)."""
    ids, lengths = data.input_ids[:, 0], data.lengths[:, 0]
    real = torch.arange(ids.shape[1]) < lengths[:, None]
    return compact(ids, real & (ids < base_vocab))


def token_dropout_views(batch: list[Tensor], p: float = 0.1) -> tuple[Inputs, Inputs]:
    """Two views of ``(ids, lengths)``: each real token deleted with probability ``p`` (from
    torch's global generator), the first always kept."""
    ids, lengths = batch
    real = torch.arange(ids.shape[1]) < lengths[:, None]

    def view() -> Inputs:
        keep = real & (torch.rand(ids.shape) >= p)
        keep[:, 0] |= real[:, 0]
        return compact(ids, keep)

    return view(), view()


def gpt_monitor_data(pretext: GPTPretextModel, spec: TaskSpec, val: EncodedTask,
                     device: torch.device, limit: int, batch_size: int = 64) -> MonitorData:
    """The monitor's unlabelled view pairs of ``val``'s texts, θ_P's mean-pooled embedding and
    (classification only) the labelled k-NN probe on ``val``."""
    ids, lengths = content_tokens(val, int(pretext.gpt.config.vocab_size))
    if bool((lengths == 0).any()):
        raise ValueError(f"{spec.name}: an example has no content token for the monitor")
    unlabelled = TensorDataset(ids, lengths)
    views = _Mapped(lambda: DataLoader(unlabelled, batch_size), token_dropout_views)

    def embed(inputs: Inputs) -> Tensor:
        x, n = (t.to(device) for t in inputs)
        x = x[:, : int(n.max())]
        hidden = pretext.gpt.transformer(input_ids=x, position_ids=positions(x)).last_hidden_state
        mask = (torch.arange(x.shape[1], device=device) < n[:, None]).to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    probe = None
    if not spec.is_regression:
        probe = _Mapped(lambda: DataLoader(TensorDataset(ids, lengths, val.labels), batch_size),
                        lambda b: ((b[0], b[1]), b[2]))  # labels read only when probing
    return MonitorData(views, embed, modules=[pretext], probe=probe, limit=limit)


class _Mapped:
    """Re-iterable ``fn(batch)`` over a loader built by ``make_loader`` at each pass."""

    def __init__(self, make_loader: Callable[[], DataLoader], fn: Callable) -> None:
        self.make_loader, self.fn = make_loader, fn

    def __iter__(self) -> Iterator:
        """Yield ``fn(batch)`` for each batch of a fresh loader."""
        for batch in self.make_loader():
            yield self.fn(batch)
