"""Both recipes' BiSSL stage (``recipes.common.run_bissl`` with each recipe's losses) on tiny
models and random data, for tests of stage options that need no pretrained start."""

from __future__ import annotations

import copy
import dataclasses

import torch

from recipes.common.bissl_stage import run_bissl
from recipes.common.settings import BiSSLStageConfig

TINY_STAGE = dict(alternations=2, lower_steps=1, upper_steps=1, cg_iters=3,
                  lower_warmup_alternations=0, on_breakdown="ignore")


def _config(**overrides) -> BiSSLStageConfig:
    cfg = BiSSLStageConfig(**TINY_STAGE)
    return dataclasses.replace(cfg, **overrides)


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01)


def vision_stage(**overrides) -> list[dict]:
    """Two alternations of the vision recipe's stage: small ResNet (BatchNorm), NT-Xent."""
    from recipes.vision.bissl_stage import bissl_losses
    from recipes.vision.models import Downstream, Pretext, build_backbone

    torch.manual_seed(0)
    pretext = Pretext(build_backbone("small-resnet", width=4), proj_dim=8)
    downstream = Downstream(copy.deepcopy(pretext.backbone), num_classes=3)
    views = [(torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)) for _ in range(6)]
    labelled = [(torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))) for _ in range(4)]
    return run_bissl(_config(**overrides), bissl_losses(pretext, downstream, 0.5),
                     downstream=downstream, pretext=pretext, upper_optimizer=_sgd(downstream),
                     lower_optimizer=_sgd(pretext), upper_data=labelled, lower_data=views,
                     device=torch.device("cpu"), progress=False)


def gpt_stage(**overrides) -> list[dict]:
    """Two alternations of the GPT recipe's stage: a one-layer GPT (LayerNorm), SST-2 head."""
    from recipes.nlp.bissl_stage import bissl_losses
    from recipes.nlp.model import GPTDownstreamModel, GPTPretextModel, build_gpt
    from recipes.nlp.tasks import get_task

    torch.manual_seed(0)
    vocab, length = 30, 10
    gpt = build_gpt(vocab_size=vocab, context=length, width=8, layers=1, heads=2, dropout=0.0)
    spec = get_task("sst2")
    downstream = GPTDownstreamModel(copy.deepcopy(gpt), spec.num_special_tokens,
                                    spec.num_outputs, 0.0)
    pretext = GPTPretextModel(gpt)
    chunks = [torch.randint(0, vocab, (4, length)) for _ in range(6)]
    labelled = [(torch.randint(0, vocab, (4, 1, length)), torch.full((4, 1), length),
                 torch.randint(0, 2, (4,))) for _ in range(4)]
    return run_bissl(_config(**overrides), bissl_losses(downstream, pretext, spec, 0.5),
                     downstream=downstream, pretext=pretext, upper_optimizer=_sgd(downstream),
                     lower_optimizer=_sgd(pretext), upper_data=labelled, lower_data=chunks,
                     device=torch.device("cpu"), progress=False)
