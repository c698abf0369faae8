"""Hyperparameter search of (learning rate, weight decay), multi-seed retraining, and a
fine-tuning method end to end (:func:`fine_tune_method`: search, retrain over seeds, aggregate).

Random search (vision, thesis Sec. 6.1.2) and the exhaustive grid (GPT, Sec. 7.1.2: 8 × 4).

Under ``torchrun`` the trials (and the seed retrains) are independent runs, so they are spread
over the ranks rather than split into data-parallel shards: with ``shard=(rank, world_size)``
trial ``i`` runs on rank ``i % world_size`` and every rank receives all results in the
single-process order (:func:`map_over_ranks`). Each trial must seed itself from its own
arguments, never from the rank or from what ran before it, for the results to equal those of one
process.

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

import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch.distributed as dist
from tqdm.auto import tqdm

from .report import aggregate
from .runtime import check_shard

if TYPE_CHECKING:
    from .settings import FinetuneConfig

__all__ = [
    "RankFailure",
    "Trial",
    "fine_tune_method",
    "grid_search",
    "log_uniform_grid",
    "map_over_ranks",
    "random_search",
    "retrain_over_seeds",
    "select_trial",
]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Trial:
    """One hyperparameter trial: its (lr, wd), the selection score and all reported metrics."""

    lr: float
    wd: float
    score: float
    metrics: dict[str, float] = field(default_factory=dict)


class RankFailure(RuntimeError):
    """A trial failed on another rank (raised on the ranks whose own trials succeeded)."""


def map_over_ranks(
    fn: Callable[[T], R],
    items: Iterable[T],
    shard: tuple[int, int] | None = None,
    *,
    desc: str = "",
    progress: bool = True,
    leave: bool = True,
) -> list[R]:
    """Return ``[fn(x) for x in items]``, the calls spread round-robin over the ranks.

    With ``shard=(rank, world_size)`` (``DistributedContext.shard``) item ``i`` is computed on
    rank ``i % world_size`` and the results are exchanged with ``all_gather_object``, so every
    rank returns the same list, in the order of ``items``. Every rank must call it with the same
    items. Without ``shard`` (or with one rank) it is a plain loop. The results must be picklable.

    A call that raises on one rank does not leave the others waiting at the exchange: the error
    is exchanged too, re-raised on its rank and reported as :class:`RankFailure` on the others.
    """
    items = list(items)
    rank, world = check_shard(shard)
    mine = range(rank, len(items), world)
    if world == 1:
        return [fn(items[i]) for i in tqdm(mine, desc=desc, disable=not progress, leave=leave)]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world:
        raise RuntimeError(
            f"shard {shard} needs an initialised process group of {world} ranks "
            "(init_distributed under torchrun)"
        )
    local: dict[int, R] = {}
    error: BaseException | None = None
    failure: tuple[int, str] | None = None
    for i in tqdm(mine, desc=desc, disable=not progress, leave=leave):
        try:
            local[i] = fn(items[i])
        except Exception as err:  # exchanged below so that no rank waits for a dead one
            error, failure = err, (i, f"{type(err).__name__}: {err}")
            break
    gathered: list[tuple[dict[int, R], tuple[int, str] | None] | None] = [None] * world
    dist.all_gather_object(gathered, (local, failure))
    if error is not None:
        raise error
    for other, entry in enumerate(gathered):
        assert entry is not None
        if entry[1] is not None:
            index, message = entry[1]
            raise RankFailure(f"item {index} ({items[index]!r}) failed on rank {other}: {message}")
    merged: dict[int, R] = {}
    for entry in gathered:
        assert entry is not None
        merged.update(entry[0])
    return [merged[i] for i in range(len(items))]


def _sorted_trials(trials: list[Trial], maximize: bool) -> list[Trial]:
    def key(t: Trial) -> float:
        if math.isnan(t.score):
            return math.inf
        return -t.score if maximize else t.score

    return sorted(trials, key=key)


def _run_trials(
    objective: Callable[[float, float], dict[str, float]],
    pairs: list[tuple[float, float]],
    score_key: str,
    shard: tuple[int, int] | None,
    desc: str,
    progress: bool,
    leave: bool,
) -> list[Trial]:
    def trial(pair: tuple[float, float]) -> Trial:
        lr, wd = pair
        metrics = objective(lr, wd)
        if score_key not in metrics:
            raise KeyError(f"objective returned no {score_key!r} (got {sorted(metrics)})")
        return Trial(lr, wd, float(metrics[score_key]), dict(metrics))

    return map_over_ranks(trial, pairs, shard, desc=desc, progress=progress, leave=leave)


def log_uniform_grid(
    n: int, lr_range: tuple[float, float], wd_range: tuple[float, float], seed: int = 0
) -> list[tuple[float, float]]:
    """``n`` pairs (lr, wd), each drawn independently log-uniformly from its closed range."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for name, (lo, hi) in (("lr_range", lr_range), ("wd_range", wd_range)):
        if not 0 < lo <= hi:
            raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
    rng = random.Random(seed)

    def draw(lo: float, hi: float) -> float:
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))

    return [(draw(*lr_range), draw(*wd_range)) for _ in range(n)]


def random_search(
    objective: Callable[[float, float], dict[str, float]],
    n_trials: int,
    lr_range: tuple[float, float],
    wd_range: tuple[float, float],
    *,
    score_key: str,
    maximize: bool = True,
    seed: int = 0,
    desc: str = "search",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> list[Trial]:
    """Evaluate ``objective(lr, wd) -> metrics`` on ``n_trials`` log-uniform draws and return the
    trials sorted best first by ``metrics[score_key]``. NaN scores sort last.

    ``shard=(rank, world_size)`` spreads the trials over the ranks (:func:`map_over_ranks`).
    """
    pairs = log_uniform_grid(n_trials, lr_range, wd_range, seed)
    trials = _run_trials(objective, pairs, score_key, shard, desc, progress, leave=True)
    return _sorted_trials(trials, maximize)


def retrain_over_seeds(
    run: Callable[[int], dict[str, float]],
    seeds: Sequence[int],
    desc: str = "seeds",
    *,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Call ``run(seed)`` for every seed (the chosen config retrained) and collect the metrics in
    the order of ``seeds``; ``shard`` spreads the runs over the ranks (:func:`map_over_ranks`)."""
    if not seeds:
        raise ValueError("seeds must not be empty")
    return map_over_ranks(
        lambda seed: dict(run(seed)), list(seeds), shard, desc=desc, progress=progress
    )


def grid_search(
    objective: Callable[[float, float], dict[str, float]],
    lrs: Sequence[float],
    wds: Sequence[float],
    *,
    score_key: str,
    desc: str = "grid",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> list[Trial]:
    """Evaluate ``objective(lr, wd)`` on every pair and return the trials best first (higher
    ``metrics[score_key]`` is better; NaN sorts last); ``shard`` spreads the trials over the
    ranks (:func:`map_over_ranks`)."""
    if not lrs or not wds:
        raise ValueError("the grid needs at least one learning rate and one weight decay")
    pairs = list(itertools.product(lrs, wds))
    trials = _run_trials(objective, pairs, score_key, shard, desc, progress, leave=False)
    return _sorted_trials(trials, maximize=True)


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
