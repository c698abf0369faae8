"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["warmup_cosine"]


def warmup_cosine(
    total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0
) -> Callable[[int], float]:
    """A multiplier ``step -> factor``: a linear warm-up over ``warmup_steps`` (the first step
    already at ``1/(warmup_steps+1)``, so no step is wasted at lr 0), then a cosine from 1 down to
    ``final_factor`` at ``total_steps``, held there afterwards."""
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(
            f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
