"""One fine-tuning loop and one evaluation for both recipes (thesis Sec. 6.1.2 and 7.1.2).

A recipe describes its downstream task by an :class:`Objective` (training loss, predictions,
metrics) and passes its optimiser; :func:`fit` trains with a linear warm-up and cosine decay (or
a constant lr for a head warm-up on a frozen backbone), validates ``evals_per_epoch`` times per
epoch at evenly spaced steps and restores the weights of the best validation score.

Early stopping (thesis Sec. 9.1, fifth item; :class:`EarlyStopping`): with ``patience`` set,
training ends at the first validation after ``min_epochs`` at which the best score is
``patience`` validations old; the learning-rate schedule still spans the full ``epochs``, so a run
that does not stop is the run without early stopping.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from implicitbilevel.bissl.checkpoint import save_checkpoint

from .finite import check_loss, check_weights
from .runtime import autocast
from .schedules import warmup_cosine

__all__ = ["EarlyStopping", "FitResult", "Objective", "evaluate", "fit", "to_device"]


@dataclass
class Objective:
    """A downstream task as the loop sees it.

    Attributes:
        loss: ``loss(model, batch) -> scalar`` to train on.
        predict: ``predict(model, batch) -> (outputs, targets)`` for evaluation.
        metrics: ``metrics(outputs, targets) -> {name: value}`` over a whole split; it includes
            ``loss`` and ``key``.
        key: the metric that selects the best validation step (higher is better).
    """

    loss: Callable[[nn.Module, Any], Tensor]
    predict: Callable[[nn.Module, Any], tuple[Tensor, Tensor]]
    metrics: Callable[[Tensor, Tensor], dict[str, float]]
    key: str


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (a tensor or a tuple/list of them) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    objective: Objective,
    device: torch.device,
    bf16: bool = False,
) -> dict[str, float]:
    """``objective.metrics`` of ``model`` over every batch of ``loader`` (eval mode)."""
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    for batch in loader:
        with autocast(device, bf16):
            out, target = objective.predict(model, to_device(batch, device))
        outputs.append(out.float().cpu())
        targets.append(target.cpu())
    model.train(was_training)
    return objective.metrics(torch.cat(outputs), torch.cat(targets))


@dataclass
class FitResult:
    """The best validation metrics, every validation, the update steps taken and the epochs they
    make (fewer than asked when early stopping ended the run)."""

    best_val: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    epochs: float = 0.0
    stopped_early: bool = False


@dataclass
class EarlyStopping:
    """The stopping rule of thesis Sec. 9.1 (fifth item): train at least ``min_epochs``, then stop
    once the validation score has not improved for ``patience`` validations.

    With scores ``s_1, s_2, …`` at epochs ``e_1 < e_2 < …``, let ``b(i) = argmax_{j≤i} s_j`` (the
    first maximum: an improvement must be strict). The run stops at the first ``i`` with
    ``e_i ≥ min_epochs`` and ``i − b(i) ≥ patience``. ``patience=None`` or ``0`` never stops.
    """

    patience: int | None = None
    min_epochs: float = 0.0
    best: float = -math.inf
    since_best: int = 0

    def __post_init__(self) -> None:
        if self.patience is not None and self.patience < 0:
            raise ValueError(f"finetune.patience must be >= 0 or None, got {self.patience}")
        if self.min_epochs < 0:
            raise ValueError(f"finetune.min_epochs must be >= 0, got {self.min_epochs}")

    def update(self, score: float, epoch: float) -> bool:
        """Record the validation ``score`` reached at ``epoch``; whether to stop now."""
        if score > self.best:
            self.best, self.since_best = score, 0
        else:
            self.since_best += 1
        return bool(self.patience) and epoch >= self.min_epochs and (
            self.since_best >= self.patience  # type: ignore[operator]
        )


def _cycle(loader: Iterable) -> Iterator[Any]:
    while True:
        yield from loader


def fit(
    model: nn.Module,
    objective: Objective,
    train_loader: Iterable,
    val_loader: Iterable,
    make_optimizer: Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer],
    *,
    epochs: float,
    device: torch.device,
    seed: int = 0,
    evals_per_epoch: int = 1,
    warmup_fraction: float = 0.0,
    freeze: str | None = None,
    bf16: bool = False,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    desc: str = "fine-tune",
    strict: str | None = None,
    patience: int | None = None,
    min_epochs: float = 0.0,
) -> FitResult:
    """Train ``model`` and load the weights of its best validation (by ``objective.key``).

    ``make_optimizer(named_parameters)`` builds the recipe's optimiser over the trained
    parameters. ``freeze=PREFIX`` trains only the parameters outside ``PREFIX`` at a constant lr,
    with the frozen modules in eval mode (the head warm-up); otherwise the lr warms up linearly
    over ``warmup_fraction`` of the steps and then follows a cosine to 0. A non-finite training
    loss ends the run and scores its validation ``-inf``. ``checkpoint`` also writes the best
    weights to disk (never non-finite ones). ``strict=STAGE``: a non-finite loss or weight stops
    the run with :class:`~recipes.common.finite.NonFiniteStage` naming the stage and step.
    ``patience``/``min_epochs``: early stopping by :class:`EarlyStopping` on ``objective.key``
    (``None``/``0``: off); ``FitResult.epochs`` records the epochs actually trained.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    model.to(device)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    total = max(1, round(epochs * steps_per_epoch))
    n_evals = max(1, round(epochs * evals_per_epoch))
    eval_steps = {max(1, round(total * (i + 1) / n_evals)) for i in range(n_evals)}
    frozen = [(n, p) for n, p in model.named_parameters() if freeze and n.startswith(freeze)]
    trained = [(n, p) for n, p in model.named_parameters() if not (freeze and n.startswith(freeze))]
    frozen_modules = [m for n, m in model.named_modules() if freeze and n and
                      (n + ".").startswith(freeze)]
    for _, p in frozen:
        p.requires_grad_(False)
    optimizer = make_optimizer(trained)
    factor = (lambda _: 1.0) if freeze else warmup_cosine(total, math.ceil(warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    torch.manual_seed(seed)
    result = FitResult(best_val={objective.key: -math.inf})
    best_state: dict[str, Tensor] | None = None
    stopper = EarlyStopping(patience, min_epochs)
    batches = _cycle(train_loader)
    finite, running, count = True, 0.0, 0
    try:
        for step in tqdm(range(1, total + 1), desc=desc, leave=False, disable=not progress):
            model.train()
            for m in frozen_modules:
                m.eval()
            batch = to_device(next(batches), device)
            with autocast(device, bf16):
                loss = objective.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.float().backward()
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            if strict is not None:
                check_loss(strict, f"step {step} of {total}", value)
            finite = finite and math.isfinite(value)
            running, count = running + value, count + 1
            if step not in eval_steps and finite:
                continue
            val = evaluate(model, val_loader, objective, device, bf16)
            if not finite or not math.isfinite(val[objective.key]):
                val[objective.key] = -math.inf
            result.history.append({"step": step, "train_loss": running / count, **val})
            running, count = 0.0, 0
            weights_ok = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
                             if t.is_floating_point())
            if strict is not None and not weights_ok:
                check_weights(strict, model.state_dict(), f"weights after step {step}")
            if weights_ok and (best_state is None
                               or val[objective.key] > result.best_val[objective.key]):
                result.best_val = val
                best_state = copy.deepcopy(model.state_dict())
                if checkpoint is not None:
                    save_checkpoint(best_state, checkpoint)
            result.steps = step
            if not finite:
                break
            if stopper.update(val[objective.key], step / steps_per_epoch):
                result.stopped_early = step < total
                break
    finally:
        for _, p in frozen:
            p.requires_grad_(True)
    if best_state is not None:
        model.load_state_dict(best_state)
    result.epochs = result.steps / steps_per_epoch
    return result
