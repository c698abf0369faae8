"""Downstream metrics: top-k accuracy and the 11-point mean average precision of VOC07."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["average_precision_11", "mean_average_precision_11", "topk_accuracy"]


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the ``k`` largest logits (``k`` capped at #classes)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected (N, C) logits and (N,) labels, got {logits.shape}, {labels.shape}"
        )
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def average_precision_11(scores: Tensor, positives: Tensor) -> float:
    """11-point interpolated average precision of one class (PASCAL VOC 2007):
    ``AP = 1/11 Σ_{r ∈ {0, 0.1, …, 1}} max_{recall ≥ r} precision`` (0 where no recall reaches r).
    """
    if scores.shape != positives.shape or scores.ndim != 1:
        raise ValueError("scores and positives must be 1-d tensors of equal length")
    n_pos = int(positives.sum())
    if n_pos == 0:
        raise ValueError("average precision is undefined for a class without positives")
    order = torch.argsort(scores, descending=True, stable=True)
    hits = positives[order].double()
    tp = torch.cumsum(hits, 0)
    precision = tp / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    recall = tp / n_pos
    ap = 0.0
    for r in torch.linspace(0, 1, 11, dtype=torch.float64):
        mask = recall >= r - 1e-12
        ap += float(precision[mask].max()) if mask.any() else 0.0
    return ap / 11


def mean_average_precision_11(scores: Tensor, targets: Tensor) -> float:
    """Mean over classes of :func:`average_precision_11`; ``targets`` is the (N, C) multi-hot
    matrix. Classes without a positive example are skipped."""
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"expected (N, C) scores and targets, got {scores.shape}, {targets.shape}")
    aps = [
        average_precision_11(scores[:, c], targets[:, c] > 0.5)
        for c in range(scores.shape[1])
        if targets[:, c].sum() > 0
    ]
    if not aps:
        raise ValueError("no class has a positive example")
    return sum(aps) / len(aps)
