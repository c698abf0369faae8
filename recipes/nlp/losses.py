"""Objectives: the GPT pretext loss and the downstream loss of eq. (2.3)."""

from __future__ import annotations

import math

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


def formatted_lm_loss(
    lm_logits: Tensor, input_ids: Tensor, lengths: Tensor, *, combine: str = "outputs"
) -> Tensor:
    """The auxiliary language-model loss ``L^GPT`` of eq. (2.3) on formatted inputs.

    With one view (classification, entailment) this is the mean next-token cross-entropy over the
    real tokens. With the two orders of a similarity task the thesis combines the views *before*
    the loss (Sec. 7.1.2, "Downstream Fine-Tuning"): "the language modeling heads produce
    separate outputs for each sequence, which are averaged before computing the auxiliary loss".
    So (``combine="outputs"``, the default):

    - the output averaged is the LM head's output ``H_out = softmax(H_L W_e^T)`` of eq. (2.2),
      i.e. the next-token *distributions* ``p̄_i = ½ (p_i(x_1) + p_i(x_2))`` at every position
      ``i`` (both orders have the same length, so the positions line up);
    - the target of the pair is, in the same way, the average of the two orders' one-hot
      next-token targets, keeping the loss independent of the sentence order as the two views
      are meant to be (Sec. 7.1.1): ``-½ [log p̄_i(x_{1,i+1}) + log p̄_i(x_{2,i+1})]``,
      averaged over the real positions of the batch.

    ``combine="losses"`` instead averages the two orders' separate cross-entropies (for
    comparison; not what the thesis describes).

    Args:
        lm_logits: (B, views, L, C).
        input_ids: (B, views, L).
        lengths: (B, views); with several views all views of an example must have the same length.
        combine: ``"outputs"`` or ``"losses"``.
    """
    if combine not in ("outputs", "losses"):
        raise ValueError(f"combine must be 'outputs' or 'losses', got {combine!r}")
    targets = lm_targets(input_ids, lengths)
    views = input_ids.shape[1]
    if views == 1 or combine == "losses":
        per_view = []
        for v in range(views):
            logits = lm_logits[:, v, :-1]
            per_view.append(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    targets[:, v].reshape(-1),
                    ignore_index=IGNORE,
                )
            )
        return torch.stack(per_view).mean()
    if bool((lengths != lengths[:, :1]).any()):
        raise ValueError("the views of an example must have the same length to average outputs")
    log_probs = F.log_softmax(lm_logits[:, :, :-1], dim=-1)  # (B, views, L-1, C)
    mixture = torch.logsumexp(log_probs, dim=1) - math.log(views)  # log p̄: (B, L-1, C)
    valid = targets != IGNORE  # (B, views, L-1)
    index = targets.clamp(min=0).transpose(1, 2)  # (B, L-1, views)
    picked = mixture.gather(-1, index).transpose(1, 2)  # log p̄ at each view's target
    return -(picked * valid).sum() / valid.sum()


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
    *,
    lm_combine: str = "outputs",
) -> Tensor:
    """L^GPT-FT = L^task + ν L^GPT (thesis eq. 2.3) on a batch ``(input_ids, lengths, labels)``;
    ``lm_combine`` as ``combine`` of :func:`formatted_lm_loss`."""
    input_ids, lengths, labels = batch
    loss = task_loss(spec, output, labels)
    if nu != 0:
        loss = loss + nu * formatted_lm_loss(lm_logits, input_ids, lengths, combine=lm_combine)
    return loss
