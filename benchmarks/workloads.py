"""Models, batches and losses the benchmarks run on.

Two kinds of workload:

- :class:`LossWorkload`: one scalar loss ``fn(params, *args)`` at a parameter dict, for the HVP and
  solver measurements (ResNet-18, a small GPT).
- :class:`BiSSLWorkload`: a BiSSL bilevel problem (downstream model θ_D, φ_D at the upper level,
  pretext model θ_P, φ_P at the lower level, coupled by ``½‖θ_D − θ_P‖²`` over the backbone), for
  the upper-step, peer, memory and end-to-end measurements.

All models run in train mode (BatchNorm uses batch statistics). Every loss goes through
:func:`implicitbilevel.functional_module` with ``freeze_buffers=True``, so the running statistics
are never mutated and torch.func transforms (TorchOpt) accept the BatchNorm layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicitbilevel import (
    CG,
    BilevelProblem,
    ImplicitJacobian,
    LinearSolver,
    ProximalL2,
    functional_module,
)
from implicitbilevel.bissl import bissl_upper_loss
from implicitbilevel.tree import Params

from .harness import seeded

__all__ = [
    "BiSSLWorkload",
    "LossWorkload",
    "bissl_problem",
    "bissl_workload",
    "classification_loss",
    "cnn",
    "finetune_step",
    "gpt_workload",
    "mlp_bissl_workload",
    "resnet_workload",
]


@dataclass
class LossWorkload:
    """A scalar loss at a point: ``fn(params, *args)``.

    Attributes:
        name: a label for the tables.
        fn: the loss, a pure function of the parameter dict.
        params: the point (detached tensors).
        args: the batch.
        note: how the workload was built (sizes, what differs from the paper setting).
    """

    name: str
    fn: Callable[..., Tensor]
    params: Params
    args: tuple
    note: str = ""


@dataclass
class BiSSLWorkload:
    """A BiSSL upper step's inputs: both levels' parameters, batches and losses.

    Attributes:
        name: a label for the tables.
        downstream_loss: ``L^D(params, batch)`` over the downstream model's names.
        lower_loss: ``L^P(params, batch)`` over the pretext model's names.
        upper: θ_D and φ_D (detached tensors).
        lower: θ_P and φ_P (detached tensors).
        backbone: the coupled names (θ).
        upper_batch: the downstream batch.
        lower_batch: the pretext batch the Hessian is taken on.
        mu: ``λ + λ_damp`` of the implicit-Jacobian system ``(I + H/μ) u = v``.
        lam: λ (the rest of μ is damping).
        modules: the ``nn.Module`` objects (downstream, pretext), e.g. for a fine-tuning step.
        note: how the workload was built.
    """

    name: str
    downstream_loss: Callable[[Params, Any], Tensor]
    lower_loss: Callable[[Params, Any], Tensor]
    upper: Params
    lower: Params
    backbone: list[str]
    upper_batch: Any
    lower_batch: Any
    mu: float
    lam: float = 1.0
    modules: dict[str, nn.Module] = field(default_factory=dict)
    note: str = ""

    def upper_loss(self) -> Callable[[Params, Params, Any], Tensor]:
        """The BiSSL upper objective ``L^D(θ_P, φ_D) + L^D(θ_D, φ_D)``."""
        return bissl_upper_loss(self.downstream_loss, self.backbone)

    def problem(self, ij: LinearSolver | None = None, **kwargs: Any) -> BilevelProblem:
        """A :class:`BilevelProblem` for this workload (CG with ``N_c = 5`` by default)."""
        return bissl_problem(self.downstream_loss, self.lower_loss, self.backbone, self.mu,
                             self.lam, ij, **kwargs)


def bissl_problem(downstream_loss: Callable[[Params, Any], Tensor],
                  lower_loss: Callable[[Params, Any], Tensor], backbone: list[str], mu: float,
                  lam: float, ij: LinearSolver | None = None, **options: Any) -> BilevelProblem:
    """BiSSL's problem as the recipes build it, at ``μ = λ + λ_damp``.

    The upper loss ``L^D(θ_P, φ_D) + L^D(θ_D, φ_D)``, the proximal coupling over ``backbone``,
    CG with ``N_c = 5`` unless ``ij`` is given, and breakdowns ignored (``on_breakdown`` may be
    overridden) so that no measurement stops; ``options`` are further fields of the
    :class:`~implicitbilevel.ImplicitJacobian`.
    """
    options.setdefault("on_breakdown", "ignore")
    return BilevelProblem(
        bissl_upper_loss(downstream_loss, backbone), lower_loss, lam=lam,
        ij=ImplicitJacobian(CG(max_iter=5) if ij is None else ij, damping=mu - lam, **options),
        regularizer=ProximalL2(backbone),
    )


def finetune_step(loss: Callable[[Params, Any], Tensor], params: Params,
                  batch: Any) -> Callable[[], None]:
    """One fine-tuning step of ``loss`` from ``params`` on ``batch``: forward, backward and an SGD
    step with momentum, on copies of ``params`` (the baseline of every cost and memory ratio)."""
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    opt = torch.optim.SGD(list(leaves.values()), lr=1e-4, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss(leaves, batch).backward()
        opt.step()

    return step


class TinyCNN(nn.Module):
    """A two-block CNN with BatchNorm and a linear head ``fc`` (for fast smoke tests)."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``x`` (N, 3, H, W)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def cnn(arch: str, num_classes: int) -> nn.Module:
    """A random-init ``resnet18`` (torchvision) or ``tiny-cnn`` classifier."""
    if arch == "resnet18":
        from torchvision.models import resnet18

        return resnet18(weights=None, num_classes=num_classes)
    if arch == "tiny-cnn":
        return TinyCNN(num_classes)
    raise ValueError(f"unknown architecture {arch!r}")


def _detached(module: nn.Module) -> Params:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def classification_loss(module: nn.Module) -> Callable[[Params, Any], Tensor]:
    """The cross-entropy of ``module`` as a function of its parameters (buffers frozen)."""
    call = functional_module(module, freeze_buffers=True)

    def loss(params: Params, batch: Any) -> Tensor:
        images, labels = batch
        return F.cross_entropy(call(params, images), labels)

    loss.__qualname__ = f"{type(module).__name__}.cross_entropy"
    return loss


def bissl_workload(
    arch: str = "resnet18", batch: int = 64, image: int = 32, mu: float = 1000.0,
    device: str = "cpu", seed: int = 0, pretext_classes: int = 4, classes: int = 10,
) -> BiSSLWorkload:
    """A BiSSL upper-step workload on a CNN with BatchNorm (ResNet-18 by default), random init.

    The pretext model shares the downstream backbone up to a perturbation of 1e-3 (so the coupling
    term is not zero) and has its own ``pretext_classes``-way head; both batches are random images
    with random labels. ``mu`` is ``λ + λ_damp`` with λ = 1: at a random initialisation
    ``I + H/μ`` is not positive definite for small μ (benchmarks/README.md): default 1000.
    """
    gen = seeded(seed)
    down = cnn(arch, classes).to(device).train()
    pretext = cnn(arch, pretext_classes).to(device).train()
    backbone = [n for n, _ in down.named_parameters() if not n.startswith("fc.")]
    with torch.no_grad():
        pretext_params = dict(pretext.named_parameters())
        for n, p in down.named_parameters():
            if n in backbone:
                noise = torch.randn(p.shape, generator=gen).to(device)
                pretext_params[n].copy_(p + 1e-3 * noise)

    def batch_of(n_classes: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(batch, 3, image, image, generator=gen).to(device)
        y = torch.randint(0, n_classes, (batch,), generator=gen).to(device)
        return x, y

    return BiSSLWorkload(
        name=f"{arch} (batch {batch}, {image}x{image})",
        downstream_loss=classification_loss(down),
        lower_loss=classification_loss(pretext),
        upper=_detached(down), lower=_detached(pretext), backbone=backbone,
        upper_batch=batch_of(classes), lower_batch=batch_of(pretext_classes), mu=mu,
        modules={"downstream": down, "pretext": pretext},
        note=(f"{arch} random init, train-mode BatchNorm, batch {batch} of "
              f"{image}x{image} random images; mu = lambda + lambda_damp = {mu:g} (lambda = 1)"),
    )


def resnet_workload(batch: int = 64, image: int = 32, device: str = "cpu", seed: int = 0,
                    arch: str = "resnet18") -> LossWorkload:
    """The cross-entropy loss of a (random-init, train-mode) ResNet-18 on one random batch."""
    gen = seeded(seed)
    model = cnn(arch, 10).to(device).train()
    x = torch.randn(batch, 3, image, image, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    return LossWorkload(
        name=f"{arch} (batch {batch}, {image}x{image})", fn=classification_loss(model),
        params=_detached(model), args=((x, y),),
        note=f"train-mode BatchNorm, {sum(p.numel() for p in model.parameters())} parameters",
    )


def gpt_workload(batch: int = 16, context: int = 64, layers: int = 2, width: int = 64,
                 vocab: int = 1000, device: str = "cpu", seed: int = 0) -> LossWorkload:
    """The LM loss of a small ``OpenAIGPTLMHeadModel`` (eager attention, dropout off)."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    gen = seeded(seed)
    config = OpenAIGPTConfig(
        vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"
    model = OpenAIGPTLMHeadModel(config).to(device).train()
    # Not functional_module: its buffer freezing passes None for every integer buffer, which
    # drops GPT's ``position_ids`` (TypeError inside every HVP). GPT mutates no buffer, so the
    # module's own buffers are used as they are.
    def call(params: Params, **kwargs: Any) -> Any:
        return torch.func.functional_call(model, params, (), kwargs)

    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)

    def lm_loss(params: Params, tokens: Tensor) -> Tensor:
        return call(params, input_ids=tokens, labels=tokens).loss

    return LossWorkload(
        name=f"GPT ({layers} layers, {width} wide, batch {batch}x{context})", fn=lm_loss,
        params=_detached(model), args=(ids,),
        note=(f"transformers OpenAIGPTLMHeadModel, vocab {vocab}, ctx {context}, eager attention, "
              "dropout 0 (reproducible HVPs), tied embeddings; loss via torch.func.functional_call "
              "(implicitbilevel.functional_module fails on GPT's integer position_ids buffer)"),
    )


class _MLP(nn.Module):
    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(inputs, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def mlp_bissl_workload(inputs: int = 6, hidden: int = 8, samples: int = 64, lam: float = 1.0,
                       damping: float = 0.0, lower_steps: int = 300, seed: int = 0,
                       dtype: torch.dtype = torch.float64) -> BiSSLWorkload:
    """A small tanh-MLP BiSSL problem whose backbone Hessian fits a dense matrix (float64).

    The lower level is trained (``lower_steps`` of Adam on ``ℓ + λ·½‖θ_D − θ_P‖²``) towards a
    stationary point, so ``I + H/μ`` is positive definite there and the iterative solvers converge
    to the dense solution.
    """
    gen = seeded(seed)
    down = _MLP(inputs, hidden, 3).to(dtype)
    pretext = _MLP(inputs, hidden, 2).to(dtype)
    backbone = [n for n, _ in down.named_parameters() if not n.startswith("fc.")]
    with torch.no_grad():
        pretext.l1.load_state_dict(down.l1.state_dict())
        pretext.l2.load_state_dict(down.l2.state_dict())

    def data(n_out: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(samples, inputs, generator=gen, dtype=dtype)
        w = torch.randn(inputs, n_out, generator=gen, dtype=dtype)
        return x, (torch.tanh(x @ w) * 2).argmax(dim=1)

    upper_batch, lower_batch = data(3), data(2)
    down_loss, low_loss = classification_loss(down), classification_loss(pretext)
    upper, lower = _detached(down), _detached(pretext)
    leaves = {n: p.clone().requires_grad_(True) for n, p in lower.items()}
    opt = torch.optim.Adam(list(leaves.values()), lr=0.02)
    for _ in range(lower_steps):
        opt.zero_grad()
        reg = sum(0.5 * (leaves[n] - upper[n]).square().sum() for n in backbone)
        (low_loss(leaves, lower_batch) + lam * reg).backward()
        opt.step()
    lower = {n: p.detach().clone() for n, p in leaves.items()}
    return BiSSLWorkload(
        name=f"MLP ({inputs}-{hidden}-{hidden}, tanh, float64)", downstream_loss=down_loss,
        lower_loss=low_loss, upper=upper, lower=lower, backbone=backbone,
        upper_batch=upper_batch, lower_batch=lower_batch, mu=lam + damping, lam=lam,
        modules={"downstream": down, "pretext": pretext},
        note=(f"{sum(upper[n].numel() for n in backbone)} backbone parameters; lower level "
              f"trained {lower_steps} Adam steps; lambda = {lam:g}, lambda_damp = {damping:g}"),
    )
