"""Objectives: the GPT pretext loss and the downstream loss of eq. (2.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tasks import TaskSpec

IGNORE = -100


def next_token_loss(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Pretext loss L^GPT: mean next-token cross-entropy of logits (B, L, C) on ids (B, L)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
    )


def lm_targets(input_ids: Tensor, lengths: Tensor) -> Tensor:
    """Next-token targets (..., L - 1) of right-padded ids (..., L), ``IGNORE`` past each length."""
    targets = input_ids[..., 1:].clone()
    position = torch.arange(1, input_ids.shape[-1], device=input_ids.device)
    targets[position >= lengths.unsqueeze(-1)] = IGNORE
    return targets


def formatted_lm_loss(lm_logits: Tensor, input_ids: Tensor, lengths: Tensor) -> Tensor:
    """Language-model loss on formatted inputs, averaged over the views (both orders for
    similarity tasks).

    Args:
        lm_logits: (B, views, L, C).
        input_ids: (B, views, L).
        lengths: (B, views).
    """
    targets = lm_targets(input_ids, lengths)
    per_view = []
    for v in range(input_ids.shape[1]):
        logits = lm_logits[:, v, :-1]
        per_view.append(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets[:, v].reshape(-1),
                ignore_index=IGNORE,
            )
        )
    return torch.stack(per_view).mean()


def task_loss(spec: TaskSpec, output: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy for classification, mean squared error for regression (STSB).

    The squared error is written out: ``F.mse_loss`` fails under forward-over-reverse
    differentiation in torch 2.14 ("ZeroTensors are immutable").
    """
    if spec.is_regression:
        return ((output.squeeze(-1) - labels.to(output.dtype)) ** 2).mean()
    return F.cross_entropy(output, labels)


def downstream_objective(
    spec: TaskSpec,
    output: Tensor,
    lm_logits: Tensor,
    batch: tuple[Tensor, Tensor, Tensor],
    nu: float,
) -> Tensor:
    """L^GPT-FT = L^task + ν L^GPT (thesis eq. 2.3) on a batch ``(input_ids, lengths, labels)``."""
    input_ids, lengths, labels = batch
    loss = task_loss(spec, output, labels)
    if nu != 0:
        loss = loss + nu * formatted_lm_loss(lm_logits, input_ids, lengths)
    return loss
