"""The stages of a BiSSL experiment (thesis chapters 6 and 7), shared by both recipes.

A recipe subclasses :class:`Recipe` and fills in what is its own: data, models, losses,
metrics and optimisers (the ``hook`` methods). The stages, per target (a downstream dataset or
GLUE task), and the files they leave in ``run.out_dir``::

    pretext       pretraining (or the pretrained weights)         pretext.pt
    only-ft       (lr, wd) search, retrain over seeds              <target>/only_ft.json
    head-warmup   head on the frozen pretrained backbone           <target>/warmup.pt
    bissl         Algorithm 2 (resumable)                          <target>/bissl.pt, bissl/
    finetune      fine-tuning from θ_P as Only-FT (BiSSL+FT)       <target>/bissl_ft.json

Each stage writes, after its outputs, its run record (``<output>.config.json``: the settings the
outputs were made with, their SHA-256 digests and those of its inputs); every stage verifies the
records of its inputs before it runs (:mod:`recipes.common.runner`, :mod:`recipes.common.records`).

Under ``torchrun`` BiSSL runs data-parallel, the fine-tuning trials and seed runs are spread over
the ranks, and ``pretext`` and ``head-warmup`` run on rank 0 while the others wait.
"""

from __future__ import annotations

import abc
import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from implicitbilevel.bissl.checkpoint import load_checkpoint, save_checkpoint
from implicitbilevel.parallel.sync_batchnorm import convert_sync_batchnorm

from . import runner
from .bissl_stage import BiSSLLosses, bissl_batch_sizes, run_bissl
from .finetune import Objective, evaluate, fit
from .finite import NonFiniteStage, check_weights
from .jsonio import write_json
from .records import OUTPUTS
from .runtime import derive_seed, init_distributed, seed_everything
from .search import RankFailure, fine_tune_method
from .settings import FinetuneConfig
from .transfer_monitor import MonitorData, transfer_monitor

__all__ = ["OUTPUTS", "STAGES", "Recipe"]

STAGES = runner.STAGES


class Recipe(abc.ABC):
    """One run: config, process group, device, output folder, and the stages over the hooks."""

    name = "recipe"
    config_class: type = object
    backbone_prefix = "backbone."
    pretrain_unit = "steps"

    def __init__(self, cfg: Any, out_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        run = cfg.run
        if run.threads > 0:
            torch.set_num_threads(run.threads)
        self.dist = init_distributed(run.device, timedelta(minutes=run.dist_timeout_minutes))
        self.device = self.dist.device
        self.out = Path(run.out_dir if out_dir is None else out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = run.progress and self.dist.is_main
        self.setup()

    # -- hooks: what each recipe defines -----------------------------------------------------

    targets: list[str] = []

    def setup(self) -> None:  # noqa: B027 - optional hook, nothing to build by default
        """Build the data (and anything else every stage needs)."""

    @abc.abstractmethod
    def new_pretext(self) -> nn.Module:
        """The pretext model before pretraining (or with the pretrained weights)."""

    @abc.abstractmethod
    def pretrain(self, model: nn.Module, extra: bool = False) -> list[float]:
        """Pretrain ``model`` in place; the losses. ``extra``: the Only-FT baseline's run (thesis
        Sec. 6.1.4), one uninterrupted schedule as long as the pretext run plus the baseline's
        extra length, from the same initial weights."""

    def external_weights(self) -> bool:
        """Whether :meth:`new_pretext` loads pretrained weights (then, untrained, they are not
        copied into ``pretext.pt``)."""
        return False

    def baseline_extra(self) -> bool:
        """Whether Only-FT starts from a longer-pretrained model (thesis Sec. 6.1.4)."""
        return False

    @abc.abstractmethod
    def downstream_from(self, pretext: nn.Module, target: str) -> nn.Module:
        """A downstream model: a copy of ``pretext``'s backbone and a fresh head."""

    @abc.abstractmethod
    def objective(self, target: str) -> Objective:
        """The target's loss, predictions and metrics."""

    @abc.abstractmethod
    def train_loader(self, target: str, batch_size: int, seed: int,
                     shard: tuple[int, int] | None = None) -> Any:
        """Shuffled training batches of the target (this rank's share with ``shard``)."""

    @abc.abstractmethod
    def eval_loader(self, target: str, split: str) -> Any:
        """Batches of the ``val`` or ``test`` split."""

    @abc.abstractmethod
    def pretext_loader(self, batch_size: int, seed: int, shard: tuple[int, int] | None) -> Any:
        """Pretext batches for the BiSSL lower level."""

    @abc.abstractmethod
    def optimizer(self, named: list[tuple[str, nn.Parameter]], lr: float,
                  weight_decay: float) -> torch.optim.Optimizer:
        """The downstream optimiser (fine-tuning, head warm-up and the BiSSL upper level)."""

    @abc.abstractmethod
    def lower_optimizer(self, pretext: nn.Module) -> torch.optim.Optimizer:
        """The BiSSL lower-level optimiser."""

    @abc.abstractmethod
    def bissl_losses(self, pretext: nn.Module, downstream: nn.Module, target: str) -> BiSSLLosses:
        """The recipe's losses as functions of parameter dicts."""

    @abc.abstractmethod
    def monitor_data(self, target: str, pretext: nn.Module) -> MonitorData:
        """The transfer monitor's inputs (``bissl.monitor_every``): unlabelled view pairs of the
        target's inputs, ``pretext``'s backbone as the embedding, the labelled validation probe."""

    def warmup_epochs(self, target: str) -> float:
        """Head warm-up epochs (the config's, else the recipe's default for the target)."""
        return float(self.cfg.warmup.epochs or 0.0)

    def report_metrics(self, target: str) -> list[str]:
        """The test metrics of the report table, the headline one first."""
        return [self.objective(target).key]

    # -- files -------------------------------------------------------------------------------

    def path(self, target: str | None, name: str) -> Path:
        """``out/name`` (shared by all targets) or ``out/<target>/name``."""
        return self.out / name if target is None else self.out / target / name

    def output(self, stage: str, target: str | None) -> Path:
        """The file a stage writes (its presence means the stage is done)."""
        return self.path(None if stage == "pretext" else target, OUTPUTS[stage])

    def require(self, path: Path) -> Path:
        """``path``, or ``FileNotFoundError`` naming the stage to run first."""
        if not path.exists():
            made_by = {**{n: s for s, n in OUTPUTS.items()}, "pretext_baseline.pt": "pretext"}
            stage = made_by.get(path.name)
            raise FileNotFoundError(f"{path} is missing: run the {stage!r} stage first" if stage
                                    else f"{path} is missing: run the earlier stages first")
        return path

    def read_json(self, target: str | None, name: str) -> dict[str, Any]:
        """A stage's JSON output."""
        return json.loads(self.require(self.path(target, name)).read_text())

    def load_pretext(self, path: Path) -> nn.Module:
        """The pretext model with the weights of a ``pretext.pt``/``bissl.pt`` file."""
        model = self.new_pretext()
        state = load_checkpoint(self.require(path)).get("pretext")
        if state is not None:
            model.load_state_dict(state)
        return model.to(self.device)

    def say(self, text: str) -> None:
        """Print on rank 0."""
        if self.dist.is_main:
            print(text, flush=True)

    # -- stages ------------------------------------------------------------------------------

    def run_stages(self, stages: list[str], resume: bool = False, skip_done: bool = False,
                   overwrite: bool = False, allow_changed_config: bool = False,
                   **options: Any) -> None:
        """Run ``stages`` (in :data:`STAGES` order) for every target, with their run records
        (:mod:`recipes.common.runner`). ``resume`` continues BiSSL from its checkpoint;
        ``skip_done`` reuses a finished stage whose record holds (and runs again one that did not
        finish); ``overwrite`` runs finished stages again. An input, or a reused stage, made under
        another configuration stops the run (:class:`~recipes.common.fingerprint.ConfigChanged`
        naming each setting with its recorded and current value) unless
        ``allow_changed_config``, which is recorded; a file that no longer matches its record's
        digest stops it (:class:`~recipes.common.records.DigestMismatch` naming the file).
        ``options``: ``rerun_stale``, ``reference``, ``depends`` of :func:`.runner.run_stages`."""
        runner.run_stages(self, stages, resume=resume, skip_done=skip_done, overwrite=overwrite,
                          allow_changed_config=allow_changed_config, **options)

    def on_main(self, fn: Any) -> None:
        """Run ``fn`` on rank 0 while the other ranks wait; an error stops every rank."""
        error: Exception | None = None
        if self.dist.is_main:
            try:
                fn()
            except Exception as err:  # exchanged below so that no rank waits for a dead one
                error = err
        if self.dist.world_size > 1:
            flags: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(flags, None if error is None else repr(error))
            if error is None and flags[0] is not None:
                raise RankFailure(f"rank 0 failed: {flags[0]}")
        if error is not None:
            raise error

    def stage_pretext(self) -> None:
        """Pretrain from scratch (or keep the pretrained weights); writes ``pretext.pt`` and, for
        the small-scale setup, ``pretext_baseline.pt``: Only-FT's backbone (thesis Sec. 6.1.4),
        its own run of one longer schedule (:meth:`pretrain_baseline`)."""
        seed_everything(self.cfg.run.seed)
        model = self.new_pretext().to(self.device)
        losses = self.pretrain(model)
        keep = losses or not self.external_weights()
        check_weights("pretext", model.state_dict(), "pretext weights")
        save_checkpoint({"pretext": model.state_dict() if keep else None, "losses": losses},
                        self.path(None, "pretext.pt"))
        self.say(f"pretext: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} "
                 f"{self.pretrain_unit}" if losses else "pretext: initial weights kept")
        if self.baseline_extra():
            del model
            self.pretrain_baseline()

    def pretrain_baseline(self) -> list[float]:
        """Only-FT's backbone (thesis Sec. 6.1.4): pretrained on one schedule of the pretext
        length plus the baseline's extra length (500 + 100 epochs at paper scale), its own run
        from the initial weights the pretext run starts from (seeded by ``run.seed``; no restart
        of the learning rate); writes ``pretext_baseline.pt`` and returns its losses."""
        seed_everything(self.cfg.run.seed)
        model = self.new_pretext().to(self.device)
        losses = self.pretrain(model, extra=True)
        check_weights("pretext", model.state_dict(), "pretext (Only-FT baseline) weights")
        save_checkpoint({"pretext": model.state_dict(), "losses": losses},
                        self.path(None, "pretext_baseline.pt"))
        self.say(f"pretext (Only-FT baseline): loss {losses[0]:.3f} -> {losses[-1]:.3f} over "
                 f"{len(losses)} {self.pretrain_unit}, one schedule")
        return losses

    def train_eval(self, source: nn.Module, target: str, lr: float, wd: float, seed: int,
                   epochs: float, test: bool, checkpoint: Path | None = None) -> dict[str, float]:
        """Fine-tune a fresh downstream model from ``source``; best-validation metrics
        (``val_*``), the ``epochs`` trained (early stopping: ``finetune.patience``) and, with
        ``test``, the test metrics of the best-validation weights (``test_*``). Seeded by ``seed``
        only."""
        ft = self.cfg.finetune
        seed_everything(seed)
        model = self.downstream_from(source, target)
        objective = self.objective(target)
        result = fit(
            model, objective, self.train_loader(target, ft.batch_size, seed),
            self.eval_loader(target, "val"), lambda named: self.optimizer(named, lr, wd),
            epochs=epochs, device=self.device, seed=seed, evals_per_epoch=ft.evals_per_epoch,
            warmup_fraction=ft.warmup_fraction, bf16=self.cfg.run.bf16, checkpoint=checkpoint,
            progress=False, desc=f"{target} lr={lr:.2g}", patience=ft.patience,
            min_epochs=ft.min_epochs,
        )
        out = {f"val_{k}": v for k, v in result.best_val.items()}
        out["epochs"] = result.epochs  # fewer than ``epochs`` when early stopping ended the run
        if test:
            metrics = evaluate(model, self.eval_loader(target, "test"), objective, self.device,
                               self.cfg.run.bf16)
            out.update({f"test_{k}": v for k, v in metrics.items()})
        return out

    def fine_tune(self, target: str, source: Path, name: str, search: bool = True,
                  chosen: tuple[float, float] | None = None,
                  ft: FinetuneConfig | None = None) -> dict[str, Any]:
        """Sec. 6.1.2 / 7.1.2 from the backbone in ``source``; writes nothing (see callers).
        ``ft`` replaces ``finetune``'s budget, search and seeds (the ``study`` cells)."""
        model = self.load_pretext(source)
        ft = self.cfg.finetune if ft is None else ft
        folder = self.path(target, "checkpoints")

        def train(lr: float, wd: float, seed: int, epochs: float, test: bool) -> dict[str, float]:
            ckpt = folder / f"{name}_{seed}.pt" if test and ft.save_checkpoints else None
            return self.train_eval(model, target, lr, wd, seed, epochs, test, ckpt)

        key = self.objective(target).key
        result = fine_tune_method(name, train, ft, key, search=search, chosen=chosen,
                                  shard=self.dist.shard, progress=self.progress)
        s = result["summary"][f"test_{key}"]
        stage = "only-ft" if name == "Only-FT" else "finetune"
        bad = [r.get("seed") for r in result.get("runs", [])
               if not all(math.isfinite(v) for v in r.values() if isinstance(v, float))]
        if bad or not math.isfinite(s["mean"]):
            raise NonFiniteStage(
                f"stage {stage!r} ({target} {name}): non-finite metrics (NaN/inf loss or weights) "
                f"for lr={result['lr']:.3g} wd={result['weight_decay']:.3g}, seeds {bad}; "
                "nothing was saved (lower finetune.lrs / finetune.lr_range?)")
        self.say(f"{target} {name}: lr={result['lr']:.3g} wd={result['weight_decay']:.3g} "
                 f"({result['trials']} trials), test {key} {100 * s['mean']:.2f} ± "
                 f"{100 * s['std']:.2f} over {s['n']} seeds")
        return result

    def _write(self, obj: dict[str, Any], target: str, name: str) -> None:
        self.on_main(lambda: write_json(obj, self.path(target, name)))

    def stage_only_ft(self, target: str) -> None:
        """The baseline: fine-tune the pretrained backbone; writes ``only_ft.json``."""
        name = "pretext_baseline.pt" if self.baseline_extra() else "pretext.pt"
        self._write(self.fine_tune(target, self.path(None, name), "Only-FT"), target,
                    "only_ft.json")

    def stage_finetune(self, target: str) -> None:
        """BiSSL+FT: fine-tune from θ_P; the full search again unless
        ``finetune.search_after_bissl`` is off. Writes ``bissl_ft.json``."""
        search = self.cfg.finetune.search_after_bissl
        chosen = None
        if not search:
            only = self.read_json(target, "only_ft.json")
            chosen = (only["lr"], only["weight_decay"])
        result = self.fine_tune(target, self.path(target, "bissl.pt"), "BiSSL+FT", search, chosen)
        self._write(result, target, "bissl_ft.json")

    def warmup_hparams(self, target: str) -> tuple[float, float]:
        """(lr, wd) of the head warm-up and the BiSSL upper level: the config's, else Only-FT's."""
        w = self.cfg.warmup
        if w.lr is not None and w.weight_decay is not None:
            return w.lr, w.weight_decay
        only = self.read_json(target, "only_ft.json")
        return (w.lr if w.lr is not None else only["lr"],
                w.weight_decay if w.weight_decay is not None else only["weight_decay"])

    def stage_head_warmup(self, target: str) -> None:
        """Train the head on the frozen pretrained backbone at a constant lr; writes
        ``warmup.pt``."""
        lr, wd = self.warmup_hparams(target)
        seed = self.cfg.run.seed
        seed_everything(seed)
        model = self.downstream_from(self.load_pretext(self.path(None, "pretext.pt")), target)
        epochs = self.warmup_epochs(target)
        if epochs > 0:
            result = fit(
                model, self.objective(target),
                self.train_loader(target, self.cfg.finetune.batch_size, seed),
                self.eval_loader(target, "val"), lambda named: self.optimizer(named, lr, wd),
                epochs=epochs, device=self.device, seed=seed,
                evals_per_epoch=self.cfg.finetune.evals_per_epoch, freeze=self.backbone_prefix,
                bf16=self.cfg.run.bf16, progress=self.progress, desc=f"{target} head warm-up",
                strict="head-warmup",
            )
            key = self.objective(target).key
            self.say(f"{target} head warm-up: lr={lr:.3g} wd={wd:.3g}, {epochs:g} epochs, val "
                     f"{key} {100 * result.best_val[key]:.2f}")
        check_weights("head-warmup", model.state_dict(), f"{target} downstream weights")
        save_checkpoint({"downstream": model.state_dict()}, self.path(target, "warmup.pt"))

    def stage_bissl(self, target: str, resume: bool = False) -> None:
        """Algorithm 2 from the pretrained pretext model and the warmed-up head; writes
        ``bissl.pt`` (θ_P, φ_P and θ_D, φ_D), ``bissl_history.json`` and the trainer's
        ``bissl/`` (metrics and checkpoint, which ``resume`` continues from)."""
        cfg = self.cfg.bissl
        lr, wd = self.warmup_hparams(target)
        seed = self.cfg.run.seed
        seed_everything(seed)
        pretext = self.load_pretext(self.path(None, "pretext.pt"))
        downstream = self.downstream_from(pretext, target)
        warm = load_checkpoint(self.require(self.path(target, "warmup.pt")))
        downstream.load_state_dict(warm["downstream"])
        downstream.to(self.device)
        world = self.dist.world_size
        upper_batch, lower_batch = bissl_batch_sizes(cfg, world)
        if cfg.sync_batchnorm and world > 1:
            convert_sync_batchnorm(pretext)
            convert_sync_batchnorm(downstream)
        history = run_bissl(
            cfg, self.bissl_losses(pretext, downstream, target),
            downstream=downstream, pretext=pretext,
            upper_optimizer=self.optimizer(list(downstream.named_parameters()), lr, wd),
            lower_optimizer=self.lower_optimizer(pretext),
            upper_data=self.train_loader(target, upper_batch, seed, self.dist.shard),
            lower_data=self.pretext_loader(lower_batch, derive_seed(seed, "bissl", target),
                                           self.dist.shard),
            device=self.device, bf16=self.cfg.run.bf16, out_dir=self.path(target, "bissl"),
            resume=resume, reducer=self.dist.reducer, progress=self.progress,
            callbacks=[transfer_monitor(self.monitor_data(target, pretext), cfg.monitor_every,
                                        cfg.monitor_knn_k, seed)] if cfg.monitor_every else [],
        )
        self.on_main(lambda: self._bissl_done(target, pretext, downstream, history))

    def _bissl_done(self, target: str, pretext: nn.Module, downstream: nn.Module,
                    history: list[dict[str, Any]]) -> None:
        check_weights("bissl", pretext.state_dict(), f"{target} pretext weights")
        check_weights("bissl", downstream.state_dict(), f"{target} downstream weights")
        save_checkpoint({"pretext": pretext.state_dict(), "downstream": downstream.state_dict()},
                        self.path(target, "bissl.pt"))
        write_json(history, self.path(target, "bissl_history.json"))
        last, upper_steps = history[-1], self.cfg.bissl.upper_steps
        breakdowns = sum(h["solver_breakdowns"] for h in history)
        self.say(f"{target} bissl: {len(history)} alternations, lower loss "
                 f"{last['lower_loss']:.3f}, upper loss {last['upper_loss']:.3f}, λ "
                 f"{last['lam']:.3g}, solver breakdowns {breakdowns} of "
                 f"{len(history) * upper_steps} solves")
