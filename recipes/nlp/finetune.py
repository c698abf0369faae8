"""Downstream fine-tuning and head warm-up of the GPT (thesis Sec. 7.1.2-7.1.3).

Adam (decoupled weight decay on matrices only, none on biases and LayerNorm scales), a linear
warm-up over the first ``warmup_fraction`` of the steps, then cosine decay to 0; evaluation on
the validation split ``evals_per_epoch`` times per epoch at evenly spaced steps (the last one at
the final step), and the weights of the best validation score kept (in memory, and on disk when a
checkpoint path is given).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from recipes.common import save_checkpoint, shard_loader, warmup_cosine

from .losses import downstream_objective
from .metrics import compute_metric
from .model import BACKBONE_PREFIX, GPTDownstreamModel
from .tasks import EncodedTask, TaskSpec

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

    With ``shard=(rank, world_size)`` each pass covers this rank's share of the examples (a
    ``DistributedSampler`` seeded with ``seed``, equal shares, reshuffled per pass through
    ``set_epoch``); ``batch_size`` is then the per-rank batch.
    """
    return shard_loader(
        TensorDataset(data.input_ids, data.lengths, data.labels),
        batch_size,
        shuffle=shuffle,
        seed=seed,
        shard=shard,
        generator=torch.Generator().manual_seed(seed),
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


@torch.no_grad()
def evaluate(
    model: GPTDownstreamModel,
    spec: TaskSpec,
    data: EncodedTask,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> float:
    """The task metric of ``model`` on ``data`` (eval mode, no dropout)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions = []
    for ids, lengths, _ in task_loader(data, batch_size, shuffle=False):
        output, _ = model(ids.to(device), lengths.to(device))
        predictions.append(output.squeeze(-1) if spec.is_regression else output.argmax(-1))
    model.train(was_training)
    predicted = torch.cat(predictions).float().cpu().numpy()
    return compute_metric(spec.metric, data.labels.float().numpy(), predicted)


@dataclass
class FinetuneResult:
    """Best validation score, the evaluation curve and the number of update steps."""

    best_val: float
    curve: list[float] = field(default_factory=list)
    steps: int = 0


def _batches(loader: DataLoader) -> Iterator[Batch]:
    while True:
        yield from loader


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
) -> FinetuneResult:
    """Train ``model`` on ``train`` with loss L^task + ν L^GPT and restore its best weights.

    With ``freeze_backbone=True`` only the head φ_D (task layer and new-token rows) is trained at a
    constant learning rate: the head warm-up of Sec. 7.1.3. ``progress=False`` hides the
    progress bar.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    device = device or next(model.parameters()).device
    loader = task_loader(
        train, batch_size, shuffle=True, seed=seed, drop_last=len(train) > batch_size
    )
    steps_per_epoch = len(loader)
    total = max(1, round(epochs * steps_per_epoch))
    n_evals = max(1, round(epochs * evals_per_epoch))
    eval_steps = {max(1, round(total * (i + 1) / n_evals)) for i in range(n_evals)}

    named = [
        (n, p)
        for n, p in model.named_parameters()
        if not (freeze_backbone and n.startswith(BACKBONE_PREFIX))
    ]
    frozen = [
        p for n, p in model.named_parameters() if freeze_backbone and n.startswith(BACKBONE_PREFIX)
    ]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(adam_param_groups(named, weight_decay), lr=lr)
    factor = (
        (lambda _: 1.0)
        if freeze_backbone
        else warmup_cosine(total, math.ceil(warmup_fraction * total))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    torch.manual_seed(seed)
    result = FinetuneResult(best_val=-math.inf)
    best_state: dict[str, Tensor] | None = None
    model.train()
    batches = _batches(loader)
    try:
        for step in tqdm(range(1, total + 1), desc=desc, leave=False, disable=not progress):
            ids, lengths, labels = (t.to(device) for t in next(batches))
            output, lm_logits = model(ids, lengths)
            loss = downstream_objective(spec, output, lm_logits, (ids, lengths, labels), nu)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step in eval_steps:
                score = evaluate(model, spec, val, device=device)
                score = score if np.isfinite(score) and torch.isfinite(loss) else -math.inf
                result.curve.append(score)
                if best_state is None or score > result.best_val:
                    result.best_val = score
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    if checkpoint is not None:
                        save_checkpoint(best_state, checkpoint)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if best_state is not None:
        model.load_state_dict(best_state)
    result.steps = total
    return result
