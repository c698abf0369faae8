"""The BiSSL loop's settings (:class:`BiSSLConfig`) and what a resume compares.

A checkpoint stores the settings that change what a run computes (:func:`run_settings`); a resume
under other settings is refused, naming every change, unless the caller allows it
(:func:`resume_changes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..lam import LearnableLambda
from .run_state import config_changes

__all__ = ["BiSSLConfig", "check_trainer_inputs", "resume_changes", "run_settings"]

#: The loop settings that change what a run computes (progress bars and logging do not).
RESULT_SETTINGS = ("alternations", "lower_steps", "upper_steps", "grad_clip", "autocast")


@dataclass
class BiSSLConfig:
    """The loop's hyperparameters (thesis defaults, Sec. 6.1.3).

    Attributes:
        alternations: ``T``.
        lower_steps: ``N_L``.
        upper_steps: ``N_U``.
        grad_clip: clip each level's gradient norm to this (``None``: no clipping).
        checkpoint_every: alternations between checkpoints (with ``out_dir``).
        autocast: ``"bf16"`` runs the forward passes of both levels (and the Hessian's) under
            ``torch.autocast``; gradients, solver arithmetic and weights stay in fp32.
        progress: show a progress bar (needs ``tqdm``).
        measure_residual: log ``ij_relative_residual``, the true ``‖v − A u‖/‖v‖`` of the last
            upper step's solve in each alternation (one more curvature product per alternation).
        measure_exact_residual: log ``ij_exact_relative_residual``, the same on the exact-Hessian
            system (one more product when the curvature is not the exact Hessian); see
            ``implicitbilevel.bissl.diagnostics``.

    Example:
        >>> from implicitbilevel.bissl import BiSSLConfig
        >>> cfg = BiSSLConfig()                             # the thesis defaults (Sec. 6.1.3)
        >>> cfg.alternations, cfg.lower_steps, cfg.upper_steps
        (500, 20, 8)
        >>> try:
        ...     BiSSLConfig(lower_steps=0)
        ... except ValueError as err:
        ...     print(err)
        BiSSLConfig.lower_steps must be an int >= 1, got 0
    """

    alternations: int = 500
    lower_steps: int = 20
    upper_steps: int = 8
    grad_clip: float | None = 10.0
    checkpoint_every: int = 1
    autocast: str | None = None
    progress: bool = True
    measure_residual: bool = True
    measure_exact_residual: bool = True

    def __post_init__(self) -> None:
        for name in ("alternations", "lower_steps", "upper_steps", "checkpoint_every"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"BiSSLConfig.{name} must be an int >= 1, got {value!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"BiSSLConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"BiSSLConfig.autocast must be None or 'bf16', got {self.autocast!r}")


def check_trainer_inputs(problem: Any, upper_params: Mapping[str, Tensor],
                         lower_params: Mapping[str, Tensor],
                         upper_optimizer: torch.optim.Optimizer) -> None:
    """Refuse a trainer whose parameters do not fit its problem: uncoupled names, the problem's
    own parameters (``problem.params``) passed as upper parameters, or missing from the upper
    optimiser."""
    problem.regularizer.coupled_names(upper_params, lower_params)
    own = problem.params
    clash = sorted(set(own) & set(upper_params))
    if clash:
        raise ValueError(f"upper_params must not contain the problem's own parameters {clash}"
                         " (problem.params); the trainer adds them")
    optimised = {id(p) for g in upper_optimizer.param_groups for p in g["params"]}
    for name, p in own.items():
        if id(p) not in optimised:
            raise ValueError(
                f"the problem parameter {name!r} (problem.params) is not in the upper "
                "optimiser; add it, e.g. upper_optimizer.add_param_group("
                "{'params': list(problem.params.values())})"
            )


def run_settings(config: BiSSLConfig, problem: Any) -> dict[str, Any]:
    """What a resume must not change silently: the loop's settings and the problem's (λ,
    ``λ_damp``, the solver, the system solved and its curvature)."""
    cfg, ij = asdict(config), problem.ij
    return {**{k: cfg[k] for k in RESULT_SETTINGS}, "lam": _describe_lam(problem.lam),
            "damping": ij.damping, "solver": repr(problem.solver),
            "solve_over": ij.solve_over, "head_damping": ij.head_damping,
            "curvature": ij.curvature if isinstance(ij.curvature, str) else "gauss-newton"}


def resume_changes(saved: dict[str, Any] | None, current: dict[str, Any],
                   out_dir: Path | None, *, allow: bool) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between a checkpoint (``saved``) and this run (``current``).

    Raises:
        ValueError: naming every change, when there are changes and ``allow`` is false.
    """
    changes = config_changes(saved, current)
    if changes and not allow:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise ValueError(f"the checkpoint in {out_dir} was made under other settings "
                         f"({listed}); resume with the settings it was made with, or "
                         "pass allow_changed_config=True to continue under the new ones")
    return changes


def _describe_lam(lam: Any) -> str:
    """λ as a resume compares it: a learnable λ's starting value does not matter once ρ is
    restored from the checkpoint."""
    if isinstance(lam, LearnableLambda):
        return f"LearnableLambda(damping={lam.damping!r})"
    return repr(lam)
