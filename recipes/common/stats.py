"""Paired statistics of two fine-tuning methods over the same seeds (Only-FT vs BiSSL+FT).

With ``a_i`` the baseline's and ``b_i`` the other method's test score of seed ``i`` (same
fine-tuning seed, same data order, so the runs are paired), the differences ``d_i = b_i - a_i``
give

* the mean difference ``d̄`` and its two-sided ``1 - α`` t-interval
  ``d̄ ± t_{1-α/2, n-1} · s_d / √n`` (``s_d`` the sample std of ``d``), and optionally a
  percentile bootstrap interval of ``d̄``;
* the paired t-test ``t = d̄ / (s_d / √n)`` with ``n - 1`` degrees of freedom (two-sided p-value,
  as :func:`scipy.stats.ttest_rel`), and optionally the Wilcoxon signed-rank test;
* the ratio of standard deviations ``s_b / s_a`` (below 1: the method varies less over seeds than
  the baseline, the effect the thesis reports in Tables 6.1 and 7.1).

A difference is *significant* when the t-test's p-value is below ``α`` (0.05 by default); the
thesis marks such results in bold (Tables 6.1 and 7.1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

__all__ = ["PairedComparison", "compare_methods", "paired_comparison", "paired_runs"]


@dataclass(frozen=True)
class PairedComparison:
    """The paired comparison of ``b`` against the baseline ``a`` (see the module docstring).

    ``diff`` is ``mean(b - a)``; ``ci`` its t-interval and ``bootstrap_ci`` its percentile
    bootstrap interval (``None`` unless asked for); ``p_value`` the paired t-test's,
    ``wilcoxon_p`` the signed-rank test's (``None`` unless asked for); ``std_ratio`` is
    ``std_b / std_a``. ``note`` explains NaN or degenerate values.
    """

    n: int
    mean_a: float
    std_a: float
    mean_b: float
    std_b: float
    diff: float
    diff_std: float
    ci: tuple[float, float]
    p_value: float
    std_ratio: float
    significant: bool
    alpha: float
    wilcoxon_p: float | None = None
    bootstrap_ci: tuple[float, float] | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        out["ci"] = list(self.ci)
        out["bootstrap_ci"] = None if self.bootstrap_ci is None else list(self.bootstrap_ci)
        return out


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return math.nan if num == 0 else math.inf


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    *,
    alpha: float = 0.05,
    wilcoxon: bool = False,
    bootstrap: int = 0,
    seed: int = 0,
) -> PairedComparison:
    """Compare the paired samples ``b`` against the baseline ``a`` (see the module docstring).

    Args:
        a, b: scores of the same seeds, in the same order (``a[i]`` pairs with ``b[i]``).
        alpha: the test level; the interval has coverage ``1 - alpha``.
        wilcoxon: also run the Wilcoxon signed-rank test on ``b - a``.
        bootstrap: number of percentile-bootstrap resamples of the mean difference (0: none).
        seed: seed of the bootstrap resampling.

    Fewer than two pairs leave the interval and the p-values NaN (``note`` says so; nothing is
    significant). Differences of zero variance make the t-test degenerate: ``p = 0`` and the
    interval ``[d̄, d̄]`` for a nonzero ``d̄``, ``p = 1`` for none (as the limit of the test, and
    ``scipy.stats.ttest_rel`` for the nonzero case); ``note`` says so. ``ValueError`` for
    samples of different lengths, non-finite scores or ``alpha`` outside (0, 1).
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths, got {x.shape} and {y.shape}")
    if len(x) == 0:
        raise ValueError("paired samples are empty")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired samples hold NaN or infinite scores")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    n, d = len(x), y - x
    mean_d, std_d = float(d.mean()), _std(d)
    base = dict(n=n, mean_a=float(x.mean()), std_a=_std(x), mean_b=float(y.mean()),
                std_b=_std(y), diff=mean_d, diff_std=std_d, alpha=alpha)
    base["std_ratio"] = _ratio(base["std_b"], base["std_a"])
    if n < 2:
        return PairedComparison(**base, ci=(math.nan, math.nan), p_value=math.nan,
                                significant=False,
                                wilcoxon_p=math.nan if wilcoxon else None,
                                bootstrap_ci=(math.nan, math.nan) if bootstrap else None,
                                note="n < 2 pairs: no interval or test")
    notes = []
    scale = max(1.0, float(np.abs(d).max()))
    if std_d <= 1e-12 * scale:  # constant differences: the t statistic is ±inf or 0/0
        zero = abs(mean_d) <= 1e-12 * scale
        p, ci = (1.0 if zero else 0.0), (mean_d, mean_d)
        notes.append("the differences have zero variance: the t-test is degenerate")
    else:
        half = float(sps.t.ppf(1.0 - alpha / 2.0, n - 1)) * std_d / math.sqrt(n)
        ci = (mean_d - half, mean_d + half)
        p = float(sps.ttest_rel(y, x).pvalue)
    wil = None
    if wilcoxon:
        if not np.any(d != 0):
            wil = 1.0
        else:
            with warnings.catch_warnings():  # scipy warns on ties and zeros; the p-value stands
                warnings.simplefilter("ignore", RuntimeWarning)
                wil = float(sps.wilcoxon(d).pvalue)
    boot = None
    if bootstrap:
        if std_d <= 1e-12 * scale:
            boot = (mean_d, mean_d)
        else:
            res = sps.bootstrap((d,), np.mean, n_resamples=bootstrap, confidence_level=1 - alpha,
                                method="percentile", rng=np.random.default_rng(seed))
            boot = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    return PairedComparison(**base, ci=ci, p_value=p, significant=bool(p < alpha),
                            wilcoxon_p=wil, bootstrap_ci=boot, note="; ".join(notes))


def paired_runs(
    runs_a: Sequence[Mapping[str, Any]], runs_b: Sequence[Mapping[str, Any]], key: str
) -> tuple[list[int], list[float], list[float]]:
    """``(seeds, a, b)``: the ``key`` scores of two methods' runs (``{"seed", key, ...}``, the
    ``runs`` of a method result), paired by seed in the order of ``runs_a``.

    ``ValueError`` when the two methods were not run over the same seeds (then no paired test
    applies) or a run lacks ``key``.
    """
    seeds_a = [int(r["seed"]) for r in runs_a]
    seeds_b = [int(r["seed"]) for r in runs_b]
    if sorted(seeds_a) != sorted(seeds_b) or len(set(seeds_a)) != len(seeds_a):
        raise ValueError(f"the methods were run over different seeds ({seeds_a} vs {seeds_b}); "
                         "a paired comparison needs the same seeds")
    by_seed = {int(r["seed"]): r for r in runs_b}
    for r in (*runs_a, *runs_b):
        if key not in r or r[key] is None:
            raise ValueError(f"a run of seed {r['seed']} has no {key!r}")
    return (seeds_a, [float(r[key]) for r in runs_a],
            [float(by_seed[s][key]) for s in seeds_a])


def compare_methods(
    baseline: Mapping[str, Any], method: Mapping[str, Any], key: str, **options: Any
) -> PairedComparison | None:
    """:func:`paired_comparison` of two method results (``{"runs": [{"seed", key, ...}]}``, the
    schema of ``recipes.common.search``) on ``key``, ``method`` against ``baseline``; ``None``
    when they were not run over the same seeds. ``options`` go to :func:`paired_comparison`."""
    try:
        _, a, b = paired_runs(baseline.get("runs", []), method.get("runs", []), key)
    except ValueError:
        return None
    return paired_comparison(a, b, **options) if a else None
