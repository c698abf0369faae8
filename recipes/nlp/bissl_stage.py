"""The GPT recipe's half of the BiSSL stage (thesis Sec. 7.1.3); the trainer wiring is
:func:`recipes.common.run_bissl`.

Upper level: the downstream model (θ_D = ``gpt.*``, φ_D = new-token rows + task head) with the loss
``L^D(θ_P, φ_D) + L^D(θ_D, φ_D)``, ``L^D`` = task loss + ν·LM loss. Lower level: the pretext model
(θ_P = ``gpt.*``, φ_P empty) with the next-token loss plus ``λ/2 ‖θ_D − θ_P‖²`` over the backbone
names. Both backbones hold only the ``V`` pretrained embedding rows, so the coupling, the
Hessian-vector products and the substitution of θ_P never involve the special-token rows.

The Hessian operator reuses one kept first-order graph per alternation, so every product in a CG
solve sees the same dropout masks (one fixed symmetric matrix).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from implicitbilevel import BilevelProblem, GaussNewton, functional_module
from recipes.common import bissl_stage as common
from recipes.common.settings import BiSSLStageConfig

from .losses import downstream_objective, next_token_loss
from .model import GPTDownstreamModel, GPTPretextModel, backbone_names
from .tasks import TaskSpec

__all__ = ["bissl_losses", "build_problem", "make_losses"]


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


def bissl_losses(
    downstream: GPTDownstreamModel, pretext: GPTPretextModel, spec: TaskSpec, nu: float
) -> common.BiSSLLosses:
    """:func:`make_losses` with the coupled ``gpt.*`` names (the same in both models)."""
    backbone = backbone_names(downstream)
    if set(backbone) != {n for n, _ in pretext.named_parameters()}:
        raise ValueError("the pretext and downstream backbones must have the same parameter names")
    return common.BiSSLLosses(*make_losses(downstream, pretext, spec, nu), backbone)


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
    return common.build_problem(settings, bissl_losses(downstream, pretext, spec, nu), reducer,
                                model=pretext)
