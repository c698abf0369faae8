"""The vision recipe's half of the BiSSL stage (thesis Sec. 6.1.3); the trainer wiring is
:func:`recipes.common.run_bissl`.

Lower level: NT-Xent on the pretext model (θ_P, φ_P), with LARS. Upper level: cross-entropy of the
downstream model (θ_D, φ_D), with SGD at the head warm-up's lr and weight decay. Both backbones
share the parameter names ``backbone.*``, which the proximal regulariser couples.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from implicitbilevel import GaussNewton, functional_module
from recipes.common.bissl_stage import BiSSLLosses

from .losses import nt_xent_logits, nt_xent_targets
from .models import Downstream, Pretext

__all__ = ["bissl_losses"]


def bissl_losses(pretext: Pretext, downstream: Downstream, temperature: float) -> BiSSLLosses:
    """NT-Xent (eq. 2.1) as ``L^P``, cross-entropy as ``L^D``, and the Gauss-Newton split of
    NT-Xent into its similarity logits and the (convex) cross-entropy over them."""
    pre_fn = functional_module(pretext)
    down_fn = functional_module(downstream)

    def pretext_logits(params: dict, batch: Any) -> torch.Tensor:
        v1, v2 = batch
        return nt_xent_logits(pre_fn(params, v1), pre_fn(params, v2), tau=temperature)

    def logits_loss(logits: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(logits, nt_xent_targets(logits))

    def pretext_loss(params: dict, batch: Any) -> torch.Tensor:
        return logits_loss(pretext_logits(params, batch), batch)

    def downstream_loss(params: dict, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(down_fn(params, x).float(), y)

    backbone = [n for n, _ in downstream.named_parameters() if n.startswith("backbone.")]
    return BiSSLLosses(downstream_loss, pretext_loss, GaussNewton(pretext_logits, logits_loss),
                       backbone)
