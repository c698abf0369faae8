"""A fine-tuning method end to end: (lr, wd) search, retrain over seeds, aggregate.

The one result schema of both recipes (``only_ft.json``, ``bissl_ft.json`` and the entries of
``results.json``)::

    {"method": "Only-FT", "lr": 0.03, "weight_decay": 0.001, "selection": "metric",
     "trials": 50,                                   # search trials run (0: none)
     "search": [{"lr", "weight_decay", "score", "val_<metric>", ...}, ...],   # best first
     "runs": [{"seed", "val_<metric>", ..., "test_<metric>", ..., "epochs"}, ...],
     "summary": {"test_<metric>": {"mean", "std", "n"}, ..., "epochs": {...}}}

``epochs`` is the number of epochs a run trained: ``finetune.epochs``, or fewer when early
stopping (``finetune.patience``) ended it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .report import aggregate
from .search import Trial, grid_search, random_search, retrain_over_seeds
from .settings import FinetuneConfig

__all__ = ["fine_tune_method", "select_trial"]

# train(lr, wd, seed, epochs, test) -> {"val_<m>": ..., "test_<m>": ...} (test_* only if test)
TrainFn = Callable[[float, float, int, float, bool], dict[str, float]]


def select_trial(trials: list[Trial], rule: str, key: str) -> Trial:
    """The chosen trial: the best ``val_<key>`` (``rule="metric"``), or the best sum of its
    ranks by ``val_<key>`` (high first) and by ``val_loss`` (low first) (``"loss-tradeoff"``),
    ties to the better metric. ``trials`` arrive sorted best metric first."""
    if rule == "metric" or len(trials) == 1:
        return trials[0]

    def loss(t: Trial) -> float:
        value = t.metrics.get("val_loss", math.inf)
        return value if math.isfinite(value) else math.inf

    by_loss = sorted(range(len(trials)), key=lambda i: loss(trials[i]))
    loss_rank = {i: r for r, i in enumerate(by_loss)}
    best = min(range(len(trials)), key=lambda i: (i + loss_rank[i], i))
    return trials[best]


def fine_tune_method(
    name: str,
    train: TrainFn,
    cfg: FinetuneConfig,
    key: str,
    *,
    search: bool = True,
    chosen: tuple[float, float] | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Search (lr, wd) on validation, retrain the choice over ``cfg.seeds``, test, aggregate.

    Without ``search`` the pair ``chosen`` (or the config's ``lr``/``weight_decay``) is used.
    Every trial runs with ``cfg.search_seed``; the trials and the seed runs are spread over the
    ranks of ``shard`` (each seeded by its own arguments, so the results equal one process's).
    """
    trials: list[Trial] = []
    lr, wd = chosen if chosen is not None else (cfg.lr, cfg.weight_decay)
    if search and cfg.search != "none":
        epochs = cfg.search_epochs or cfg.epochs

        def objective(lr_: float, wd_: float) -> dict[str, float]:
            return train(lr_, wd_, cfg.search_seed, epochs, False)

        common = dict(score_key=f"val_{key}", desc=f"{name} search", shard=shard,
                      progress=progress)
        if cfg.search == "random":
            trials = random_search(objective, cfg.search_trials, tuple(cfg.lr_range),
                                   tuple(cfg.wd_range), seed=cfg.search_seed, **common)
        else:
            trials = grid_search(objective, cfg.lrs, cfg.weight_decays, **common)
        best = select_trial(trials, cfg.select, key)
        lr, wd = best.lr, best.wd

    def retrain(seed: int) -> dict[str, float]:
        return {"seed": seed, **train(lr, wd, seed, cfg.epochs, True)}

    runs = retrain_over_seeds(retrain, cfg.seeds, desc=f"{name} seeds", shard=shard,
                              progress=progress)
    summary = aggregate([{k: v for k, v in r.items() if k != "seed"} for r in runs])
    return {
        "method": name,
        "lr": lr,
        "weight_decay": wd,
        "selection": cfg.select,
        "trials": len(trials),
        "search": [{"lr": t.lr, "weight_decay": t.wd, "score": t.score, **t.metrics}
                   for t in trials],
        "runs": runs,
        "summary": summary,
    }
