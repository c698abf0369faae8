"""Pretrained networks for the robust implicit-Jacobian benchmark, built by the recipes' own stages.

The implicit-Jacobian (IJ) system BiSSL really meets is ``(I + H/μ) u = v`` at a *pretrained*
pretext model, so the two networks here are the recipes' small models after their own stages,
run through the recipes' shared stage layer (:class:`recipes.common.pipeline.Recipe`):

- **vision** (``recipes/vision_bissl.py``, ``recipes/configs/vision_embedded.yaml``): the small
  ResNet after the ``pretext`` stage (SimCLR with LARS on the embedded digits) and the
  ``head-warmup`` stage (linear head on the frozen backbone);
- **GPT** (``recipes/gpt_glue_bissl.py``, ``recipes/configs/gpt_glue_embedded.yaml``): the small
  GPT after the ``pretext`` stage (next-token pretraining on the embedded corpus) and the
  ``head-warmup`` stage on one embedded GLUE task.

The stages' files are cached under ``runs/robust_ij/`` (git-ignored), keyed by the number of
pretraining epochs/steps, so later runs only load them. The BiSSL losses are the recipes' own
(``Recipe.bissl_losses``: the downstream loss, the pretext loss, its Gauss–Newton split — NT-Xent
logits + cross-entropy, GPT logits + next-token loss — and the coupled backbone names); the
problem couples the backbones by the proximal regulariser, as the recipes' BiSSL stage does.

Departures from the recipes' BiSSL stage, all for reproducible measurements: dropout is switched
off in the GPT copies the systems are built on (so that the kept-graph operator, its float64
reference and the peers all see one fixed matrix); the float64 copy of the vision network (for
the converged reference only) computes NT-Xent without the recipe's float32 cast; and the peers
get the vision losses with BatchNorm on copies of its running statistics (TorchOpt's
``torch.func`` transforms refuse the in-place update; the values are the same).

:func:`benchmarks.toy_networks.toy_networks` builds the same losses on tiny random networks and
random data (for tests).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicitbilevel import GaussNewton, functional_module

from .harness import ROOT

__all__ = ["LossBuilder", "Network", "gpt_network", "no_dropout", "vision_losses", "vision_network"]

DEFAULT_CACHE = ROOT / "runs" / "robust_ij"

LossBuilder = Callable[[nn.Module, nn.Module, torch.dtype, bool],
                       tuple[Callable, Callable, GaussNewton]]


@dataclass
class Network:
    """A BiSSL problem's ingredients on one network: both models, their losses and the batches.

    Attributes:
        name: a label for the tables.
        downstream: the downstream model (θ_D = backbone, φ_D = head).
        pretext: the pretext model (θ_P = backbone, φ_P = projector or nothing).
        losses: ``(downstream, pretext, dtype, frozen) -> (downstream_loss, pretext_loss,
            gauss_newton)``, the recipe's loss functions of parameter dicts for these modules;
            with ``frozen`` the same functions on copies of the BatchNorm running statistics
            (for the peers, whose ``torch.func`` transforms forbid the in-place update).
        backbone: the coupled names (θ).
        lower_batch: the pretext batch the curvature is taken on (fixed over the alternation).
        upper_batches: the downstream batches of the ``N_U`` upper steps.
        note: how the network was obtained.
        info: pretraining details (epochs/steps, losses, seconds, cache path).
    """

    name: str
    downstream: nn.Module
    pretext: nn.Module
    losses: LossBuilder
    backbone: list[str]
    lower_batch: Any
    upper_batches: list[Any]
    note: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rebuild()

    def rebuild(self) -> None:
        """(Re)build the loss functions and the parameter dicts from the modules."""
        dtype = next(self.pretext.parameters()).dtype
        self.downstream_loss, self.pretext_loss, self.gauss_newton = self.losses(
            self.downstream, self.pretext, dtype, False)
        self.peer_downstream_loss, self.peer_pretext_loss, _ = self.losses(
            self.downstream, self.pretext, dtype, True)
        self.upper = {n: p.detach() for n, p in self.downstream.named_parameters()}
        self.lower = {n: p.detach() for n, p in self.pretext.named_parameters()}

    @property
    def unknowns(self) -> int:
        """Number of unknowns of the IJ system (backbone parameters)."""
        return sum(self.lower[n].numel() for n in self.backbone)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Network:
        """A copy on ``device`` and/or in ``dtype`` (floating batches converted too)."""
        def move(x: Any) -> Any:
            if isinstance(x, Tensor):
                kw: dict[str, Any] = {"device": device}
                if dtype is not None and x.is_floating_point():
                    kw["dtype"] = dtype
                return x.to(**kw)
            if isinstance(x, (tuple, list)):
                return type(x)(move(t) for t in x)
            return x

        down = copy.deepcopy(self.downstream).to(device=device, dtype=dtype)
        pre = copy.deepcopy(self.pretext).to(device=device, dtype=dtype)
        return replace(self, downstream=down, pretext=pre, lower_batch=move(self.lower_batch),
                       upper_batches=[move(b) for b in self.upper_batches])


def no_dropout(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return module


def _take_batches(loader: Any, count: int, size: int) -> list[Any]:
    """The first ``count`` full batches of ``loader`` (re-iterating it, reshuffled, as needed)."""
    out: list[Any] = []
    for _ in range(count + 1):
        for batch in loader:
            first = batch[0] if isinstance(batch, (tuple, list)) else batch
            if first.shape[0] == size:
                out.append(batch)
            if len(out) == count:
                return out
    raise ValueError(f"the loader yields fewer than {count} full batches of {size}")


def _batches(recipe: Any, target: str, lower_batch: int, upper_batch: int, upper_steps: int,
             seed: int) -> tuple[Any, list[Any]]:
    """One lower batch from the recipe's pretext loader and ``upper_steps`` upper batches from
    its training loader for ``target``."""
    torch.manual_seed(seed)
    lower = _take_batches(recipe.pretext_loader(lower_batch, seed, None), 1, lower_batch)[0]
    uppers = _take_batches(recipe.train_loader(target, upper_batch, seed), upper_steps,
                           upper_batch)
    return lower, uppers


def _recipe(kind: str, overrides: list[str]) -> Any:
    """The recipe object with its embedded default config and ``overrides``."""
    from recipes.common import load_config

    if kind == "vision":
        from recipes.vision_bissl import DEFAULT_CONFIG
        from recipes.vision_bissl import VisionRecipe as cls
    else:
        from recipes.gpt_glue_bissl import DEFAULT_CONFIG
        from recipes.gpt_glue_bissl import GPTRecipe as cls
    cfg = load_config(str(DEFAULT_CONFIG), cls.config_class, overrides)
    threads = torch.get_num_threads()
    recipe = cls(cfg)
    torch.set_num_threads(threads)
    return recipe


def _prepared(recipe: Any, target: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the recipe's ``pretext`` and ``head-warmup`` stages unless their files exist."""
    from recipes.common import load_checkpoint

    info: dict[str, Any] = {"cache": str(recipe.out)}
    start = time.perf_counter()
    if not recipe.path(None, "pretext.pt").exists():
        log(f"  {recipe.name}: running the recipe's pretext stage ...")
        recipe.stage_pretext()
        info["pretext_seconds"] = time.perf_counter() - start
    if not recipe.path(target, "warmup.pt").exists():
        log(f"  {recipe.name}: running the recipe's head-warmup stage ({target}) ...")
        recipe.stage_head_warmup(target)
    info["prepare_seconds"] = time.perf_counter() - start
    losses = load_checkpoint(recipe.path(None, "pretext.pt")).get("losses", [])
    info["pretext_loss_first_last"] = [losses[0], losses[-1]] if losses else None
    return info


def _models(recipe: Any, target: str) -> tuple[nn.Module, nn.Module]:
    """The pretrained pretext model and the downstream model with the warmed-up head, as the
    recipe's BiSSL stage loads them."""
    from recipes.common import load_checkpoint

    pretext = recipe.load_pretext(recipe.path(None, "pretext.pt"))
    downstream = recipe.downstream_from(pretext, target)
    downstream.load_state_dict(load_checkpoint(recipe.path(target, "warmup.pt"))["downstream"])
    return pretext.to(recipe.device).train(), downstream.to(recipe.device).train()


# -- vision: SimCLR on the embedded digits -------------------------------------------------------


def _nt_xent_logits_any_dtype(z1: Tensor, z2: Tensor, tau: float) -> Tensor:
    """``recipes.vision.losses.nt_xent_logits`` without its float32 cast (for float64 copies)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / tau
    return logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -torch.inf)


def vision_losses(temperature: float) -> LossBuilder:
    """The vision recipe's BiSSL losses (``recipes.vision.bissl_stage.bissl_losses``).

    ``frozen``: the same losses with BatchNorm on copies of its running statistics
    (``functional_module(freeze_buffers=True)``; train-mode outputs are identical). float64: the
    same losses with NT-Xent and the cross-entropy kept in float64 (the recipe casts to float32).
    """
    from recipes.vision.bissl_stage import bissl_losses
    from recipes.vision.losses import nt_xent_logits, nt_xent_targets

    def build(downstream: nn.Module, pretext: nn.Module, dtype: torch.dtype,
              frozen: bool) -> tuple[Callable, Callable, GaussNewton]:
        wide = dtype == torch.float64
        if not (frozen or wide):
            losses = bissl_losses(pretext, downstream, temperature)  # type: ignore[arg-type]
            return losses.downstream, losses.pretext, losses.gauss_newton
        freeze = True if frozen else None
        pre_fn = functional_module(pretext, freeze_buffers=freeze)
        down_fn = functional_module(downstream, freeze_buffers=freeze)
        logits_of = _nt_xent_logits_any_dtype if wide else nt_xent_logits

        def pretext_logits(params: dict, batch: Any) -> Tensor:
            v1, v2 = batch
            return logits_of(pre_fn(params, v1), pre_fn(params, v2), temperature)

        def logits_loss(logits: Tensor, batch: Any) -> Tensor:
            return F.cross_entropy(logits, nt_xent_targets(logits))

        def pretext_loss(params: dict, batch: Any) -> Tensor:
            return logits_loss(pretext_logits(params, batch), batch)

        def downstream_loss(params: dict, batch: Any) -> Tensor:
            x, y = batch
            out = down_fn(params, x)
            return F.cross_entropy(out if wide else out.float(), y)

        return downstream_loss, pretext_loss, GaussNewton(pretext_logits, logits_loss)

    return build


def vision_network(
    *, epochs: int = 30, lower_batch: int = 64, upper_batch: int = 64, upper_steps: int = 8,
    device: str = "cpu", cache: str | os.PathLike = DEFAULT_CACHE, seed: int = 0,
    log: Callable[[str], None] = print,
) -> Network:
    """The vision recipe's small ResNet after its SimCLR ``pretext`` and ``head-warmup`` stages.

    The stages run once (``epochs`` SimCLR epochs; the embedded config's default is 30) in
    ``cache/vision-e<epochs>`` and are loaded afterwards. Lower batch: one pair of augmented views
    from the recipe's pretext loader; upper batches: the first ``upper_steps`` full batches of its
    training loader.
    """
    out = Path(cache) / f"vision-e{epochs}"
    recipe = _recipe("vision", [
        f"pretext.epochs={epochs}", "pretext.baseline_extra_epochs=0", f"run.out_dir={out}",
        "run.progress=false", f"run.device={device}", f"run.seed={seed}", "run.threads=0",
    ])
    target = recipe.targets[0]
    info = {"pretext_epochs": epochs, **_prepared(recipe, target, log)}
    pretext, downstream = _models(recipe, target)
    lower, uppers = _batches(recipe, target, lower_batch, upper_batch, upper_steps, seed)

    def move(batch: Any) -> tuple:
        return tuple(t.to(device) for t in batch)

    cfg = recipe.cfg
    m = cfg.model
    first_last = info["pretext_loss_first_last"]
    return Network(
        name=f"vision: {m.backbone} (width {m.width}), SimCLR {epochs} epochs",
        downstream=downstream, pretext=pretext,
        losses=vision_losses(cfg.pretext.temperature),
        backbone=[n for n, _ in downstream.named_parameters() if n.startswith("backbone.")],
        lower_batch=move(lower), upper_batches=[move(b) for b in uppers],
        note=(f"recipe vision_embedded.yaml: {m.backbone} width {m.width}, "
              f"{cfg.data.image_size}x{cfg.data.image_size} digits; pretext stage: SimCLR "
              f"{epochs} epochs" + (f" (NT-Xent {first_last[0]:.3f} -> {first_last[1]:.3f})"
                                    if first_last else "")
              + f"; head-warmup stage {cfg.warmup.epochs:g} epochs; lower batch {lower_batch} "
              f"image pairs, upper batches of {upper_batch}"),
        info=info,
    )


# -- GPT: next-token pretraining on the embedded corpus ------------------------------------------


def gpt_losses(recipe: Any, target: str) -> LossBuilder:
    """The GPT recipe's BiSSL losses (``GPTRecipe.bissl_losses``), in any dtype (the GPT has no
    running statistics, so ``frozen`` changes nothing)."""
    def build(downstream: nn.Module, pretext: nn.Module, dtype: torch.dtype,
              frozen: bool) -> tuple[Callable, Callable, GaussNewton]:
        losses = recipe.bissl_losses(pretext, downstream, target)
        return losses.downstream, losses.pretext, losses.gauss_newton

    return build


def gpt_network(
    *, steps: int = 150, task: str = "sst2", lower_batch: int = 16, upper_batch: int = 32,
    upper_steps: int = 8, device: str = "cpu", cache: str | os.PathLike = DEFAULT_CACHE,
    seed: int = 0, warmup_lr: float = 3e-3, warmup_weight_decay: float = 1e-2,
    log: Callable[[str], None] = print,
) -> Network:
    """The GPT recipe's small GPT after its ``pretext`` stage (``steps`` next-token steps, the
    embedded config's 150) and its ``head-warmup`` stage on the embedded ``task``.

    The head warm-up runs at the config grid's first (lr, wd) (the recipe would take Only-FT's
    choice, which needs the whole Only-FT search). Cached in ``cache/gpt-s<steps>``.
    """
    out = Path(cache) / f"gpt-s{steps}"
    flush = torch.set_flush_denormal(True)  # as the recipe: denormals stall the CPU GPT
    try:
        recipe = _recipe("gpt", [
            f"pretrain.steps={steps}", f"data.tasks=[{task}]", f"warmup.lr={warmup_lr}",
            f"warmup.weight_decay={warmup_weight_decay}", f"run.out_dir={out}",
            "run.progress=false", f"run.device={device}", f"run.seed={seed}", "run.threads=0",
        ])
        info = {"pretrain_steps": steps, "task": task, **_prepared(recipe, task, log)}
        pretext, downstream = _models(recipe, task)
        pretext, downstream = no_dropout(pretext), no_dropout(downstream)
        lower, uppers = _batches(recipe, task, lower_batch, upper_batch, upper_steps, seed)
    finally:
        torch.set_flush_denormal(flush)
    m = recipe.cfg.model
    n_params = sum(p.numel() for p in pretext.parameters())
    first_last = info["pretext_loss_first_last"]
    return Network(
        name=f"GPT: {m.layers} layers, {m.width} wide, pretrained {steps} steps",
        downstream=downstream, pretext=pretext, losses=gpt_losses(recipe, task),
        backbone=[n for n, _ in downstream.named_parameters() if n.startswith("gpt.")],
        lower_batch=lower.to(device),
        upper_batches=[tuple(t.to(device) for t in b) for b in uppers],
        note=(f"recipe gpt_glue_embedded.yaml: {m.layers} layers, width {m.width}, vocabulary "
              f"{recipe.encoder.vocab_size}, context {recipe.context}, {n_params} parameters; "
              f"pretext stage: {steps} next-token steps"
              + (f" (loss {first_last[0]:.2f} -> {first_last[1]:.2f})" if first_last else "")
              + f"; head-warmup stage on embedded {task} (nu = {recipe.cfg.finetune.nu}); "
              f"dropout 0 in the measured copies; lower batch {lower_batch}x{recipe.context} "
              f"tokens, upper batches of {upper_batch}"),
        info=info,
    )
