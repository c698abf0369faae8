"""The BiSSL stage on :class:`implicitbilevel.bissl.BiSSLTrainer`, for any recipe's losses.

A recipe gives its downstream loss ``L^D(params, batch)``, its pretext loss ``L^P(params, batch)``
(with the Gauss-Newton split of it), the backbone names the proximal regulariser couples, the two
models and the two optimisers; this module builds λ, the :class:`~implicitbilevel.BilevelProblem`,
the learning-rate schedules and the trainer, and runs (or resumes) Algorithm 2.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from implicitbilevel import (
    BilevelProblem,
    CosineDecay,
    CosineIncrease,
    ExponentialIncrease,
    GaussNewton,
    LearnableLambda,
    ProximalL2,
)
from implicitbilevel.bissl import BiSSLConfig, BiSSLTrainer, bissl_upper_loss

from .appendix_g import appendix_g_parts
from .ij import implicit_jacobian
from .runtime import per_rank_batch_size
from .schedules import warmup_cosine
from .settings import BiSSLStageConfig

__all__ = [
    "BiSSLLosses", "add_lambda", "bissl_batch_sizes", "build_lambda", "build_problem", "run_bissl",
    "stage_schedulers",
]


@dataclass
class BiSSLLosses:
    """A recipe's half of the BiSSL problem.

    Attributes:
        downstream: ``L^D(params, batch)`` over the downstream model's parameter names.
        pretext: ``L^P(params, batch)`` over the pretext model's parameter names.
        gauss_newton: the pretext loss split into outputs and a convex output loss (for
            ``bissl.curvature=gauss-newton``), or ``None``.
        backbone: the backbone names, shared by both models and coupled by ``λ/2 ‖θ_D − θ_P‖²``.
    """

    downstream: Callable[[dict[str, Tensor], Any], Tensor]
    pretext: Callable[[dict[str, Tensor], Any], Tensor]
    gauss_newton: GaussNewton | None
    backbone: list[str]


def bissl_batch_sizes(cfg: BiSSLStageConfig, world_size: int) -> tuple[int, int]:
    """Per-rank ``(upper, lower)`` BiSSL batch sizes (``ValueError`` naming the key when the
    ranks cannot share one evenly)."""
    return (
        per_rank_batch_size(cfg.upper_batch_size, world_size, "bissl.upper_batch_size"),
        per_rank_batch_size(cfg.lower_batch_size, world_size, "bissl.lower_batch_size"),
    )


def build_lambda(cfg: BiSSLStageConfig) -> float | Any:
    """λ from the config: a float, a schedule over ``T`` alternations (Sec. 5.2.1) or a learnable
    λ (Definition 5.1) whose ρ-gradient (eq. 5.6) is damped by ``lam_damping``."""
    sched = cfg.lam_schedule
    if sched == "constant":
        return cfg.lam
    if sched == "learnable":
        return LearnableLambda(init=cfg.lam, damping=cfg.lam_damping)
    kinds = {"cosine-decay": CosineDecay, "cosine-increase": CosineIncrease}
    if sched in kinds:
        return kinds[sched](cfg.lam_min, cfg.lam_max, cfg.alternations)
    return ExponentialIncrease(cfg.lam_min, cfg.lam_max, cfg.alternations, alpha=cfg.lam_alpha)


def add_lambda(
    problem: BilevelProblem,
    upper_params: dict[str, Tensor],
    upper_optimizer: torch.optim.Optimizer,
    cfg: BiSSLStageConfig,
    device: torch.device,
) -> dict[str, Tensor]:
    """Make a learnable λ's ρ an upper-level variable: on ``device``, in the upper optimiser.

    By default ρ is trained as the other upper-level parameters are (the thesis trains it with
    "the same optimizer": the optimiser's default learning rate, weight decay and momentum);
    ``lam_lr`` gives it a group of its own at that learning rate, without weight decay. Returns
    the upper parameters the trainer updates. The one place where both recipes wire λ into the
    trainer.
    """
    lam = problem.lam
    if not isinstance(lam, LearnableLambda):
        return upper_params
    lam.rho.data = lam.rho.data.to(device)
    group: dict = {"params": lam.parameters()}
    if cfg.lam_lr is not None:
        group.update(lr=cfg.lam_lr, weight_decay=0.0)
    upper_optimizer.add_param_group(group)
    return upper_params


def build_problem(
    cfg: BiSSLStageConfig,
    losses: BiSSLLosses,
    reducer: Callable[[Mapping[str, Tensor]], dict] | None = None,
    model: nn.Module | None = None,
) -> BilevelProblem:
    """The BiSSL problem: upper ``L^D(θ_P, φ_D) + L^D(θ_D, φ_D)``, lower ``L^P`` plus
    ``λ/2 ‖θ_D − θ_P‖²`` over the backbone names, λ and the IJ settings from ``cfg``.

    ``model`` is the pretext model: its norm layers resolve ``bissl.ij_subset`` and its names
    outside the backbone are the pretext head φ_P of ``bissl.variant=appendix-g``
    (:mod:`recipes.common.appendix_g`, solved over ω = (θ_P, φ_P))."""
    ij = implicit_jacobian(cfg, losses.gauss_newton, model, losses.backbone)
    upper_loss: Any = bissl_upper_loss(losses.downstream, losses.backbone)
    regularizer: Any = ProximalL2(losses.backbone)
    if cfg.variant == "appendix-g":
        if cfg.lam_schedule != "constant" or model is None:
            raise ValueError("bissl.variant=appendix-g needs bissl.lam_schedule=constant (1/λ "
                             "enters its regulariser) and the pretext model")
        known = set(losses.backbone)
        head = [n for n, _ in model.named_parameters() if n not in known]
        upper_loss, regularizer = appendix_g_parts(losses.downstream, losses.pretext,
                                                   losses.backbone, head, cfg.lam, cfg.mu_g)
        ij = dataclasses.replace(ij, solve_over="all")
    return BilevelProblem(
        upper_loss=upper_loss,
        lower_loss=losses.pretext,
        regularizer=regularizer,
        lam=build_lambda(cfg),
        ij=ij,
        reducer=reducer,
    )


def stage_schedulers(
    cfg: BiSSLStageConfig,
    upper_optimizer: torch.optim.Optimizer,
    lower_optimizer: torch.optim.Optimizer,
) -> tuple[Any, Any]:
    """``(upper, lower)`` ``LambdaLR`` schedules: linear warm-up, then cosine to
    ``final_lr_factor`` × peak over the level's ``T·N`` steps (the lower warm-up at most half)."""
    upper_total = cfg.alternations * cfg.upper_steps
    lower_total = cfg.alternations * cfg.lower_steps
    upper_warm = math.ceil(cfg.upper_warmup_fraction * upper_total)
    lower_warm = min(lower_total // 2, cfg.lower_warmup_alternations * cfg.lower_steps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR
    return (
        lr_sched(upper_optimizer, warmup_cosine(upper_total, upper_warm, cfg.final_lr_factor)),
        lr_sched(lower_optimizer, warmup_cosine(lower_total, lower_warm, cfg.final_lr_factor)),
    )


def run_bissl(
    cfg: BiSSLStageConfig,
    losses: BiSSLLosses,
    *,
    downstream: nn.Module,
    pretext: nn.Module,
    upper_optimizer: torch.optim.Optimizer,
    lower_optimizer: torch.optim.Optimizer,
    upper_data: Iterable,
    lower_data: Iterable,
    device: torch.device,
    bf16: bool = False,
    out_dir: str | Path | None = None,
    resume: bool = False,
    reducer: Callable[[Mapping[str, Tensor]], dict] | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[BiSSLTrainer, int, dict[str, Any]], Any]] = (),
) -> list[dict[str, Any]]:
    """Run Algorithm 2 in place: (θ_D, φ_D) end in ``downstream``, (θ_P, φ_P) in ``pretext``.

    ``reducer`` averages gradients and curvature products across data-parallel ranks (give each
    rank its shard of both loaders). With ``resume`` the trainer continues from
    ``out_dir/checkpoint.pt`` when it exists. ``callbacks`` run after every alternation (the
    transfer monitor, :mod:`recipes.common.transfer_monitor`). Returns the per-alternation
    metrics.
    """
    if set(losses.backbone) - {n for n, _ in pretext.named_parameters()}:
        raise ValueError("the pretext and downstream backbones must have the same parameter names")
    problem = build_problem(cfg, losses, reducer, model=pretext)
    upper_params = add_lambda(
        problem, dict(downstream.named_parameters()), upper_optimizer, cfg, device
    )
    upper_sched, lower_sched = stage_schedulers(cfg, upper_optimizer, lower_optimizer)
    trainer = BiSSLTrainer(
        problem,
        upper_params=upper_params,
        lower_params=dict(pretext.named_parameters()),
        upper_optimizer=upper_optimizer,
        lower_optimizer=lower_optimizer,
        upper_data=upper_data,
        lower_data=lower_data,
        config=BiSSLConfig(
            alternations=cfg.alternations,
            lower_steps=cfg.lower_steps,
            upper_steps=cfg.upper_steps,
            grad_clip=cfg.grad_clip,
            checkpoint_every=cfg.checkpoint_every,
            autocast="bf16" if bf16 else None,
            progress=progress,
        ),
        upper_scheduler=upper_sched,
        lower_scheduler=lower_sched,
        device=device,
        out_dir=out_dir,
        modules={"pretext": pretext, "downstream": downstream},
        callbacks=callbacks,
    )
    downstream.to(device).train()
    pretext.to(device).train()
    # The run folder's guard has compared the configuration already (and refused a change unless
    # --allow-changed-config, which it records): the trainer need not refuse again.
    return trainer.run(resume=resume, allow_changed_config=True)
