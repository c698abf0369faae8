"""LARS: layer-wise adaptive rate scaling (You, Gitman and Ginsburg, 2017), as used by SimCLR
pretraining and the BiSSL lower level (thesis Sec. 6.1.2: trust coefficient 0.001, momentum 0.9,
weight decay 1e-6).

For every adapted parameter tensor ``w`` with gradient ``g`` the step is

.. math::

    d &= g + \\beta w, \\qquad
    r = \\eta \\frac{\\lVert w \\rVert}{\\lVert g \\rVert + \\beta \\lVert w \\rVert}
        \\quad(\\texttt{trust\\_denominator="paper"}), \\\\
    m &\\leftarrow \\mu m + r\\, d, \\qquad w \\leftarrow w - \\gamma m,

with ``r = 1`` where ``‖w‖`` or ``‖g‖`` is zero. ``trust_denominator="update"`` uses
``‖g + βw‖`` instead of ``‖g‖ + β‖w‖``, the variant of the SimCLR/VICReg/BiSSL reference code.
Biases and normalisation parameters (every tensor with at most one dimension) are neither
decayed nor adapted: they get plain SGD with momentum. :func:`lars_param_groups` builds those
groups; a group opts out with ``"lars_exclude": True``.

Why not ``timm.optim.Lars``: it implements the same "paper" rule, but it would make timm (and
``huggingface_hub``) a dependency of this library, whose only requirement is torch, and it ties
exclusion to ``weight_decay == 0`` rather than to a named flag. The tests check this optimiser
against the formula above and, where timm is installed, against timm step by step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["LARS", "lars_param_groups"]


def lars_param_groups(
    named_params: nn.Module | Iterable[tuple[str, Tensor]], weight_decay: float = 1e-6
) -> list[dict[str, Any]]:
    """Two parameter groups: tensors with ``ndim > 1`` (adapted, decayed) and the rest (biases,
    BatchNorm/LayerNorm weights: ``lars_exclude=True``, no weight decay). Frozen parameters
    (``requires_grad=False``) are left out.

    Example:
        >>> import torch
        >>> from implicitbilevel.bissl.lars import LARS, lars_param_groups
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        >>> groups = lars_param_groups(net)
        >>> [(len(g["params"]), g["weight_decay"], g["lars_exclude"]) for g in groups]
        [(1, 1e-06, False), (3, 0.0, True)]
    """
    items = named_params.named_parameters() if isinstance(named_params, nn.Module) else named_params
    adapted, excluded = [], []
    for _, p in items:
        if p.requires_grad:
            (adapted if p.ndim > 1 else excluded).append(p)
    groups = []
    if adapted:
        groups.append({"params": adapted, "weight_decay": weight_decay, "lars_exclude": False})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
    return groups


class LARS(Optimizer):
    """LARS with momentum (see the module docstring for the update rule).

    Args:
        params: parameters or parameter groups; pass :func:`lars_param_groups` to exclude biases
            and normalisation parameters. A group may set ``lars_exclude``.
        lr: base learning rate ``γ``.
        momentum: ``μ`` (0.9 in the thesis).
        weight_decay: ``β`` (1e-6 in the thesis); not applied to excluded groups.
        trust_coefficient: ``η`` (0.001 in the thesis).
        trust_denominator: ``"paper"`` (``‖g‖ + β‖w‖``) or ``"update"`` (``‖g + βw‖``).
        eps: added to the denominator of the trust ratio.

    Example:
        >>> import torch
        >>> from implicitbilevel.bissl.lars import LARS, lars_param_groups
        >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))   # ||w|| = 5
        >>> opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.1)
        >>> w.grad = torch.tensor([[0.0, 10.0]], dtype=torch.float64)                 # ||g|| = 10
        >>> _ = opt.step()                                  # w - 0.1 * 5 / 10 * g
        >>> [round(v, 6) for v in w.detach().flatten().tolist()]
        [3.0, 3.5]
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        trust_denominator: Literal["paper", "update"] = "paper",
        eps: float = 1e-8,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if trust_denominator not in ("paper", "update"):
            raise ValueError(
                f"trust_denominator must be 'paper' or 'update', got {trust_denominator!r}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "trust_denominator": trust_denominator,
            "eps": eps,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Perform one LARS step; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars_exclude"]:
                updates = list(grads)
            else:
                updates = self._adapted(params, grads, group)
            self._momentum_step(params, updates, group)
        return loss

    @staticmethod
    def _adapted(params: list[Tensor], grads: list[Tensor], group: dict[str, Any]) -> list[Tensor]:
        wd, eta, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
        updates = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else list(grads)
        w_norms = torch.stack(torch._foreach_norm(params))
        if group["trust_denominator"] == "paper":
            g_norms = torch.stack(torch._foreach_norm(grads))
            denom = g_norms + wd * w_norms
        else:
            g_norms = torch.stack(torch._foreach_norm(updates))
            denom = g_norms
        ratio = torch.where(
            (w_norms > 0) & (g_norms > 0), eta * w_norms / (denom + eps), torch.ones_like(w_norms)
        )
        return torch._foreach_mul(updates, list(ratio.unbind()))

    def _momentum_step(
        self, params: list[Tensor], updates: list[Tensor], group: dict[str, Any]
    ) -> None:
        mu = group["momentum"]
        if mu == 0:
            torch._foreach_add_(params, updates, alpha=-group["lr"])
            return
        bufs = []
        for p, u in zip(params, updates, strict=True):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = u.clone()
            else:
                state["momentum_buffer"].mul_(mu).add_(u)
            bufs.append(state["momentum_buffer"])
        torch._foreach_add_(params, bufs, alpha=-group["lr"])
