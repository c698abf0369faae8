"""GPT on GLUE: the conventional pipeline (Only FT) against BiSSL + FT (thesis chapter 7).

    python recipes/gpt_glue_bissl.py
        the embedded default: a small GPT, a locally trained BPE, a template corpus and seven
        synthetic GLUE-format tasks; nothing is downloaded (5 to 8 minutes on 2 CPU cores).
    python recipes/gpt_glue_bissl.py --config recipes/configs/gpt_glue_paper.yaml \\
            model.pretrained=DIR data.glue=GLUE_DIR data.corpus=BOOKS_DIR
        the paper setup (117M GPT, BooksCorpus, GLUE); ``key.sub=value`` overrides any setting.
    torchrun --nproc_per_node 4 recipes/gpt_glue_bissl.py --config ... (same arguments)
        the same pipeline on 4 processes (one per GPU; gloo on CPU).

Stages per task: grid search of the fine-tuning (lr, wd) and the multi-seed Only-FT retrain; head
warm-up on a frozen backbone; BiSSL (library trainer); fine-tuning from the BiSSL backbone θ_P with
the same seeds. Writes ``results.json`` and plots to ``out_dir`` and prints the table.

Under ``torchrun`` every rank runs the pipeline: pretraining and head warm-up identically on every
rank, the grid-search trials and seed runs spread round-robin over the ranks (same results as one
process), and BiSSL data-parallel (each rank a shard of both levels' batches, the configured batch
sizes split across the ranks). Rank 0 alone prints and writes the results.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recipes.common import (  # noqa: E402
    DistributedContext,
    aggregate,
    broadcast_module,
    config_to_dict,
    format_table,
    grid_search,
    init_distributed,
    load_config,
    per_rank_batch_size,
    plot_bars,
    plot_curves,
    retrain_over_seeds,
    seed_everything,
    write_json,
)
from recipes.nlp.bissl_stage import run_bissl  # noqa: E402
from recipes.nlp.config import RecipeConfig  # noqa: E402
from recipes.nlp.data import TaskData, load_task, make_tokenizer, pretext_loader  # noqa: E402
from recipes.nlp.finetune import evaluate, finetune, task_loader  # noqa: E402
from recipes.nlp.hub import resolve_pretrained  # noqa: E402
from recipes.nlp.model import GPTDownstreamModel, GPTPretextModel, build_gpt  # noqa: E402
from recipes.nlp.pretrain import pretrain  # noqa: E402
from recipes.nlp.tokenizer import TextEncoder, bpe_from_json  # noqa: E402

DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "gpt_glue_embedded.yaml"
CURVES = ("upper_loss", "lower_loss", "regularizer", "solver_relative_residual", "upper_grad_norm")


def downstream_model(
    backbone, task: TaskData, cfg: RecipeConfig, seed: int, device: torch.device
) -> GPTDownstreamModel:
    """A fresh downstream model: a copy of ``backbone`` and a head φ_D initialised from ``seed``."""
    torch.manual_seed(seed)
    spec = task.spec
    model = GPTDownstreamModel(
        copy.deepcopy(backbone),
        spec.num_special_tokens,
        spec.num_outputs,
        cfg.finetune.head_dropout,
    )
    return model.to(device)


def train_and_test(
    backbone,
    task: TaskData,
    cfg: RecipeConfig,
    lr: float,
    wd: float,
    seed: int,
    device: torch.device,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Fine-tune a fresh model from ``backbone``; best-validation weights, then the test score.

    Seeded only by ``seed``, so the result does not depend on which rank runs it or after what.
    """
    ft = cfg.finetune
    model = downstream_model(backbone, task, cfg, seed, device)
    result = finetune(
        model,
        task.spec,
        task.train,
        task.val,
        lr=lr,
        weight_decay=wd,
        epochs=ft.epochs,
        batch_size=ft.batch_size,
        nu=ft.nu,
        seed=seed,
        warmup_fraction=ft.warmup_fraction,
        evals_per_epoch=ft.evals_per_epoch,
        checkpoint=checkpoint,
        device=device,
        desc=f"{task.spec.name} lr={lr:.2g}",
        progress=progress,
    )
    return {"val": result.best_val, "test": evaluate(model, task.spec, task.test, device=device)}


def search_and_retrain(
    backbone,
    task: TaskData,
    cfg: RecipeConfig,
    ctx: DistributedContext,
    label: str,
    out_dir: Path,
    search: bool = True,
    chosen: tuple[float, float] | None = None,
) -> dict:
    """Grid search (unless ``chosen`` is given) then retrain the best (lr, wd) over the seeds;
    the trials and the seed runs are spread over the ranks of ``ctx``."""
    ft, device, quiet = cfg.finetune, ctx.device, not ctx.is_main
    trials = []
    if search or chosen is None:
        trials = grid_search(
            lambda lr, wd: train_and_test(
                backbone, task, cfg, lr, wd, ft.search_seed, device, progress=not quiet
            ),
            ft.lrs,
            ft.weight_decays,
            score_key="val",
            desc=f"{task.spec.name} {label} grid",
            shard=ctx.shard,
            progress=not quiet,
        )
        chosen = (trials[0].lr, trials[0].wd)
    lr, wd = chosen

    def run(seed: int) -> dict[str, float]:
        path = out_dir / "checkpoints" / f"{task.spec.name}_{label}_{seed}.pt"
        return train_and_test(
            backbone,
            task,
            cfg,
            lr,
            wd,
            seed,
            device,
            path if ft.save_checkpoints else None,
            progress=not quiet,
        )

    runs = retrain_over_seeds(
        run, ft.seeds, desc=f"{task.spec.name} {label} seeds", shard=ctx.shard, progress=not quiet
    )
    return {
        "lr": lr,
        "weight_decay": wd,
        "runs": runs,
        "summary": aggregate(runs),
        "grid": [{"lr": t.lr, "weight_decay": t.wd, **t.metrics} for t in trials],
    }


def bissl_batch_sizes(cfg: RecipeConfig, world_size: int) -> tuple[int, int]:
    """Per-rank (upper, lower) batch sizes of the BiSSL stage: ``finetune.batch_size`` and
    ``bissl.lower_batch_size`` split evenly over ``world_size`` ranks (``ValueError`` naming the
    key otherwise)."""
    return (
        per_rank_batch_size(cfg.finetune.batch_size, world_size, "finetune.batch_size"),
        per_rank_batch_size(cfg.bissl.lower_batch_size, world_size, "bissl.lower_batch_size"),
    )


def bissl_backbone(
    gpt,
    task: TaskData,
    cfg: RecipeConfig,
    lr: float,
    wd: float,
    lower_loader,
    ctx: DistributedContext,
    out_dir: Path,
) -> tuple[object, list]:
    """Head warm-up on a frozen backbone, then BiSSL; returns θ_P (a GPT) and the history.

    The warm-up runs whole on every rank; BiSSL is data-parallel over the ranks of ``ctx``
    (``lower_loader`` must already be this rank's shard).
    """
    ft, spec, device = cfg.finetune, task.spec, ctx.device
    down = downstream_model(gpt, task, cfg, cfg.seed, device)
    finetune(
        down,
        spec,
        task.train,
        task.val,
        lr=lr,
        weight_decay=wd,
        epochs=spec.head_warmup_epochs,
        batch_size=ft.batch_size,
        nu=ft.nu,
        seed=cfg.seed,
        evals_per_epoch=ft.evals_per_epoch,
        freeze_backbone=True,
        device=device,
        desc=f"{spec.name} head warm-up",
        progress=ctx.is_main,
    )
    pretext = GPTPretextModel(copy.deepcopy(gpt)).to(device)
    upper_batch, _ = bissl_batch_sizes(cfg, ctx.world_size)
    upper_loader = task_loader(
        task.train,
        upper_batch,
        shuffle=True,
        seed=cfg.seed,
        drop_last=len(task.train) // ctx.world_size > upper_batch,
        shard=ctx.shard,
    )
    history = run_bissl(
        down,
        pretext,
        spec,
        upper_loader,
        lower_loader,
        cfg.bissl,
        upper_lr=lr,
        upper_weight_decay=wd,
        nu=ft.nu,
        device=device,
        out_dir=out_dir / "bissl" / spec.name,
        reducer=ctx.reducer,
        progress=ctx.is_main,
    )
    return pretext.gpt, history


def shared_tokenizer(
    cfg: RecipeConfig, ctx: DistributedContext, expected_vocab: int | None
) -> TextEncoder:
    """The run's tokenizer. A locally trained BPE is trained on rank 0 alone and sent to the
    others, so every rank maps text to the same ids (and a real corpus is read once)."""
    m = cfg.model
    trained = (m.tokenizer if m.tokenizer is not None else m.pretrained) is None
    if ctx.world_size == 1 or not trained:
        return make_tokenizer(m, cfg.data, expected_vocab=expected_vocab)
    payload: list[Any] = [None]
    if ctx.is_main:
        payload[0] = make_tokenizer(m, cfg.data, expected_vocab=expected_vocab).tokenizer.to_str()
    dist.broadcast_object_list(payload, src=0)
    return bpe_from_json(payload[0])


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


def _main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, RecipeConfig, args.overrides)
    start = time.time()
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = init_distributed(cfg.device, timeout=timedelta(minutes=cfg.dist_timeout_minutes))
    _, lower_batch = bissl_batch_sizes(cfg, ctx.world_size)  # fails before any training
    device = ctx.device
    say = print if ctx.is_main else _silent
    out_dir = Path(cfg.out_dir)

    # model and tokenizer (fails fast when a hub reference cannot be reached)
    m = cfg.model
    if m.pretrained is not None:
        gpt = build_gpt(pretrained=resolve_pretrained(m.pretrained, "model"), dropout=m.dropout)
        encoder = shared_tokenizer(cfg, ctx, expected_vocab=gpt.config.vocab_size)
        context = min(m.context, gpt.config.n_positions)
    else:
        encoder = shared_tokenizer(cfg, ctx, expected_vocab=None)
        gpt = build_gpt(
            vocab_size=encoder.vocab_size,
            context=m.context,
            width=m.width,
            layers=m.layers,
            heads=m.heads,
            dropout=m.dropout,
        )
        context = m.context
    gpt = gpt.to(device)
    if ctx.is_main:
        encoder.save(out_dir)  # the token ids of this run, for anyone reusing its checkpoints
    say(
        f"GPT: {sum(p.numel() for p in gpt.parameters()) / 1e6:.2f}M parameters, "
        f"vocabulary {encoder.vocab_size} ({encoder.source}), context {context}"
        + (f"; {ctx.world_size} ranks" if ctx.world_size > 1 else "")
    )

    # data: every task is loaded before any training, so a missing one fails early
    tasks = {name: load_task(name, cfg.data, encoder, context) for name in cfg.data.tasks}
    for name, t in tasks.items():
        say(
            f"{name}: {len(t.train)} train / {len(t.val)} val / {len(t.test)} test "
            f"({t.dropped} dropped for length)"
        )
    b = cfg.bissl
    lower_loader = pretext_loader(
        cfg.data,
        encoder,
        context,
        lower_batch,
        num_batches=b.alternations * (b.lower_steps + 1),
        shard=ctx.shard,
        seed=cfg.seed,
    )

    # pretext pretraining (embedded run only; a pretrained GPT skips it), whole on every rank
    pretrain_losses: list[float] = []
    if cfg.pretrain.steps:
        loader = pretext_loader(
            cfg.data, encoder, context, cfg.pretrain.batch_size, num_batches=cfg.pretrain.steps
        )
        pretrain_losses = pretrain(
            GPTPretextModel(gpt), loader, cfg.pretrain, device, progress=ctx.is_main
        )
    # Every trial on every rank must start from the same backbone, even where the ranks' kernels
    # round differently (GPU).
    broadcast_module(gpt)

    results: dict = {"config": config_to_dict(cfg), "tasks": {}, "pretrain_loss": pretrain_losses}
    summary: dict = {"Only FT": {}, "BiSSL + FT": {}}
    for name, task in tasks.items():
        only = search_and_retrain(gpt, task, cfg, ctx, "only_ft", out_dir)
        theta_p, history = bissl_backbone(
            gpt, task, cfg, only["lr"], only["weight_decay"], lower_loader, ctx, out_dir
        )
        both = search_and_retrain(
            theta_p,
            task,
            cfg,
            ctx,
            "bissl_ft",
            out_dir,
            search=cfg.finetune.search_after_bissl,
            chosen=(only["lr"], only["weight_decay"]),
        )
        results["tasks"][name] = {
            "metric": task.spec.metric,
            "only_ft": only,
            "bissl_ft": both,
            "bissl_history": history,
            "dropped": task.dropped,
        }
        summary["Only FT"][name] = only["summary"]["test"]
        summary["BiSSL + FT"][name] = both["summary"]["test"]
        if not ctx.is_main:
            continue
        plot_bars(
            {k: {name: v[name]} for k, v in summary.items()},
            name,
            out_dir / "plots" / f"{name}.png",
            title=f"{name} ({task.spec.metric}, test)",
            scale=100,
        )
        curves = {
            k: [float(h[k]) for h in history]
            for k in history[0]
            if isinstance(history[0][k], (int, float)) and k != "alternation"
        }
        if curves:
            plot_curves(
                curves,
                out_dir / "plots" / f"{name}_bissl.png",
                xlabel="alternation",
                title=f"BiSSL on {name}",
            )

    table = format_table(summary, list(tasks), scale=100)
    results["summary"] = summary
    results["table"] = table
    results["world_size"] = ctx.world_size
    results["wall_time_s"] = time.time() - start
    if ctx.is_main:
        write_json(results, out_dir / "results.json")
    say(f"\nTest scores ×100 (mean ± std over {len(cfg.finetune.seeds)} seeds):\n{table}")
    say(f"wall time {results['wall_time_s'] / 60:.1f} min; results in {out_dir}")
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe (see the module docstring); returns the results dict it writes.

    Under ``torchrun`` every rank returns the same results; the process group this call joined
    is destroyed before it returns.
    """
    # Denormals slow the small CPU GPT down by orders of magnitude; flushing them is a
    # process-wide FPU setting, so it is restored for whoever called us (e.g. a test session),
    # as is the thread count that ``threads`` sets.
    was_flushing = sys.float_info.min / 2 == 0.0
    threads = torch.get_num_threads()
    joined_group = not (dist.is_available() and dist.is_initialized())
    torch.set_flush_denormal(True)
    try:
        return _main(argv)
    finally:
        torch.set_flush_denormal(was_flushing)
        torch.set_num_threads(threads)
        if joined_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
