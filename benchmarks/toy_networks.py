"""Tiny random networks with the recipes' losses and random data, for the benchmarks' tests.

The same :class:`~benchmarks.pretrained.Network` records as the pretrained networks of
:mod:`benchmarks.pretrained`, without pretraining: a one-conv vision network with BatchNorm and a
one-layer GPT, each with the recipe's BiSSL losses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicitbilevel import GaussNewton

from .harness import seeded
from .pretrained import LossBuilder, Network, no_dropout, vision_losses

__all__ = ["toy_networks"]


class _TinyBackbone(nn.Module):
    """Conv 3x3 (3 -> 4) + BatchNorm + ReLU + global average pooling: a 4-feature backbone."""

    out_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, 4)``."""
        return F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def _task_losses(spec: Any, nu: float) -> LossBuilder:
    """``recipes.nlp.bissl_stage.bissl_losses`` for a task spec (the GPT recipe's losses)."""
    from recipes.nlp.bissl_stage import bissl_losses

    def build(downstream: nn.Module, pretext: nn.Module, dtype: torch.dtype,
              frozen: bool) -> tuple[Callable, Callable, GaussNewton]:
        losses = bissl_losses(downstream, pretext, spec, nu)  # type: ignore[arg-type]
        return losses.downstream, losses.pretext, losses.gauss_newton

    return build


def toy_networks(device: str = "cpu", seed: int = 0, upper_steps: int = 3) -> list[Network]:
    """Tiny random networks with the recipes' losses and random data (no pretraining)."""
    from recipes.nlp.model import GPTDownstreamModel, GPTPretextModel, backbone_names, build_gpt
    from recipes.nlp.tasks import get_task
    from recipes.vision.models import Downstream, Pretext

    gen = seeded(seed)
    backbone = _TinyBackbone()
    pretext = Pretext(backbone, proj_dim=4).to(device).train()
    down_backbone = _TinyBackbone()
    down_backbone.load_state_dict(backbone.state_dict())
    downstream = Downstream(down_backbone, 3).to(device).train()

    def images(n: int) -> Tensor:
        return torch.rand(n, 3, 8, 8, generator=gen).to(device)

    vision = Network(
        name="toy vision (one conv + BatchNorm, random)", downstream=downstream, pretext=pretext,
        losses=vision_losses(0.5),
        backbone=[n for n, _ in downstream.named_parameters() if n.startswith("backbone.")],
        lower_batch=(images(4), images(4)),
        upper_batches=[(images(4), torch.randint(0, 3, (4,), generator=gen).to(device))
                       for _ in range(upper_steps)],
        note="random init, random 8x8 images",
    )
    spec = get_task("sst2")
    gpt = build_gpt(vocab_size=30, context=8, width=8, layers=1, heads=2, dropout=0.0)
    gpt_pre = GPTPretextModel(copy.deepcopy(gpt)).to(device).train()
    gpt_down = no_dropout(GPTDownstreamModel(copy.deepcopy(gpt), spec.num_special_tokens,
                                              spec.num_outputs, 0.0)).to(device).train()

    def upper() -> tuple[Tensor, Tensor, Tensor]:
        ids = torch.randint(0, 32, (3, 1, 8), generator=gen)
        lengths = torch.randint(4, 9, (3, 1), generator=gen)
        return ids.to(device), lengths.to(device), torch.randint(0, 2, (3,), generator=gen).to(
            device)

    gpt_net = Network(
        name="toy GPT (1 layer, 8 wide, random)", downstream=gpt_down, pretext=gpt_pre,
        losses=_task_losses(spec, 0.5), backbone=backbone_names(gpt_down),
        lower_batch=torch.randint(0, 30, (2, 8), generator=gen).to(device),
        upper_batches=[upper() for _ in range(upper_steps)], note="random init, random tokens",
    )
    return [vision, gpt_net]
