"""Pretext pretraining of a freshly built GPT (used by the embedded run; thesis Sec. 7.1.2).

Adam with decoupled weight decay on matrices, linear warm-up then cosine decay, next-token loss.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from recipes.common import warmup_cosine
from recipes.common.finite import check_loss

from .config import PretrainConfig
from .finetune import adam_param_groups
from .losses import next_token_loss
from .model import GPTPretextModel


def _cycle(loader: DataLoader) -> Iterator[torch.Tensor]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the pretext corpus yields no full batch of chunks")


def pretrain(
    model: GPTPretextModel,
    loader: DataLoader,
    cfg: PretrainConfig,
    device: torch.device,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` for ``cfg.steps`` steps on ``loader``; return the loss per step
    (``progress=False`` hides the progress bar)."""
    optimizer = torch.optim.AdamW(
        adam_param_groups(list(model.named_parameters()), cfg.weight_decay), lr=cfg.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.steps, min(cfg.warmup_steps, cfg.steps // 2))
    )
    losses = []
    model.train()
    batches = _cycle(loader)
    for step in tqdm(range(cfg.steps), desc="pretext pretraining", disable=not progress):
        chunk = next(batches).to(device)
        loss = next_token_loss(model(chunk), chunk)
        check_loss("pretext", f"step {step}", float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return losses
