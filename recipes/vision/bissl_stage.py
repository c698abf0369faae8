"""The BiSSL stage (thesis Sec. 6.1.3) wired to :class:`implicitbilevel.bissl.BiSSLTrainer`.

Lower level: NT-Xent on the pretext model (θ_P, φ_P) with LARS, linear warm-up over
``N_L · lower_warmup_alternations`` steps, cosine to ``final_lr_factor`` × peak over ``N_L · T``
steps. Upper level: cross-entropy of the downstream model (θ_D, φ_D) with SGD (momentum 0.9), the
lr and weight decay of the head warm-up, cosine over ``N_U · T`` steps to ``final_lr_factor`` ×.
Both backbones share the parameter names ``backbone.*``, which the proximal regulariser couples.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from implicitbilevel import (
    BilevelProblem,
    CosineDecay,
    CosineIncrease,
    ExponentialIncrease,
    GaussNewton,
    LearnableLambda,
    ProximalL2,
    functional_module,
)
from implicitbilevel.bissl import BiSSLConfig, BiSSLTrainer, bissl_upper_loss
from implicitbilevel.optim import LARS, lars_param_groups
from recipes.common import warmup_cosine
from recipes.common.ij import problem_options

from .config import BiSSLStageConfig
from .losses import nt_xent_logits, nt_xent_targets
from .models import Downstream, Pretext

__all__ = ["build_lambda", "run_bissl"]


def build_lambda(cfg: BiSSLStageConfig) -> float | Any:
    """λ from the config: a float, a schedule over ``T`` alternations, or a learnable λ."""
    sched = cfg.lam_schedule
    if sched == "constant":
        return cfg.lam
    if sched == "learnable":
        return LearnableLambda(init=cfg.lam)
    kinds = {"cosine-decay": CosineDecay, "cosine-increase": CosineIncrease}
    if sched in kinds:
        return kinds[sched](cfg.lam_min, cfg.lam_max, cfg.alternations)
    return ExponentialIncrease(cfg.lam_min, cfg.lam_max, cfg.alternations, alpha=cfg.lam_alpha)


def run_bissl(
    pretext: Pretext,
    downstream: Downstream,
    lower_data: Iterable,
    upper_data: Iterable,
    cfg: BiSSLStageConfig,
    *,
    upper_lr: float,
    upper_weight_decay: float,
    temperature: float = 0.5,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    device: torch.device,
    bf16: bool = False,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    reducer: Any = None,
) -> list[dict[str, Any]]:
    """Run BiSSL; θ_P ends in ``pretext.backbone`` and (θ_D, φ_D) in ``downstream``.

    ``lower_data`` yields ``(view1, view2)`` batches, ``upper_data`` ``(images, targets)``.
    ``reducer`` averages gradients and HVPs across data-parallel ranks (``torchrun``).
    Returns the per-alternation metrics of the trainer.
    """
    pretext.to(device).train()
    downstream.to(device).train()
    pre_fn = functional_module(pretext)
    down_fn = functional_module(downstream)

    def pretext_logits(params: dict, batch: Any) -> torch.Tensor:
        v1, v2 = batch
        return nt_xent_logits(pre_fn(params, v1), pre_fn(params, v2), tau=temperature)

    def logits_loss(logits: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(logits, nt_xent_targets(logits))

    def pretext_loss(params: dict, batch: Any) -> torch.Tensor:  # NT-Xent, eq. 2.1
        return logits_loss(pretext_logits(params, batch), batch)

    def downstream_loss(params: dict, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(down_fn(params, x).float(), y)

    backbone = [n for n, _ in downstream.named_parameters() if n.startswith("backbone.")]
    lam = build_lambda(cfg)
    problem = BilevelProblem(
        upper_loss=bissl_upper_loss(downstream_loss, backbone),
        lower_loss=pretext_loss,
        regularizer=ProximalL2(backbone),
        lam=lam,
        reducer=reducer,
        **problem_options(cfg, GaussNewton(pretext_logits, logits_loss)),
    )
    upper_opt = torch.optim.SGD(
        downstream.parameters(), lr=upper_lr, momentum=momentum, weight_decay=upper_weight_decay
    )
    if isinstance(lam, LearnableLambda):
        lam.rho.data = lam.rho.data.to(device)
        upper_opt.add_param_group(
            {"params": lam.parameters(), "lr": cfg.lam_lr, "weight_decay": 0.0}
        )
    lower_opt = LARS(
        lars_param_groups(pretext, cfg.lower_weight_decay),
        lr=cfg.lower_lr,
        momentum=momentum,
        weight_decay=cfg.lower_weight_decay,
        trust_coefficient=trust_coefficient,
    )
    T, n_l, n_u = cfg.alternations, cfg.lower_steps, cfg.upper_steps
    lower_sched = torch.optim.lr_scheduler.LambdaLR(
        lower_opt, warmup_cosine(n_l * T, n_l * cfg.lower_warmup_alternations, cfg.final_lr_factor)
    )
    upper_sched = torch.optim.lr_scheduler.LambdaLR(
        upper_opt, warmup_cosine(n_u * T, 0, cfg.final_lr_factor)
    )
    trainer = BiSSLTrainer(
        problem,
        upper_params=dict(downstream.named_parameters()),
        lower_params=dict(pretext.named_parameters()),
        upper_optimizer=upper_opt,
        lower_optimizer=lower_opt,
        upper_data=upper_data,
        lower_data=lower_data,
        config=BiSSLConfig(
            alternations=T,
            lower_steps=n_l,
            upper_steps=n_u,
            grad_clip=cfg.grad_clip,
            autocast="bf16" if bf16 else None,
            progress=progress,
        ),
        upper_scheduler=upper_sched,
        lower_scheduler=lower_sched,
        device=device,
        out_dir=out_dir,
        modules={"pretext": pretext, "downstream": downstream},
    )
    return trainer.run(resume=resume)
