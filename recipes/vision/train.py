"""SimCLR pretraining and the downstream objective (the fine-tuning loop is
:func:`recipes.common.fit`).

Fine-tuning follows thesis Sec. 6.1.2: a linear head on the backbone, cross-entropy (on multi-hot
targets for VOC07, as the reference code did), validation after every epoch and the weights of
the best validation epoch kept (top-1, or 11-point mAP for multi-label tasks).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from implicitbilevel.bissl.lars import LARS, lars_param_groups
from recipes.common import autocast, warmup_cosine
from recipes.common.finetune import Objective
from recipes.common.finite import check_loss

from .losses import nt_xent
from .metrics import mean_average_precision_11, topk_accuracy
from .models import Pretext

__all__ = ["classification_objective", "downstream_loss", "pretrain_simclr"]


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
    for epoch in _bar(range(epochs), progress, "pretext (SimCLR)"):
        total, n = 0.0, 0
        for step, (v1, v2) in enumerate(loader):
            v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
            with autocast(device, bf16):
                loss = nt_xent(model(v1), model(v2), temperature)
            check_loss("pretext", f"epoch {epoch}, step {step}", loss.item())
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


def classification_objective(multilabel: bool) -> Objective:
    """The downstream task for :func:`recipes.common.fit`: cross-entropy; ``loss`` and
    ``top1``/``top5`` (single-label) or ``map`` (11-point mAP, multi-label) on a split, the best
    validation chosen by top-1 or mAP."""

    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return downstream_loss(model(batch[0]), batch[1])

    def predict(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return model(batch[0]), batch[1]

    def metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
        out = {"loss": float(downstream_loss(logits, targets))}
        if multilabel:
            out["map"] = mean_average_precision_11(logits, targets)
        else:
            out["top1"] = topk_accuracy(logits, targets, 1)
            out["top5"] = topk_accuracy(logits, targets, 5)
        return out

    return Objective(loss, predict, metrics, "map" if multilabel else "top1")
