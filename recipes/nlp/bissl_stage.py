"""The BiSSL stage for GPT on a GLUE task, built on the library's trainer (thesis Sec. 7.1.3).

Upper level: the downstream model (θ_D = ``gpt.*``, φ_D = new-token rows + task head) with the loss
``L^D(θ_P, φ_D) + L^D(θ_D, φ_D)``, ``L^D`` = task loss + ν·LM loss. Lower level: the pretext model
(θ_P = ``gpt.*``, φ_P empty) with the next-token loss plus ``λ/2 ‖θ_D − θ_P‖²`` over the backbone
names. Both backbones hold only the ``V`` pretrained embedding rows, so the coupling, the
Hessian-vector products and the substitution of θ_P never involve the special-token rows.

The Hessian operator reuses one kept first-order graph per alternation, so every product in a CG
solve sees the same dropout masks (one fixed symmetric matrix).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from implicitbilevel import BilevelProblem, GaussNewton, ProximalL2, functional_module
from recipes.common import warmup_cosine
from recipes.common.ij import problem_options

from .config import BiSSLStageConfig
from .finetune import adam_param_groups
from .losses import downstream_objective, next_token_loss
from .model import GPTDownstreamModel, GPTPretextModel, backbone_names
from .tasks import TaskSpec


def make_losses(
    downstream: GPTDownstreamModel, pretext: GPTPretextModel, spec: TaskSpec, nu: float
) -> tuple[Any, Any, GaussNewton]:
    """``(downstream_loss(params, batch), pretext_loss(params, batch), gauss_newton)`` as pure
    functions of parameter dicts, for :class:`~implicitbilevel.BilevelProblem`.

    ``gauss_newton`` splits the pretext loss into the LM logits (outputs) and the next-token
    cross-entropy (convex in the logits), for ``bissl.curvature=gauss-newton``.
    """
    down_fn = functional_module(downstream)
    pre_fn = functional_module(pretext)

    def downstream_loss(params: dict[str, Tensor], batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        output, lm_logits = down_fn(params, batch[0], batch[1])
        return downstream_objective(spec, output, lm_logits, batch, nu)

    def pretext_loss(params: dict[str, Tensor], batch: Tensor) -> Tensor:
        return next_token_loss(pre_fn(params, batch), batch)

    return downstream_loss, pretext_loss, GaussNewton(pre_fn, next_token_loss)


def build_problem(
    downstream: GPTDownstreamModel,
    pretext: GPTPretextModel,
    spec: TaskSpec,
    nu: float,
    settings: BiSSLStageConfig,
    reducer: Callable[[Mapping[str, Tensor]], dict] | None = None,
) -> BilevelProblem:
    """The BiSSL :class:`~implicitbilevel.BilevelProblem` coupling the ``gpt.*`` parameters.

    ``reducer`` (e.g. ``DistributedContext.reducer``) averages the gradients and Hessian-vector
    products across data-parallel ranks; ``None`` in a single process.
    """
    from implicitbilevel.bissl import bissl_upper_loss

    downstream_loss, pretext_loss, gauss_newton = make_losses(downstream, pretext, spec, nu)
    backbone = backbone_names(downstream)
    pretext_names = {n for n, _ in pretext.named_parameters()}
    if set(backbone) != pretext_names:
        raise ValueError("the pretext and downstream backbones must have the same parameter names")
    return BilevelProblem(
        upper_loss=bissl_upper_loss(downstream_loss, backbone),
        lower_loss=pretext_loss,
        regularizer=ProximalL2(backbone),
        lam=settings.lam,
        reducer=reducer,
        **problem_options(settings, gauss_newton),
    )


def run_bissl(
    downstream: GPTDownstreamModel,
    pretext: GPTPretextModel,
    spec: TaskSpec,
    upper_data: DataLoader,
    lower_data: DataLoader,
    settings: BiSSLStageConfig,
    *,
    upper_lr: float,
    upper_weight_decay: float,
    nu: float,
    device: torch.device,
    out_dir: str | Path | None = None,
    reducer: Callable[[Mapping[str, Tensor]], dict] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run Algorithm 2 in place on ``downstream`` (θ_D, φ_D) and ``pretext`` (θ_P).

    Upper optimiser: Adam with the fine-tuning (lr, wd), cosine over ``T·N_U`` steps after a
    ``upper_warmup_fraction`` warm-up. Lower optimiser: Adam with peak ``lower_lr``, linear warm-up
    over ``lower_warmup_alternations·N_L`` steps then cosine over ``T·N_L`` steps.

    Data-parallel under ``torchrun``: give each rank its shard of both loaders (per-rank batches)
    and the ``reducer`` of :func:`build_problem`; the trainer writes files on rank 0 only.

    Returns:
        The trainer's per-alternation metrics.
    """
    from implicitbilevel.bissl import BiSSLConfig, BiSSLTrainer

    s = settings
    problem = build_problem(downstream, pretext, spec, nu, s, reducer)
    upper_opt = torch.optim.AdamW(
        adam_param_groups(list(downstream.named_parameters()), upper_weight_decay), lr=upper_lr
    )
    lower_opt = torch.optim.AdamW(
        adam_param_groups(list(pretext.named_parameters()), s.lower_weight_decay), lr=s.lower_lr
    )
    upper_total = s.alternations * s.upper_steps
    lower_total = s.alternations * s.lower_steps
    upper_sched = torch.optim.lr_scheduler.LambdaLR(
        upper_opt, warmup_cosine(upper_total, math.ceil(s.upper_warmup_fraction * upper_total))
    )
    lower_sched = torch.optim.lr_scheduler.LambdaLR(
        lower_opt,
        warmup_cosine(
            lower_total, min(lower_total // 2, s.lower_warmup_alternations * s.lower_steps)
        ),
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
            alternations=s.alternations,
            lower_steps=s.lower_steps,
            upper_steps=s.upper_steps,
            grad_clip=s.grad_clip,
            checkpoint_every=min(s.checkpoint_every, s.alternations),
            progress=progress,
        ),
        upper_scheduler=upper_sched,
        lower_scheduler=lower_sched,
        device=device,
        out_dir=out_dir,
    )
    downstream.train()
    pretext.train()
    return trainer.run()
