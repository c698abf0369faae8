"""Hyperparameter search of (learning rate, weight decay) and multi-seed retraining.

Random search (vision, thesis Sec. 6.1.2) and the exhaustive grid (GPT, Sec. 7.1.2: 8 × 4).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

__all__ = ["Trial", "grid_search", "log_uniform_grid", "random_search", "retrain_over_seeds"]


@dataclass
class Trial:
    """One hyperparameter trial: its (lr, wd), the selection score and all reported metrics."""

    lr: float
    wd: float
    score: float
    metrics: dict[str, float] = field(default_factory=dict)


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
) -> list[Trial]:
    """Evaluate ``objective(lr, wd) -> metrics`` on ``n_trials`` log-uniform draws and return the
    trials sorted best first by ``metrics[score_key]``. NaN scores sort last."""
    trials = []
    for lr, wd in tqdm(log_uniform_grid(n_trials, lr_range, wd_range, seed), desc=desc):
        metrics = objective(lr, wd)
        if score_key not in metrics:
            raise KeyError(f"objective returned no {score_key!r} (got {sorted(metrics)})")
        trials.append(Trial(lr, wd, float(metrics[score_key]), dict(metrics)))

    def key(t: Trial) -> float:
        if math.isnan(t.score):
            return math.inf
        return -t.score if maximize else t.score

    return sorted(trials, key=key)


def retrain_over_seeds(
    run: Callable[[int], dict[str, float]], seeds: Sequence[int], desc: str = "seeds"
) -> list[dict[str, float]]:
    """Call ``run(seed)`` for every seed (the chosen config retrained) and collect the metrics."""
    if not seeds:
        raise ValueError("seeds must not be empty")
    return [dict(run(seed)) for seed in tqdm(list(seeds), desc=desc)]


def grid_search(
    objective: Callable[[float, float], dict[str, float]],
    lrs: Sequence[float],
    wds: Sequence[float],
    *,
    score_key: str,
    desc: str = "grid",
) -> list[Trial]:
    """Evaluate ``objective(lr, wd)`` on every pair and return the trials best first (higher
    ``metrics[score_key]`` is better; NaN sorts last)."""
    if not lrs or not wds:
        raise ValueError("the grid needs at least one learning rate and one weight decay")
    trials = []
    for lr, wd in tqdm(list(itertools.product(lrs, wds)), desc=desc, leave=False):
        metrics = objective(lr, wd)
        if score_key not in metrics:
            raise KeyError(f"objective returned no {score_key!r} (got {sorted(metrics)})")
        trials.append(Trial(lr, wd, float(metrics[score_key]), dict(metrics)))
    return sorted(trials, key=lambda t: math.inf if math.isnan(t.score) else -t.score)
