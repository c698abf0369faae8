"""The GPT recipe's downstream pieces (thesis Sec. 7.1.2-7.1.3): batches, Adam parameter groups
and the task objective; the loop is :func:`recipes.common.fit`.

Adam (decoupled weight decay on matrices only, none on biases and LayerNorm scales), a linear
warm-up over the first ``warmup_fraction`` of the steps, then cosine decay to 0; evaluation on
the validation split ``evals_per_epoch`` times per epoch at evenly spaced steps (the last one at
the final step), and the weights of the best validation score kept.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from recipes.common import shard_loader, warmup_cosine
from recipes.common.finetune import FitResult, Objective, fit
from recipes.common.finetune import evaluate as common_evaluate

from .losses import downstream_objective, task_loss
from .metrics import compute_metric
from .model import BACKBONE_PREFIX, GPTDownstreamModel
from .tasks import EncodedTask, TaskSpec

__all__ = ["adam_param_groups", "collate", "evaluate", "finetune", "gpt_objective", "task_loader",
           "warmup_cosine"]

Batch = tuple[Tensor, Tensor, Tensor]


def collate(items: list[tuple[Tensor, Tensor, Tensor]]) -> Batch:
    """Stack ``(input_ids, lengths, label)`` items and trim padding to the longest sequence."""
    ids = torch.stack([i[0] for i in items])
    lengths = torch.stack([i[1] for i in items])
    labels = torch.stack([i[2] for i in items])
    return ids[..., : int(lengths.max())], lengths, labels


def task_loader(
    data: EncodedTask,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    shard: tuple[int, int] | None = None,
) -> DataLoader:
    """A ``DataLoader`` of ``(input_ids, lengths, labels)`` batches over an encoded split.

    Shuffles draw from torch's global generator (seed it first; the BiSSL trainer's checkpoint
    then restores the exact order on resume). With ``shard=(rank, world_size)`` each pass covers
    this rank's share of the examples (a ``DistributedSampler`` seeded with ``seed``, equal
    shares, reshuffled per pass through ``set_epoch``); ``batch_size`` is then the per-rank
    batch.
    """
    return shard_loader(
        TensorDataset(data.input_ids, data.lengths, data.labels),
        batch_size,
        shuffle=shuffle,
        seed=seed,
        shard=shard,
        drop_last=drop_last,
        collate_fn=collate,
    )


def adam_param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups: weight decay on parameters with ≥ 2 dimensions, none on biases and norms."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def gpt_objective(spec: TaskSpec, nu: float) -> Objective:
    """The task for :func:`recipes.common.fit`: train on L^task + ν L^GPT (thesis eq. 2.3);
    evaluate the task ``loss`` and the task's metric (``mcc``, ``accuracy``, ``f1`` or
    ``pearson``), by which the best validation is chosen."""

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        output, lm_logits = model(batch[0], batch[1])
        return downstream_objective(spec, output, lm_logits, batch, nu)

    def predict(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        return model(batch[0], batch[1])[0], batch[2]

    def metrics(outputs: Tensor, labels: Tensor) -> dict[str, float]:
        predicted = outputs.squeeze(-1) if spec.is_regression else outputs.argmax(-1)
        score = compute_metric(spec.metric, labels.float().numpy(), predicted.float().numpy())
        return {"loss": float(task_loss(spec, outputs, labels)), spec.metric: score}

    return Objective(loss, predict, metrics, spec.metric)


def evaluate(
    model: GPTDownstreamModel,
    spec: TaskSpec,
    data: EncodedTask,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> float:
    """The task metric of ``model`` on ``data`` (eval mode, no dropout)."""
    device = device or next(model.parameters()).device
    loader = task_loader(data, batch_size, shuffle=False)
    return common_evaluate(model, loader, gpt_objective(spec, 0.0), device)[spec.metric]


def finetune(
    model: GPTDownstreamModel,
    spec: TaskSpec,
    train: EncodedTask,
    val: EncodedTask,
    *,
    lr: float,
    weight_decay: float,
    epochs: float,
    batch_size: int,
    nu: float,
    seed: int,
    warmup_fraction: float = 0.002,
    evals_per_epoch: int = 10,
    freeze_backbone: bool = False,
    checkpoint: str | Path | None = None,
    device: torch.device | None = None,
    desc: str = "fine-tune",
    progress: bool = True,
    patience: int | None = None,
    min_epochs: float = 0.0,
) -> FitResult:
    """Fine-tune ``model`` on ``train`` with Adam (:func:`recipes.common.fit`), validating on
    ``val``; ``freeze_backbone`` trains only the head φ_D (task layer and new-token rows) at a
    constant lr, the head warm-up of Sec. 7.1.3; ``patience``/``min_epochs`` stop early (Sec.
    9.1, :class:`~recipes.common.finetune.EarlyStopping`). Returns the fit
    (``best_val[spec.metric]``, ``epochs``)."""
    device = device or next(model.parameters()).device
    loader = task_loader(train, batch_size, shuffle=True, seed=seed,
                         drop_last=len(train) > batch_size)
    return fit(
        model, gpt_objective(spec, nu), loader, task_loader(val, 64, shuffle=False),
        lambda named: torch.optim.AdamW(adam_param_groups(named, weight_decay), lr=lr),
        epochs=epochs, device=device, seed=seed, evals_per_epoch=evals_per_epoch,
        warmup_fraction=warmup_fraction, freeze=BACKBONE_PREFIX if freeze_backbone else None,
        checkpoint=checkpoint, progress=progress, desc=desc, patience=patience,
        min_epochs=min_epochs,
    )
