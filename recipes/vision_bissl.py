"""BiSSL for vision: SimCLR pretraining -> head warm-up -> BiSSL -> fine-tuning, vs. Only-FT.

    python recipes/vision_bissl.py                       # everything, embedded digits, CPU
    python recipes/vision_bissl.py pretext               # one stage (reads earlier stages' files)
    python recipes/vision_bissl.py all --config recipes/configs/vision_small.yaml \
        --set data.pretext_root=/data/stl10 --set data.downstream_root=/data/pets
    python recipes/vision_bissl.py sweep --param lam     # a Table 6.2 grid, one results table

Stages (thesis chapter 6) and the files they leave in ``run.out_dir``:

    pretext       SimCLR from scratch (LARS)                          pretext.pt
    only-ft       random search of (lr, wd), retrain over seeds       only_ft.json
    head-warmup   linear head on the frozen pretrained backbone       warmup.pt
    bissl         Algorithm 2 (implicitbilevel.bissl.BiSSLTrainer)    bissl.pt, bissl/metrics.jsonl
    finetune      fine-tune from θ_P: search, retrain over seeds      bissl_ft.json
    all           the five above in this order, then the report       results.json, *.png

The head warm-up takes Only-FT's chosen (lr, wd) unless ``warmup.lr`` is set, hence the order.

Under ``torchrun --nproc_per_node N`` the ``bissl`` stage runs data-parallel (batch sizes split
over the ranks, BatchNorm synchronised) and ``only-ft``/``finetune`` spread their search trials
and seed runs over the ranks, with the results of one process; ``pretext`` and ``head-warmup`` run
in a single process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``recipes`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from implicitbilevel.sync_batchnorm import convert_sync_batchnorm
from recipes.common import (
    aggregate,
    config_to_dict,
    format_table,
    init_distributed,
    load_checkpoint,
    load_config,
    per_rank_batch_size,
    plot_bars,
    plot_curves,
    random_search,
    retrain_over_seeds,
    save_checkpoint,
    seed_everything,
    write_json,
)
from recipes.vision.bissl_stage import run_bissl
from recipes.vision.config import VisionConfig
from recipes.vision.loaders import Loaders, build_loaders
from recipes.vision.models import Downstream, Pretext, build_backbone
from recipes.vision.train import evaluate, fit_downstream, pretrain_simclr

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "vision_embedded.yaml"
STAGES = ("pretext", "only-ft", "head-warmup", "bissl", "finetune")
# Stages that run under torchrun: the data-parallel BiSSL stage and the two fine-tuning stages,
# whose search trials and seed runs are independent and spread over the ranks.
RANK_STAGES = ("only-ft", "bissl", "finetune")
SWEEPS = {  # --param -> (config key, SweepConfig attribute)
    "lam": ("bissl.lam", "lam"),
    "alternations": ("bissl.alternations", "alternations"),
    "upper_steps": ("bissl.upper_steps", "upper_steps"),
    "lower_steps": ("bissl.lower_steps", "lower_steps"),
    "finetune_epochs": ("finetune.epochs", "finetune_epochs"),
}


# ------------------------------------------------------------------------------------------------
# config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: a stage (default ``all``), a config file and ``--set key=value`` overrides."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", nargs="?", default="all", choices=("all", *STAGES, "sweep"))
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set bissl.lam=0.01 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue a killed BiSSL stage")
    p.add_argument("--param", choices=sorted(SWEEPS), default="lam", help="what `sweep` varies")
    return p.parse_args(argv)


class Run:
    """What every stage needs: the config, the device, the data and the output folder."""

    def __init__(self, cfg: VisionConfig, out_dir: Path | None = None) -> None:
        self.cfg = cfg
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        self.dist = init_distributed(cfg.run.device)
        self.device = self.dist.device
        self.out = Path(cfg.run.out_dir if out_dir is None else out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data: Loaders = build_loaders(cfg.data, self.device)
        self.progress = cfg.run.progress
        self.metric = "map" if self.data.multilabel else "top1"

    def seeds(self) -> list[int]:
        """The seeds of the retrains."""
        return [self.cfg.run.seed + i for i in range(self.cfg.finetune.seeds)]

    # -- models ------------------------------------------------------------------------------

    def new_backbone(self) -> torch.nn.Module:
        m = self.cfg.model
        return build_backbone(m.backbone, width=m.width, small_stem=m.small_stem)

    def new_pretext(self) -> Pretext:
        return Pretext(self.new_backbone(), self.cfg.model.proj_dim)

    def load_pretext(self, name: str = "pretext.pt") -> Pretext:
        model = self.new_pretext()
        path = self.out / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the stage that writes it first")
        model.load_state_dict(load_checkpoint(path)["pretext"])
        return model

    def downstream_from(self, pretext: Pretext) -> Downstream:
        """A downstream model with a fresh linear head on a copy of ``pretext``'s backbone."""
        backbone = self.new_backbone()
        backbone.load_state_dict(pretext.backbone.state_dict())
        return Downstream(backbone, self.data.num_classes)

    def read_json(self, name: str) -> dict[str, Any]:
        path = self.out / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the stage that writes it first")
        return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# stages


def stage_pretext(run: Run) -> None:
    """SimCLR pretraining from scratch; writes ``pretext.pt``."""
    cfg = run.cfg.pretext
    seed_everything(run.cfg.run.seed)
    model = run.new_pretext()
    losses = pretrain_simclr(
        model,
        run.data.pretext(cfg.batch_size, run.cfg.run.seed),
        epochs=cfg.epochs,
        lr=cfg.lr,
        warmup_epochs=cfg.warmup_epochs,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        trust_coefficient=cfg.trust_coefficient,
        temperature=cfg.temperature,
        device=run.device,
        bf16=run.cfg.run.bf16,
        progress=run.progress,
    )
    save_checkpoint({"pretext": model.state_dict(), "losses": losses}, run.out / "pretext.pt")
    print(
        f"pretext: NT-Xent {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} epochs"
        if losses
        else "pretext: 0 epochs (random backbone)"
    )


def fine_tune_method(run: Run, source: Pretext, name: str) -> dict[str, Any]:
    """Sec. 6.1.2 from the backbone of ``source``: random search of (lr, wd) on validation,
    then retrain the chosen config over the seeds and evaluate on test."""
    ft, rc = run.cfg.finetune, run.cfg.run

    def train(lr: float, wd: float, seed: int, epochs: int) -> tuple[Downstream, dict]:
        seed_everything(seed)
        model = run.downstream_from(source)
        result = fit_downstream(
            model,
            run.data.train(ft.batch_size, seed),
            run.data.val(ft.batch_size),
            epochs=epochs,
            lr=lr,
            weight_decay=wd,
            momentum=ft.momentum,
            multilabel=run.data.multilabel,
            device=run.device,
            bf16=rc.bf16,
            progress=False,
            desc=name,
        )
        return model, result.best_val

    search: list[dict[str, Any]] = []
    lr, wd = ft.lr, ft.weight_decay
    if ft.search_trials > 0:
        epochs = ft.search_epochs if ft.search_epochs > 0 else ft.epochs
        trials = random_search(
            lambda lr_, wd_: train(lr_, wd_, rc.seed, epochs)[1],
            ft.search_trials,
            (ft.lr_range[0], ft.lr_range[1]),
            (ft.wd_range[0], ft.wd_range[1]),
            score_key=run.metric,
            seed=rc.seed,
            desc=f"{name} search",
            shard=run.dist.shard,
            progress=run.dist.is_main,
        )
        lr, wd = trials[0].lr, trials[0].wd
        search = [{"lr": t.lr, "wd": t.wd, **t.metrics} for t in trials]

    def retrain(seed: int) -> dict[str, float]:
        model, val = train(lr, wd, seed, ft.epochs)
        test = evaluate(model, run.data.test(ft.batch_size), run.device, run.data.multilabel)
        return {
            **{f"test_{k}": v for k, v in test.items()},
            **{f"val_{k}": v for k, v in val.items()},
        }

    runs = retrain_over_seeds(
        retrain, run.seeds(), desc=f"{name} seeds", shard=run.dist.shard,
        progress=run.dist.is_main,
    )
    out = {
        "chosen": {"lr": lr, "wd": wd},
        "search": search,
        "runs": runs,
        "summary": aggregate(runs),
    }
    s = out["summary"][f"test_{run.metric}"]
    if not run.dist.is_main:
        return out
    print(
        f"{name}: lr={lr:.3g} wd={wd:.3g}  test {run.metric} "
        f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} over {s['n']} seeds"
    )
    return out


def stage_only_ft(run: Run) -> None:
    """The baseline: fine-tune the pretrained backbone; writes ``only_ft.json``."""
    result = fine_tune_method(run, run.load_pretext(), "Only-FT")
    if run.dist.is_main:
        write_json(result, run.out / "only_ft.json")


def warmup_hparams(run: Run) -> tuple[float, float]:
    """(lr, wd) of the head warm-up and the BiSSL upper level: the config's, else Only-FT's."""
    w = run.cfg.warmup
    if w.lr is not None and w.weight_decay is not None:
        return w.lr, w.weight_decay
    chosen = run.read_json("only_ft.json")["chosen"]
    lr = w.lr if w.lr is not None else chosen["lr"]
    return lr, (w.weight_decay if w.weight_decay is not None else chosen["wd"])


def stage_head_warmup(run: Run) -> None:
    """Train the linear head on the frozen pretrained backbone at a constant lr; writes
    ``warmup.pt``."""
    lr, wd = warmup_hparams(run)
    seed_everything(run.cfg.run.seed)
    model = run.downstream_from(run.load_pretext())
    if run.cfg.warmup.epochs > 0:
        bs = run.cfg.finetune.batch_size
        result = fit_downstream(
            model,
            run.data.train(bs, run.cfg.run.seed),
            run.data.val(bs),
            epochs=run.cfg.warmup.epochs,
            lr=lr,
            weight_decay=wd,
            momentum=run.cfg.finetune.momentum,
            freeze_backbone=True,
            cosine=False,
            multilabel=run.data.multilabel,
            device=run.device,
            bf16=run.cfg.run.bf16,
            progress=run.progress,
            desc="head warm-up",
        )
        print(
            f"head warm-up: lr={lr:.3g} wd={wd:.3g}, val {run.metric} "
            f"{100 * result.best_val[run.metric]:.2f}"
        )
    save_checkpoint({"downstream": model.state_dict()}, run.out / "warmup.pt")


def stage_bissl(run: Run, resume: bool = False) -> None:
    """Algorithm 2 from the pretrained pretext model and the warmed-up head; writes
    ``bissl.pt`` (θ_P, φ_P and θ_D, φ_D) and ``bissl_history.json``."""
    cfg = run.cfg.bissl
    lr, wd = warmup_hparams(run)
    seed_everything(run.cfg.run.seed)
    pretext = run.load_pretext()
    downstream = run.downstream_from(pretext)
    path = run.out / "warmup.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the head-warmup stage first")
    downstream.load_state_dict(load_checkpoint(path)["downstream"])
    world = run.dist.world_size
    lower_batch = per_rank_batch_size(cfg.lower_batch_size, world, "bissl.lower_batch_size")
    upper_batch = per_rank_batch_size(cfg.upper_batch_size, world, "bissl.upper_batch_size")
    if cfg.sync_batchnorm and world > 1:
        convert_sync_batchnorm(pretext)
        convert_sync_batchnorm(downstream)
    history = run_bissl(
        pretext,
        downstream,
        run.data.pretext(lower_batch, run.cfg.run.seed, run.dist.shard),
        run.data.train(upper_batch, run.cfg.run.seed, run.dist.shard),
        cfg,
        upper_lr=lr,
        upper_weight_decay=wd,
        temperature=run.cfg.pretext.temperature,
        momentum=run.cfg.pretext.momentum,
        trust_coefficient=run.cfg.pretext.trust_coefficient,
        device=run.device,
        bf16=run.cfg.run.bf16,
        out_dir=run.out / "bissl",
        resume=resume,
        progress=run.progress and run.dist.is_main,
        reducer=run.dist.reducer,
    )
    if not run.dist.is_main:
        return
    save_checkpoint(
        {"pretext": pretext.state_dict(), "downstream": downstream.state_dict()},
        run.out / "bissl.pt",
    )
    write_json(history, run.out / "bissl_history.json")
    last = history[-1]
    breakdowns = sum(h["solver_breakdowns"] for h in history)
    print(
        f"bissl: {len(history)} alternations, lower loss {last['lower_loss']:.3f}, "
        f"upper loss {last['upper_loss']:.3f}, λ {last['lam']:.3g}, solver breakdowns "
        f"{breakdowns} of {len(history) * cfg.upper_steps} solves"
    )


def stage_finetune(run: Run) -> None:
    """Fine-tune from θ_P (the BiSSL lower-level backbone); writes ``bissl_ft.json``."""
    result = fine_tune_method(run, run.load_pretext("bissl.pt"), "BiSSL+FT")
    if run.dist.is_main:
        write_json(result, run.out / "bissl_ft.json")


# ------------------------------------------------------------------------------------------------
# report


def report(run: Run, wall_seconds: float | None = None) -> dict[str, Any]:
    """Print BiSSL+FT vs Only-FT (mean ± std over seeds), write ``results.json`` and plots."""
    only, bissl = run.read_json("only_ft.json"), run.read_json("bissl_ft.json")
    summary = {"Only-FT": only["summary"], "BiSSL+FT": bissl["summary"]}
    metrics = [f"test_{run.metric}"] + (["test_top5"] if run.metric == "top1" else [])
    table = format_table(summary, metrics, scale=100.0)
    diff = (bissl["summary"][metrics[0]]["mean"] - only["summary"][metrics[0]]["mean"]) * 100
    print(
        f"\n{table}\navg diff ({metrics[0]}): {diff:+.2f} points "
        f"({only['summary'][metrics[0]]['n']} seeds)\n"
    )
    history = json.loads((run.out / "bissl_history.json").read_text())
    pre_losses = load_checkpoint(run.out / "pretext.pt").get("losses", [])
    results = {
        "config": config_to_dict(run.cfg),
        "metric": run.metric,
        "table": table,
        "avg_diff_points": diff,
        "only_ft": only,
        "bissl_ft": bissl,
        "pretext_losses": pre_losses,
        "bissl_history": history,
        "wall_seconds": wall_seconds,
    }
    write_json(results, run.out / "results.json")
    plot_bars(summary, metrics[0], run.out / "accuracy.png", title="test accuracy", scale=100)
    keys = ["lower_loss", "upper_loss", "lam", "regularizer", "solver_relative_residual"]
    series = {k: [h[k] for h in history] for k in keys if k in history[0]}
    plot_curves(
        series,
        run.out / "bissl_curves.png",
        xlabel="alternation",
        logy=("lam", "regularizer", "solver_relative_residual"),
    )
    if pre_losses:
        plot_curves({"NT-Xent": pre_losses}, run.out / "pretext_loss.png", xlabel="epoch")
    print(f"wrote {run.out / 'results.json'} and plots in {run.out}")
    return results


def sweep(cfg_path: str, overrides: list[str], param: str) -> None:
    """Vary one hyperparameter over its Table 6.2 grid; writes ``sweep_<param>.json`` and prints
    one table. Pretext, Only-FT and the head warm-up are shared by all values (all but pretext
    are redone per value when fine-tuning epochs are swept)."""
    base = load_config(cfg_path, VisionConfig, overrides)
    key, attr = SWEEPS[param]
    run = Run(base)
    per_value = param == "finetune_epochs"
    if not (run.out / "pretext.pt").exists():
        stage_pretext(run)
    if not per_value and not (run.out / "only_ft.json").exists():
        stage_only_ft(run)
    if not per_value and not (run.out / "warmup.pt").exists():
        stage_head_warmup(run)
    shared = ["pretext.pt"] if per_value else ["pretext.pt", "only_ft.json", "warmup.pt"]
    summary: dict[str, Any] = {}
    if not per_value:
        summary["Only-FT"] = run.read_json("only_ft.json")["summary"]
    for value in getattr(base.sweep, attr):
        cfg = load_config(cfg_path, VisionConfig, [*overrides, f"{key}={value}"])
        vrun = Run(cfg, run.out / f"sweep_{param}" / str(value))
        for name in shared:
            (vrun.out / name).write_bytes((run.out / name).read_bytes())
        if per_value:
            stage_only_ft(vrun)
            stage_head_warmup(vrun)
            summary[f"Only-FT {key}={value}"] = vrun.read_json("only_ft.json")["summary"]
        stage_bissl(vrun)
        stage_finetune(vrun)
        summary[f"BiSSL+FT {key}={value}"] = vrun.read_json("bissl_ft.json")["summary"]
    table = format_table(summary, [f"test_{run.metric}"], scale=100.0)
    print(f"\nsweep over {key}\n{table}")
    write_json({"param": key, "table": table, "summary": summary}, run.out / f"sweep_{param}.json")


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the requested stage(s)."""
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # stage summaries appear as they finish
    if args.stage == "sweep":
        sweep(args.config, args.overrides, args.param)
        return
    cfg = load_config(args.config, VisionConfig, args.overrides)
    start = time.perf_counter()
    run = Run(cfg)
    if run.dist.world_size > 1 and args.stage not in RANK_STAGES:
        raise SystemExit(
            f"under torchrun ({run.dist.world_size} processes) only the stages "
            f"{', '.join(map(repr, RANK_STAGES))} run (BiSSL data-parallel, the fine-tuning "
            "trials and seeds spread over the ranks); run the others in a single process"
        )
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        t0 = time.perf_counter()
        if stage == "pretext":
            stage_pretext(run)
        elif stage == "only-ft":
            stage_only_ft(run)
        elif stage == "head-warmup":
            stage_head_warmup(run)
        elif stage == "bissl":
            stage_bissl(run, resume=args.resume)
        else:
            stage_finetune(run)
        if run.dist.is_main:
            print(f"[{stage}] {time.perf_counter() - t0:.1f} s")
    if args.stage == "all":
        wall = time.perf_counter() - start
        report(run, wall)
        print(f"total wall time {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
