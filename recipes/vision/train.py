"""Training loops: SimCLR pretraining, fine-tuning / linear probing, evaluation.

Fine-tuning follows thesis Sec. 6.1.2: a linear head on the backbone, cross-entropy (on multi-hot
targets for VOC07, as the reference code did), SGD with momentum, a cosine schedule without
restarts (or a constant lr for the head warm-up), validation after every epoch and the weights
of the best validation epoch kept (top-1, or 11-point mAP for multi-label tasks).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from implicitbilevel.optim import LARS, lars_param_groups
from recipes.common import autocast, warmup_cosine

from .losses import nt_xent
from .metrics import mean_average_precision_11, topk_accuracy
from .models import Downstream, Pretext

__all__ = ["FitResult", "evaluate", "fit_downstream", "pretrain_simclr"]


def _bar(iterable: Iterable, enabled: bool, desc: str, total: int | None = None) -> Iterable:
    return tqdm(iterable, desc=desc, total=total, leave=False) if enabled else iterable


def pretrain_simclr(
    model: Pretext,
    loader: Iterable,
    *,
    epochs: int,
    lr: float,
    warmup_epochs: int,
    weight_decay: float,
    momentum: float,
    trust_coefficient: float,
    temperature: float,
    device: torch.device,
    bf16: bool = False,
    progress: bool = True,
) -> list[float]:
    """SimCLR with LARS, linear warm-up then cosine to 0; ``loader`` yields ``(view1, view2)``.

    Returns the mean NT-Xent loss of every epoch.
    """
    model.to(device).train()
    opt = LARS(
        lars_param_groups(model, weight_decay),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
    )
    steps = len(loader)  # type: ignore[arg-type]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(max(epochs * steps, 1), warmup_epochs * steps)
    )
    losses = []
    for _ in _bar(range(epochs), progress, "pretext (SimCLR)"):
        total, n = 0.0, 0
        for v1, v2 in loader:
            v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
            with autocast(device, bf16):
                loss = nt_xent(model(v1), model(v2), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total, n = total + loss.item(), n + 1
        losses.append(total / max(n, 1))
    return losses


def downstream_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy with class indices, or with multi-hot float targets (multi-label)."""
    return F.cross_entropy(logits.float(), targets)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, multilabel: bool, bf16: bool = False
) -> dict[str, float]:
    """Loss and ``top1``/``top5`` (single-label) or ``map`` (11-point mAP, multi-label)."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        with autocast(device, bf16):
            logits.append(model(x.to(device)).float().cpu())
        targets.append(y)
    model.train(was_training)
    out, tgt = torch.cat(logits), torch.cat(targets)
    metrics = {"loss": float(downstream_loss(out, tgt))}
    if multilabel:
        metrics["map"] = mean_average_precision_11(out, tgt)
    else:
        metrics["top1"] = topk_accuracy(out, tgt, 1)
        metrics["top5"] = topk_accuracy(out, tgt, 5)
    return metrics


@dataclass
class FitResult:
    """Outcome of :func:`fit_downstream`: the best validation epoch and its weights."""

    best_epoch: int
    best_val: dict[str, float]
    state: dict[str, Tensor]
    history: list[dict[str, float]] = field(default_factory=list)


def fit_downstream(
    model: Downstream,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    freeze_backbone: bool = False,
    cosine: bool = True,
    multilabel: bool = False,
    device: torch.device,
    bf16: bool = False,
    progress: bool = True,
    desc: str = "fine-tune",
) -> FitResult:
    """Train ``model`` (whole, or only its head with ``freeze_backbone``) with SGD; validate after
    every epoch; load and return the weights of the best validation epoch.

    A frozen backbone runs in eval mode (its BatchNorm statistics stay fixed).
    """
    model.to(device)
    params = model.head.parameters() if freeze_backbone else model.parameters()
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = len(train_loader)  # type: ignore[arg-type]
    schedule = None
    if cosine:
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(epochs * steps))
    key = "map" if multilabel else "top1"
    best: FitResult | None = None
    history = []
    for epoch in _bar(range(epochs), progress, desc):
        model.train()
        if freeze_backbone:
            model.backbone.eval()
        total, n = 0.0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, bf16):
                loss = downstream_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.step()
            total, n = total + loss.item(), n + 1
        val = evaluate(model, val_loader, device, multilabel, bf16)
        history.append({"epoch": epoch, "train_loss": total / max(n, 1), **val})
        if not math.isfinite(total):
            break
        if best is None or val[key] > best.best_val[key]:
            best = FitResult(epoch, val, copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best.state)
    best.history = history
    return best
