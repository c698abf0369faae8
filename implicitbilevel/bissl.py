"""BiSSL training (thesis Algorithm 2) as a reusable, domain-free trainer.

For ``t = 0, …, T−1``: ``N_L`` lower-level steps on ``G = L^P(θ_P, φ_P) + λ(t)·½‖θ_D − θ_P‖²``,
then ``N_U`` upper-level steps on ``F = L^D(θ_P*(θ_D), φ_D) + L^D(θ_D, φ_D)`` with the hypergradient
of :class:`~implicitbilevel.BilevelProblem`. Recipes hand it parameter dicts, optimisers, data and
a problem; it knows nothing about images or text.

What it does beyond the algorithm's loop, following the thesis's setup (Sec. 6.1.3):

- **Batch stacks.** Each level draws from its own stack of batches (one pass over its loader),
  regenerated only when the remaining batches cannot complete a stage, so data is not reshuffled
  between alternations. One lower batch is drawn per alternation for the implicit-Jacobian
  Hessian and shared by all ``N_U`` upper steps, whose first-order graph is built once.
- **Clipping, schedules, λ.** Gradient-norm clipping per level (10 in the thesis), learning-rate
  schedulers stepped once per step, ``λ(t)`` evaluated once per alternation, a learnable λ updated
  by the upper optimiser (register ``problem.lam.rho`` with it, as the thesis does).
- **Logging.** One JSON line per alternation in ``out_dir/metrics.jsonl``: both losses, λ, solver
  iterations, the solver's residual and the measured one (``ij_relative_residual``), gradient
  norms, breakdowns, curvature products and the time spent building reused curvature, wall time; a
  progress bar when ``tqdm`` is installed.
- **Checkpoints.** At alternation boundaries, atomically, in ``out_dir/checkpoint.pt``: parameters,
  module buffers, optimiser and scheduler states, random-number states and the positions in the
  batch stacks, so ``run(resume=True)`` after a kill continues exactly where the run stopped.
- **Replicas.** In a multi-rank run every rank starts from rank 0's parameters, buffers and λ
  (as ``DistributedDataParallel`` does), so stages run before BiSSL need not be bit-identical
  across ranks.
- **Failures.** A non-finite loss, gradient or solution stops the run with an error naming the
  level, alternation, step and quantity; the last checkpoint is the last good state.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .batch_stack import BatchStack
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .distributed import broadcast_from_main, is_main_process, rank, world_size
from .problem import BilevelProblem, NonFiniteError, assign_grads
from .run_state import gather_per_rank, rng_state, set_rng_state
from .schedules import LearnableLambda
from .tree import Params

__all__ = ["BatchStack", "BiSSLConfig", "BiSSLTrainer", "bissl_upper_loss"]


def bissl_upper_loss(
    downstream_loss: Callable[[Params, Any], Tensor], backbone_names: Iterable[str]
) -> Callable[[Params, Params, Any], Tensor]:
    """The BiSSL upper objective ``f(x, y) = L^D(θ_P, φ_D) + L^D(θ_D, φ_D)`` (eq. 4.4).

    Args:
        downstream_loss: ``L^D(params, batch) -> scalar`` over the downstream model's parameter
            names (backbone and head).
        backbone_names: the backbone names; the first term evaluates the downstream model with the
            lower-level backbone ``θ_P`` substituted for ``θ_D`` under these names.
    """
    names = list(backbone_names)

    def upper_loss(upper: Params, lower: Params, batch: Any) -> Tensor:
        substituted = dict(upper)
        substituted.update({n: lower[n] for n in names})
        return downstream_loss(substituted, batch) + downstream_loss(upper, batch)

    return upper_loss


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
    """

    alternations: int = 500
    lower_steps: int = 20
    upper_steps: int = 8
    grad_clip: float | None = 10.0
    checkpoint_every: int = 1
    autocast: str | None = None
    progress: bool = True
    measure_residual: bool = True

    def __post_init__(self) -> None:
        for name in ("alternations", "lower_steps", "upper_steps", "checkpoint_every"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"BiSSLConfig.{name} must be an int >= 1, got {value!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"BiSSLConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"BiSSLConfig.autocast must be None or 'bf16', got {self.autocast!r}")


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(v, device) for v in batch]
        return type(batch)(moved) if isinstance(batch, list) else tuple(moved)
    return batch


def _grad_norm(params: Mapping[str, Tensor]) -> Tensor:
    grads = [p.grad for p in params.values() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)))


class BiSSLTrainer:
    """Run Algorithm 2 on a :class:`~implicitbilevel.BilevelProblem`.

    Args:
        problem: the BiSSL problem (upper loss from :func:`bissl_upper_loss`, pretext lower loss,
            :class:`~implicitbilevel.ProximalL2` over the backbone names).
        upper_params: θ_D ∪ φ_D, the live tensors the upper optimiser updates.
        lower_params: θ_P ∪ φ_P, the live tensors the lower optimiser updates.
        upper_optimizer: optimiser over the upper parameters (and ``problem.lam.rho`` when λ is
            learnable).
        lower_optimizer: optimiser over the lower parameters.
        upper_data: re-iterable with a length (a ``DataLoader``) of downstream batches.
        lower_data: the same for pretext batches.
        config: the loop's hyperparameters.
        upper_scheduler: learning-rate scheduler stepped after every upper step.
        lower_scheduler: learning-rate scheduler stepped after every lower step.
        device: batches (tensors in nested tuples, lists and dicts) are moved here.
        out_dir: where ``metrics.jsonl`` and ``checkpoint.pt`` go (``None``: neither).
        modules: modules whose full ``state_dict`` (buffers such as BatchNorm statistics included)
            is checkpointed, by name.
    """

    def __init__(
        self,
        problem: BilevelProblem,
        upper_params: Mapping[str, Tensor],
        lower_params: Mapping[str, Tensor],
        upper_optimizer: torch.optim.Optimizer,
        lower_optimizer: torch.optim.Optimizer,
        upper_data: Iterable,
        lower_data: Iterable,
        config: BiSSLConfig | None = None,
        *,
        upper_scheduler: Any = None,
        lower_scheduler: Any = None,
        device: torch.device | str | None = None,
        out_dir: str | Path | None = None,
        modules: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self.problem = problem
        self.upper_params = dict(upper_params)
        self.lower_params = dict(lower_params)
        self.upper_optimizer = upper_optimizer
        self.lower_optimizer = lower_optimizer
        self.upper_scheduler = upper_scheduler
        self.lower_scheduler = lower_scheduler
        self.config = config or BiSSLConfig()
        self.device = torch.device(device) if device is not None else None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.modules = dict(modules or {})
        self.upper_stack = BatchStack(upper_data)
        self.lower_stack = BatchStack(lower_data)
        self.history: list[dict[str, Any]] = []
        self.alternation = 0
        self._validate()

    # -- set-up ------------------------------------------------------------------------------

    def _validate(self) -> None:
        self.problem.regularizer.coupled_names(self.upper_params, self.lower_params)
        if isinstance(self.problem.lam, LearnableLambda):
            rho = self.problem.lam.rho
            optimised = {id(p) for g in self.upper_optimizer.param_groups for p in g["params"]}
            if id(rho) not in optimised:
                raise ValueError(
                    "λ is learnable but problem.lam.rho is not in the upper optimiser; add it, "
                    "e.g. "
                    "upper_optimizer.add_param_group({'params': problem.lam.parameters()})"
                )

    @property
    def checkpoint_path(self) -> Path | None:
        """``out_dir/checkpoint.pt`` (``None`` without ``out_dir``)."""
        return None if self.out_dir is None else self.out_dir / "checkpoint.pt"

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.autocast is None:
            return contextlib.nullcontext()
        device_type = self.device.type if self.device is not None else "cpu"
        return torch.autocast(device_type, dtype=torch.bfloat16)

    # -- steps -------------------------------------------------------------------------------

    def _clip(self, params: Mapping[str, Tensor], level: str, step: str) -> float:
        if self.config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), self.config.grad_clip)
        else:
            norm = _grad_norm(params)
        value = float(norm)
        if not math.isfinite(value):
            raise NonFiniteError(f"non-finite {level}-level gradient norm at {step}")
        return value

    def _lower_stage(self, t: int) -> dict[str, float]:
        cfg = self.config
        losses, regs, norms = [], [], []
        # N_L lower batches plus the one the upper stage's Hessian uses.
        self.lower_stack.reserve(cfg.lower_steps + 1)
        for n in range(cfg.lower_steps):
            step = f"alternation {t}, lower step {n}"
            batch = _to_device(self.lower_stack.next(), self.device)
            try:
                with self._autocast():
                    out = self.problem.lower_grad(self.upper_params, self.lower_params, batch, t=t)
            except NonFiniteError as err:
                raise NonFiniteError(f"lower level, {step}: {err}") from err
            assign_grads(self.lower_params, out.grads)
            norms.append(self._clip(self.lower_params, "lower", step))
            self.lower_optimizer.step()
            if self.lower_scheduler is not None:
                self.lower_scheduler.step()
            losses.append(float(out.loss))
            regs.append(float(out.regularizer))
        return {
            "lower_loss": sum(losses) / len(losses),
            "regularizer": regs[-1],
            "lower_grad_norm": sum(norms) / len(norms),
        }

    def _upper_stage(self, t: int) -> dict[str, float]:
        cfg = self.config
        problem = self.problem
        lower_batch = _to_device(self.lower_stack.next(), self.device)
        try:
            with self._autocast():
                hessian = problem.lower_hessian(self.upper_params, self.lower_params, lower_batch)
        except NonFiniteError as err:
            raise NonFiniteError(f"upper level, alternation {t}, Hessian: {err}") from err
        self.upper_stack.reserve(cfg.upper_steps)
        losses, norms, iters, residuals, breakdowns, lam_grads = [], [], [], [], 0, []
        learnable = isinstance(problem.lam, LearnableLambda)
        true_residual = math.nan
        for n in range(cfg.upper_steps):
            step = f"alternation {t}, upper step {n}"
            batch = _to_device(self.upper_stack.next(), self.device)
            try:
                with self._autocast():
                    out = problem.upper_grad(self.upper_params, self.lower_params, batch, t=t,
                                             lower_hessian=hessian)
            except NonFiniteError as err:
                raise NonFiniteError(f"upper level, {step}: {err}") from err
            assign_grads(self.upper_params, out.grads)
            norms.append(self._clip(self.upper_params, "upper", step))
            if learnable:
                assert out.lam_grad is not None
                if not bool(torch.isfinite(out.lam_grad)):
                    raise NonFiniteError(f"upper level, {step}: non-finite λ gradient")
                problem.lam.rho.grad = out.lam_grad.detach().clone()
                lam_grads.append(float(out.lam_grad))
            self.upper_optimizer.step()
            if self.upper_scheduler is not None:
                self.upper_scheduler.step()
            losses.append(float(out.loss))
            iters.append(out.info.iterations)
            residuals.append(out.info.relative_residual)
            breakdowns += out.info.breakdown is not None
            if n == cfg.upper_steps - 1 and cfg.measure_residual:
                # One more product: ‖v − A u‖/‖v‖ of the last solve, comparable across solvers.
                with self._autocast():
                    true_residual = out.true_relative_residual()
        metrics = {
            "upper_loss": sum(losses) / len(losses),
            "upper_grad_norm": sum(norms) / len(norms),
            "solver_iterations": sum(iters) / len(iters),
            "solver_relative_residual": residuals[-1],
            "ij_relative_residual": true_residual,
            "solver_breakdowns": breakdowns,
            "hessian_products": hessian.calls,
            "curvature_build_seconds": hessian.memo.get("build_seconds", 0.0),
        }
        if learnable:
            metrics["lam_grad"] = lam_grads[-1]
        return metrics

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (tensors and plain containers only)."""
        state: dict[str, Any] = {
            "format": "implicitbilevel.bissl/1",
            "alternation": self.alternation,
            "config": asdict(self.config),
            "upper_params": {n: p.detach().clone() for n, p in self.upper_params.items()},
            "lower_params": {n: p.detach().clone() for n, p in self.lower_params.items()},
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "upper_optimizer": self.upper_optimizer.state_dict(),
            "lower_optimizer": self.lower_optimizer.state_dict(),
            "ranks": gather_per_rank({
                "upper_stack": self.upper_stack.state_dict(),
                "lower_stack": self.lower_stack.state_dict(),
                "rng": rng_state(),
            }),
            "history": self.history,
        }
        for name in ("upper_scheduler", "lower_scheduler"):
            scheduler = getattr(self, name)
            if scheduler is not None:
                state[name] = scheduler.state_dict()
        if isinstance(self.problem.lam, LearnableLambda):
            state["lam_rho"] = self.problem.lam.rho.detach().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` into the live parameters, optimisers and stacks."""
        if state.get("format") != "implicitbilevel.bissl/1":
            raise CheckpointError(
                f"not a BiSSL trainer checkpoint (format {state.get('format')!r})"
            )
        levels = (("upper_params", self.upper_params), ("lower_params", self.lower_params))
        for key, params in levels:
            saved = state[key]
            if saved.keys() != params.keys():
                raise CheckpointError(f"checkpoint {key} names differ from this run's parameters")
            with torch.no_grad():
                for n, p in params.items():
                    if saved[n].shape != p.shape:
                        raise CheckpointError(f"checkpoint {key}[{n!r}] has shape "
                                              f"{tuple(saved[n].shape)}, expected {tuple(p.shape)}")
                    p.copy_(saved[n])
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.upper_optimizer.load_state_dict(state["upper_optimizer"])
        self.lower_optimizer.load_state_dict(state["lower_optimizer"])
        for name in ("upper_scheduler", "lower_scheduler"):
            scheduler = getattr(self, name)
            if scheduler is not None:
                scheduler.load_state_dict(state[name])
        if "lam_rho" in state and isinstance(self.problem.lam, LearnableLambda):
            with torch.no_grad():
                self.problem.lam.rho.copy_(state["lam_rho"])
        # Each rank resumes its own data position and random state (rank 0's for a single process
        # resuming a multi-rank run).
        ranks = state["ranks"]
        mine = ranks[rank()] if rank() < len(ranks) else ranks[0]
        self.upper_stack.load_state_dict(mine["upper_stack"])
        self.lower_stack.load_state_dict(mine["lower_stack"])
        set_rng_state(mine["rng"])
        self.history = list(state["history"])
        self.alternation = int(state["alternation"])

    def save(self) -> None:
        """Write the checkpoint atomically on rank 0 (no-op without ``out_dir``).

        Every rank must call it: the per-rank data positions and random states are gathered.
        """
        if self.checkpoint_path is None:
            return
        state = self.state_dict()
        if is_main_process():
            save_checkpoint(state, self.checkpoint_path)
        if world_size() > 1:
            dist.barrier()

    def _replicated_tensors(self) -> list[Tensor]:
        """Every tensor that must be identical on all ranks, once each, in a fixed order."""
        tensors: dict[int, Tensor] = {}
        for t in [*self.upper_params.values(), *self.lower_params.values()]:
            tensors.setdefault(id(t), t)
        for name in sorted(self.modules):
            for t in self.modules[name].state_dict(keep_vars=True).values():
                if isinstance(t, Tensor):
                    tensors.setdefault(id(t), t)
        if isinstance(self.problem.lam, LearnableLambda):
            tensors.setdefault(id(self.problem.lam.rho), self.problem.lam.rho)
        return list(tensors.values())

    # -- the loop ----------------------------------------------------------------------------

    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        """Run the remaining alternations; returns the per-alternation metrics.

        θ_P is left in ``lower_params`` (the live tensors), as Algorithm 2 returns it.

        Args:
            resume: continue from ``out_dir/checkpoint.pt`` when it exists.
        """
        cfg = self.config
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_state_dict(load_checkpoint(self.checkpoint_path))
        if world_size() > 1:
            broadcast_from_main(self._replicated_tensors())
        log = None
        if self.out_dir is not None and is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.out_dir / "metrics.jsonl", "a" if resume else "w")  # noqa: SIM115
        bar = _progress(cfg.progress and is_main_process(), cfg.alternations, self.alternation)
        try:
            while self.alternation < cfg.alternations:
                t = self.alternation
                start = time.perf_counter()
                record: dict[str, Any] = {"alternation": t, "lam": self.problem.lam_at(t)}
                record.update(self._lower_stage(t))
                record.update(self._upper_stage(t))
                record["seconds"] = time.perf_counter() - start
                self.history.append(record)
                self.alternation += 1
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                finished = self.alternation == cfg.alternations
                if self.alternation % cfg.checkpoint_every == 0 or finished:
                    self.save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(lower=f"{record['lower_loss']:.3f}",
                                    upper=f"{record['upper_loss']:.3f}", lam=f"{record['lam']:.2g}")
        finally:
            if log is not None:
                log.close()
            if bar is not None:
                bar.close()
        return self.history


def _progress(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the library
        return None
    return tqdm(total=total, initial=initial, desc="BiSSL", unit="alt", dynamic_ncols=True)
