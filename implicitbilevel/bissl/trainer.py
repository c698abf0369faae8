"""BiSSL training (thesis Algorithm 2) as a reusable, domain-free trainer.

For ``t = 0, …, T−1``: ``N_L`` lower-level steps on ``G = L^P(θ_P, φ_P) + λ(t)·½‖θ_D − θ_P‖²``,
then ``N_U`` upper-level steps on ``F = L^D(θ_P*(θ_D), φ_D) + L^D(θ_D, φ_D)`` with the hypergradient
of :class:`~implicitbilevel.BilevelProblem`. Recipes hand it parameter dicts, optimisers, data and
a problem; it knows nothing about images or text.

What it does beyond the algorithm's loop, following the thesis's setup (Sec. 6.1.3):

- **Batch stacks.** Each level draws from its own stack of batches (one pass over its loader),
  regenerated only when the remaining batches cannot complete a stage, so data is not reshuffled
  between alternations; a shorter loader is cycled, and a trailing partial batch is never used
  (:class:`BatchStack`). One lower batch is drawn per alternation for the implicit-Jacobian
  Hessian and shared by all ``N_U`` upper steps, whose first-order graph is built once.
- **Clipping, schedules, λ.** Gradient-norm clipping per level (10 in the thesis), learning-rate
  schedulers stepped once per step, ``λ(t)`` evaluated once per alternation. The problem's own
  parameters (``problem.params``: a learnable λ's ``ρ``) are upper-level parameters like any
  other: updated by the upper optimiser (register them with it, as the thesis does), clipped
  with the upper gradient, checkpointed and broadcast with the upper parameters.
- **Logging.** One JSON line per alternation in ``out_dir/metrics.jsonl``: both losses, λ, solver
  iterations, the solver's residual and the measured one (``ij_relative_residual``), gradient
  norms, breakdowns, curvature products and the time spent building reused curvature, wall time; a
  progress bar when ``tqdm`` is installed.
- **Checkpoints.** At alternation boundaries, atomically, in ``out_dir/checkpoint.pt``: parameters,
  module buffers, optimiser and scheduler states, random-number states and the positions in the
  batch stacks (:class:`~implicitbilevel.run_state.RunState`), so ``run(resume=True)`` after a
  kill continues exactly where the run stopped.
- **Replicas.** In a multi-rank run every rank starts from rank 0's parameters (the problem's
  included) and buffers (as ``DistributedDataParallel`` does), so stages run before BiSSL need
  not be bit-identical across ranks.
- **Failures.** A non-finite loss, gradient or solution stops the run with an error naming the
  level, alternation, step and quantity; the last checkpoint is the last good state.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, NonFiniteError
from ..parallel.distributed import is_main_process
from ..problem import BilevelProblem
from ..results import assign_grads
from ..tree import Params, tree_norm
from .batch_stack import BatchStack, to_device
from .checkpoint import load_checkpoint
from .config import BiSSLConfig, check_trainer_inputs, resume_changes, run_settings
from .diagnostics import solve_diagnostics
from .run_log import json_line, progress_bar, rewrite_log
from .run_state import RunState, save_on_main, upgrade_v1

__all__ = ["BiSSLConfig", "BiSSLTrainer"]

_FORMAT = "implicitbilevel.bissl/2"
_FORMAT_V1 = "implicitbilevel.bissl/1"  # a learnable λ's ρ under "lam_rho", apart from upper_params


class BiSSLTrainer:
    """Run Algorithm 2 on a :class:`~implicitbilevel.BilevelProblem`.

    Args:
        problem: the BiSSL problem (upper loss from :func:`bissl_upper_loss`, pretext lower loss,
            :class:`~implicitbilevel.ProximalL2` over the backbone names).
        upper_params: θ_D ∪ φ_D, the live tensors the upper optimiser updates.
        lower_params: θ_P ∪ φ_P, the live tensors the lower optimiser updates.
        upper_optimizer: optimiser over the upper parameters and the problem's own parameters
            (``problem.params``: ``ρ`` of a learnable λ); the trainer refuses one that misses a
            problem parameter.
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
        callbacks: ``callback(trainer, t, record)`` called after alternation ``t`` (before it is
            logged and checkpointed); a returned mapping is merged into ``record``. Every rank
            calls them (e.g. a monitor of θ_P's representation).

    Attributes:
        optimised_upper: ``{**upper_params, **problem.params}``, everything the upper optimiser
            updates; gradients are assigned, clipped, checkpointed and broadcast over it as one.
        run_state: the :class:`~implicitbilevel.run_state.RunState` behind :meth:`state_dict`,
            :meth:`load_state_dict` and the broadcast from rank 0.
        history: the per-alternation metrics so far.
        alternation: the next alternation ``t`` to run.

    Example:
        Three alternations of a least-squares pretext task and a linear downstream loss, solved
        exactly (a dense solve, so the logged residual is at rounding level):

        >>> import torch
        >>> from implicitbilevel import BilevelProblem, Dense, ImplicitJacobian, ProximalL2
        >>> from implicitbilevel.bissl import BiSSLConfig, BiSSLTrainer, bissl_upper_loss
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(6, 3, generator=g, dtype=torch.float64)
        >>> def pretext(p, batch):                     # L^P(theta_P): least squares
        ...     return (a @ p["th"] - 1).pow(2).mean()
        >>> def downstream(p, batch):                  # L^D(theta, phi): a linear head on theta
        ...     return ((p["th"] * p["head"]).sum() - 2).pow(2)
        >>> zeros = lambda: torch.zeros(3, dtype=torch.float64, requires_grad=True)
        >>> upper = {"th": zeros(), "head": torch.ones(3, dtype=torch.float64, requires_grad=True)}
        >>> lower = {"th": zeros()}
        >>> problem = BilevelProblem(bissl_upper_loss(downstream, ["th"]), pretext, lam=1.0,
        ...                          regularizer=ProximalL2(["th"]),
        ...                          ij=ImplicitJacobian(Dense(), damping=0.0))
        >>> data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 1)),
        ...                                    batch_size=2)
        >>> trainer = BiSSLTrainer(problem, upper, lower,
        ...                        torch.optim.SGD(list(upper.values()), lr=0.05),
        ...                        torch.optim.SGD(list(lower.values()), lr=0.05), data, data,
        ...                        BiSSLConfig(alternations=3, lower_steps=2, upper_steps=2,
        ...                                    progress=False))
        >>> history = trainer.run()
        >>> len(history), sum(h["solver_breakdowns"] for h in history)
        (3, 0)
        >>> max(h["ij_relative_residual"] for h in history) < 1e-12
        True
        >>> history[-1]["upper_loss"] < history[0]["upper_loss"]
        True
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
        callbacks: Sequence[Callable[[BiSSLTrainer, int, dict[str, Any]], Mapping | None]] = (),
    ) -> None:
        self.problem = problem
        self.upper_params = dict(upper_params)
        self.lower_params = dict(lower_params)
        self.upper_optimizer = upper_optimizer
        self.lower_optimizer = lower_optimizer
        self.upper_scheduler = upper_scheduler
        self.lower_scheduler = lower_scheduler
        self.config = BiSSLConfig() if config is None else config
        self.device = torch.device(device) if device is not None else None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.modules = {} if modules is None else dict(modules)
        self.callbacks = list(callbacks)
        self.upper_stack = BatchStack(upper_data)
        self.lower_stack = BatchStack(lower_data)
        self.history: list[dict[str, Any]] = []
        self.alternation = 0
        self._changes: dict[str, list] = {}
        check_trainer_inputs(problem, self.upper_params, self.lower_params, upper_optimizer)
        # Everything the upper optimiser updates: the upper variables and the problem's own.
        self.optimised_upper: Params = {**self.upper_params, **problem.params}
        self.run_state = RunState(
            params={"upper_params": self.optimised_upper, "lower_params": self.lower_params},
            optimizers={"upper_optimizer": upper_optimizer, "lower_optimizer": lower_optimizer},
            schedulers={"upper_scheduler": upper_scheduler, "lower_scheduler": lower_scheduler},
            stacks={"upper_stack": self.upper_stack, "lower_stack": self.lower_stack},
            modules=self.modules,
        )

    # -- set-up ------------------------------------------------------------------------------

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
            grads = {n: p.grad for n, p in params.items() if p.grad is not None}
            norm = tree_norm(grads) if grads else torch.zeros(())
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
            batch = to_device(self.lower_stack.next(), self.device)
            try:
                with self._autocast():
                    out = self.problem.lower_grad(self.upper_params, self.lower_params, batch, t=t)
            except NonFiniteError as err:
                raise NonFiniteError(f"lower level, {step}: {err}") from err
            # A solver that observes gradients (MFAC) gets ∇L^P before the step moves θ_P.
            self.problem.observe_lower_gradient(self.upper_params, self.lower_params, out)
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
        lower_batch = to_device(self.lower_stack.next(), self.device)
        try:
            with self._autocast():
                hessian = problem.lower_hessian(self.upper_params, self.lower_params, lower_batch)
        except NonFiniteError as err:
            raise NonFiniteError(f"upper level, alternation {t}, Hessian: {err}") from err
        self.upper_stack.reserve(cfg.upper_steps)
        losses, norms, iters, residuals, breakdowns, lam_grads = [], [], [], [], 0, []
        prepare_seconds, solve = 0.0, {}
        for n in range(cfg.upper_steps):
            step = f"alternation {t}, upper step {n}"
            batch = to_device(self.upper_stack.next(), self.device)
            try:
                with self._autocast():
                    out = problem.upper_grad(self.upper_params, self.lower_params, batch, t=t,
                                             lower_hessian=hessian)
            except NonFiniteError as err:
                raise NonFiniteError(f"upper level, {step}: {err}") from err
            if out.lam_grad is not None:  # logged unclipped (clipping scales it in place)
                lam_grads.append(float(out.lam_grad))
            assign_grads(self.optimised_upper, out.grads)
            norms.append(self._clip(self.optimised_upper, "upper", step))
            self.upper_optimizer.step()
            if self.upper_scheduler is not None:
                self.upper_scheduler.step()
            losses.append(float(out.loss))
            iters.append(out.info.iterations)
            prepare_seconds += out.prepare_seconds
            residuals.append(out.info.relative_residual)
            breakdowns += out.info.breakdown is not None
            if n == cfg.upper_steps - 1:  # the last solve's residuals and cosine
                with self._autocast():
                    solve = solve_diagnostics(problem, out, self.upper_params, self.lower_params,
                                              lower_batch, residual=cfg.measure_residual,
                                              exact=cfg.measure_exact_residual)
        metrics = {
            "upper_loss": sum(losses) / len(losses),
            "upper_grad_norm": sum(norms) / len(norms),
            "solver_iterations": sum(iters) / len(iters),
            "solver_relative_residual": residuals[-1],
            **solve,
            "solver_breakdowns": breakdowns,
            "hessian_products": hessian.calls,
            "curvature_build_seconds": prepare_seconds,
        }
        if lam_grads:
            metrics["lam_grad"] = lam_grads[-1]
        return metrics

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (tensors and plain containers only).

        The upper parameters include the problem's own (``problem.params``). Every rank must call
        it in a multi-rank run.
        """
        return {
            "format": _FORMAT,
            "alternation": self.alternation,
            "config": asdict(self.config),
            "settings": self._settings(),
            **self.run_state.state_dict(),
            "history": self.history,
            **self._solver_state(),
        }

    def _settings(self) -> dict[str, Any]:
        """What a resume must not change silently: the loop's settings and the problem's."""
        return run_settings(self.config, self.problem)

    def _solver_state(self) -> dict[str, Any]:
        """``{"ij": ...}`` when the solver carries state across alternations (M-FAC's window)."""
        state = self.problem.solver.state_dict()
        return {"ij": state} if state else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` into the live parameters, optimisers and stacks."""
        if state.get("format") == _FORMAT_V1:
            state = upgrade_v1(state)
        if state.get("format") != _FORMAT:
            raise CheckpointError(
                f"not a BiSSL trainer checkpoint (format {state.get('format')!r})"
            )
        self.run_state.load_state_dict(state)
        if "ij" in state:
            self.problem.solver.load_state_dict(state["ij"])
        self.history = list(state["history"])
        self.alternation = int(state["alternation"])

    def save(self) -> None:
        """Write the checkpoint atomically on rank 0 (no-op without ``out_dir``).

        Every rank must call it: the per-rank data positions and random states are gathered.
        """
        if self.checkpoint_path is None:
            return
        save_on_main(self.state_dict(), self.checkpoint_path)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, resume: bool = False, allow_changed_config: bool = False
            ) -> list[dict[str, Any]]:
        """Run the remaining alternations; returns the per-alternation metrics.

        θ_P is left in ``lower_params`` (the live tensors), as Algorithm 2 returns it.

        Args:
            resume: continue from ``out_dir/checkpoint.pt`` when it exists.
            allow_changed_config: resume even when the loop's settings (``T``, ``N_L``, ``N_U``,
                clipping, autocast) or the problem's (λ, ``λ_damp``, the solver and the system
                solved) differ from the checkpoint's; the changes are then recorded in the next
                alternation's record under ``"changed_config"``. Without it such a resume
                raises ``ValueError`` naming every change.
        """
        cfg = self.config
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path)
            changes = resume_changes(state.get("settings"), self._settings(), self.out_dir,
                                     allow=allow_changed_config)
            self.load_state_dict(state)
            self._changes = {k: list(v) for k, v in changes.items()}
        self.run_state.broadcast()
        log = None
        if self.out_dir is not None and is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            log = rewrite_log(self.out_dir / "metrics.jsonl", self.history)
        bar = progress_bar(cfg.progress and is_main_process(), cfg.alternations, self.alternation)
        try:
            while self.alternation < cfg.alternations:
                t = self.alternation
                start = time.perf_counter()
                record: dict[str, Any] = {"alternation": t, "lam": self.problem.lam_at(t)}
                record.update(self._lower_stage(t))
                record.update(self._upper_stage(t))
                if self._changes:
                    record["changed_config"], self._changes = self._changes, {}
                record["seconds"] = time.perf_counter() - start
                for callback in self.callbacks:
                    record.update(callback(self, t, record) or {})
                self.history.append(record)
                self.alternation += 1
                if log is not None:
                    log.write(json_line(record))
                    log.flush()
                finished = self.alternation == cfg.alternations
                if self.alternation % cfg.checkpoint_every == 0 or finished:
                    self.save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(lower=f"{record['lower_loss']:.3f}",
                                    upper=f"{record['upper_loss']:.3f}", lam=f"{record['lam']:.2g}",
                                    ij_res=f"{record['ij_relative_residual']:.2g}")
        finally:
            if log is not None:
                log.close()
            if bar is not None:
                bar.close()
        return self.history
