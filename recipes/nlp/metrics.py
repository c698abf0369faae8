"""GLUE metrics in numpy: Matthews correlation (CoLA), accuracy, F1 (MRPC, QQP), Pearson (STSB).

Hub metric scripts are unavailable offline, so these are computed directly from the confusion
counts; the tests check them against scikit-learn and scipy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike


def _binary(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[float, float, float, float]:
    t = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(y_pred).astype(int).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{t.shape[0]} labels but {p.shape[0]} predictions")
    tp = float(np.sum((t == 1) & (p == 1)))
    tn = float(np.sum((t == 0) & (p == 0)))
    fp = float(np.sum((t == 0) & (p == 1)))
    fn = float(np.sum((t == 1) & (p == 0)))
    return tp, tn, fp, fn


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of equal entries."""
    t, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{t.shape[0]} labels but {p.shape[0]} predictions")
    return float(np.mean(t == p))


def f1(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Binary F1 of the positive class 1: ``2 TP / (2 TP + FP + FN)`` (0 when undefined)."""
    tp, _, fp, fn = _binary(y_true, y_pred)
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Binary Matthews correlation ``(TP TN - FP FN) / sqrt(...)`` (0 when undefined)."""
    tp, tn, fp, fn = _binary(y_true, y_pred)
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


def pearson(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Pearson correlation coefficient (0 when either input is constant)."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{t.shape[0]} labels but {p.shape[0]} predictions")
    tc, pc = t - t.mean(), p - p.mean()
    denominator = np.sqrt(np.sum(tc * tc) * np.sum(pc * pc))
    return float(np.sum(tc * pc) / denominator) if denominator else 0.0


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "mcc": matthews_corrcoef,
    "accuracy": accuracy,
    "f1": f1,
    "pearson": pearson,
}


def compute_metric(name: str, y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Evaluate the metric ``name`` (``mcc``, ``accuracy``, ``f1`` or ``pearson``)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    return METRICS[name](y_true, y_pred)
