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
thesis marks such results in bold (Tables 6.1 and 7.1). Differences without variance leave the
test undefined (:data:`NO_VARIANCE`), never significant.

The replicated ``study`` tests at the level of independent replicates of the stages that differ
between the methods, the fine-tuning seeds nested inside (:func:`replicate_comparison`): the
paired t and Wilcoxon tests over replicate means, a hierarchical bootstrap over replicates and
seeds, Cohen's d_z with a noncentral-t interval, the Pitman-Morgan test of the seed spreads, and
Holm or Benjamini-Hochberg adjustment over every cell of a study (:func:`adjust`,
:func:`adjust_study`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

__all__ = ["NO_VARIANCE", "PairedComparison", "adjust", "adjust_study", "cohens_dz",
           "compare_methods", "hierarchical_bootstrap", "paired_comparison", "paired_runs",
           "pitman_morgan", "replicate_comparison"]

#: What a cell without variance says instead of a p-value.
NO_VARIANCE = "no variance: test undefined"


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
    significant). Differences of zero variance leave the t-test undefined: its p-value and
    interval are NaN, ``note`` is :data:`NO_VARIANCE` and the difference is never significant (a
    constant shift over a handful of seeds is no evidence of a shift of the method).
    ``ValueError`` for samples of different lengths, non-finite scores or ``alpha`` outside (0, 1).
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
        p, ci = math.nan, (math.nan, math.nan)
        notes.append(NO_VARIANCE)
    else:
        half = float(sps.t.ppf(1.0 - alpha / 2.0, n - 1)) * std_d / math.sqrt(n)
        ci = (mean_d - half, mean_d + half)
        p = float(sps.ttest_rel(y, x).pvalue)
    wil = None
    if wilcoxon:
        if notes:
            wil = math.nan
        elif not np.any(d != 0):
            wil = 1.0
        else:
            with warnings.catch_warnings():  # scipy warns on ties and zeros; the p-value stands
                warnings.simplefilter("ignore", RuntimeWarning)
                wil = float(sps.wilcoxon(d).pvalue)
    boot = None
    if bootstrap:
        if notes:
            boot = (math.nan, math.nan)
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


# -- the replicated study: tests over replicates, seeds nested ------------------------------------


def adjust(pvalues: Sequence[float | None], method: str = "holm") -> list[float | None]:
    """Multiple-testing adjusted p-values, in the order given; ``None`` (an undefined test) stays
    ``None`` and is not counted in the family. ``holm``: Holm's step-down (family-wise error),
    ``bh``: Benjamini-Hochberg (false discovery rate), ``none``: unchanged."""
    if method not in ("holm", "bh", "none"):
        raise ValueError(f"unknown correction {method!r} (holm, bh or none)")
    idx = [i for i, p in enumerate(pvalues) if p is not None and p == p]
    out: list[float | None] = [None] * len(pvalues)
    m = len(idx)
    order = sorted(idx, key=lambda i: pvalues[i])  # type: ignore[arg-type, return-value]
    if method == "none":
        for i in idx:
            out[i] = float(pvalues[i])  # type: ignore[arg-type]
    elif method == "holm":
        running = 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (m - rank) * float(pvalues[i])))  # type: ignore
            out[i] = running
    else:
        running = 1.0
        for rank in range(m - 1, -1, -1):
            i = order[rank]
            running = min(running, min(1.0, m * float(pvalues[i]) / (rank + 1)))  # type: ignore
            out[i] = running
    return out


def cohens_dz(d: Sequence[float], alpha: float = 0.05) -> tuple[float, tuple[float, float], float]:
    """``(d_z, interval, g_z)``: the standardised mean difference ``mean(d) / sd(d)`` of paired
    differences, its ``1 - α`` interval by inverting the noncentral t distribution of
    ``t = d_z √n`` (df ``n - 1``), and Hedges' small-sample corrected ``g_z = J · d_z``,
    ``J = 1 - 3 / (4 (n - 1) - 1)``."""
    x = np.asarray(d, dtype=np.float64)
    n = len(x)
    dz = float(x.mean() / np.std(x, ddof=1))
    t, df = dz * math.sqrt(n), n - 1
    from scipy.optimize import brentq

    def excess(nc: float, prob: float) -> float:
        value = float(sps.nct.cdf(t, df, nc)) - prob
        if not math.isfinite(value):  # scipy's noncentral t is nan far in the tails
            raise ValueError(f"noncentral t cdf is not finite at nc = {nc}")
        return value

    def nc_at(prob: float) -> float:  # the noncentrality where P(T <= t) = prob
        # P(T <= t) falls as nc grows: widen a bracket around t step by doubling step, so that
        # it stays where scipy's cdf is finite.
        lo, hi, step = t, t, 1.0
        while excess(lo, prob) <= 0:
            lo, step = lo - step, 2.0 * step
        step = 1.0
        while excess(hi, prob) >= 0:
            hi, step = hi + step, 2.0 * step
        return float(brentq(lambda nc: excess(nc, prob), lo, hi, xtol=1e-10))

    try:
        lo, hi = nc_at(1.0 - alpha / 2.0), nc_at(alpha / 2.0)
    except ValueError:  # scipy's noncentral t loses precision far in the tails (huge |t|)
        lo = hi = math.nan
    j = 1.0 - 3.0 / (4.0 * df - 1.0) if df > 1 else math.nan
    return dz, (lo / math.sqrt(n), hi / math.sqrt(n)), j * dz


def hierarchical_bootstrap(a: np.ndarray, b: np.ndarray, n_resamples: int, alpha: float = 0.05,
                           seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean paired difference ``b - a`` (replicates × seeds) by
    resampling replicates with replacement, then seeds within each drawn replicate with
    replacement (the same seeds for both methods: the pairs stay paired). The draws are
    ``rng.integers(0, R, (B, R))`` then ``rng.integers(0, S, (B, R, S))``."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    reps, seeds = d.shape
    rng = np.random.default_rng(seed)
    ri = rng.integers(0, reps, (n_resamples, reps))
    si = rng.integers(0, seeds, (n_resamples, reps, seeds))
    means = d[ri[:, :, None], si].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def pitman_morgan(a: np.ndarray, b: np.ndarray) -> tuple[float, float | None]:
    """``(ratio, p)``: the pooled within-replicate seed spread of ``b`` over that of ``a`` and
    the Pitman-Morgan test of equal variances of paired samples, applied to the seed deviations
    from each replicate's mean (``u = a' + b'``, ``v = b' - a'``: ``cov(u, v) = var b - var a``;
    ``t = r √df / √(1 - r²)`` with ``df = R (S - 1) - 1``; two-sided). With one replicate it is
    the classic test (``scipy.stats.pearsonr(u, v)``). ``p`` is ``None`` when a method has no
    seed spread (test undefined)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    xc, yc = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
    sa, sb = float((xc ** 2).sum()), float((yc ** 2).sum())
    if sa <= 1e-24 or sb <= 1e-24:
        return (_ratio(math.sqrt(sb), math.sqrt(sa)), None)
    u, v = (xc + yc).ravel(), (yc - xc).ravel()
    r = float((u * v).sum() / math.sqrt((u * u).sum() * (v * v).sum()))
    df = x.shape[0] * (x.shape[1] - 1) - 1
    if df < 1:
        return math.sqrt(sb / sa), None
    r = max(-1.0, min(1.0, r))
    t = math.inf if abs(r) == 1.0 else r * math.sqrt(df) / math.sqrt(1.0 - r * r)
    return math.sqrt(sb / sa), float(2.0 * sps.t.sf(abs(t), df))


def replicate_comparison(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], *,
                         alpha: float = 0.05, wilcoxon: bool = True, bootstrap: int = 2000,
                         seed: int = 0) -> dict[str, Any]:
    """BiSSL+FT (``b``) against Only-FT (``a``), each ``R × S`` (replicates × nested seeds,
    seed ``s`` of a replicate paired between the methods), tested at the replicate level.

    The unit of the tests is the replicate: ``d_r = mean_s b[r, s] - mean_s a[r, s]``; ``diff``
    is ``mean(d_r)`` with its t-interval, ``p_value`` the paired t-test over the replicate means
    (``scipy.stats.ttest_rel``), ``wilcoxon_p`` the signed-rank test of ``d_r``,
    ``bootstrap_ci`` the :func:`hierarchical_bootstrap` interval, ``d_z`` (with ``d_z_ci`` and
    Hedges' ``g_z``) from :func:`cohens_dz`; ``spread_ratio`` and ``spread_p`` are
    :func:`pitman_morgan` on the seeds. ``degenerate`` cells (``d_r`` without variance) have no
    p-values, ``note`` :data:`NO_VARIANCE`. The ``*_adjusted`` and ``significant`` fields are
    filled by :func:`adjust_study`."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"need two R × S arrays with R >= 2, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("the scores hold NaN or infinite values")
    reps, seeds = x.shape
    ma, mb = x.mean(axis=1), y.mean(axis=1)
    d = mb - ma
    within = {m: float(np.sqrt(np.mean(np.var(z, axis=1, ddof=1)))) if seeds > 1 else 0.0
              for m, z in (("only_ft", x), ("bissl_ft", y))}
    out: dict[str, Any] = {
        "replicates": reps, "seeds": seeds,
        "mean_only_ft": float(ma.mean()), "mean_bissl_ft": float(mb.mean()),
        "between_std_only_ft": _std(ma), "between_std_bissl_ft": _std(mb),
        "within_std_only_ft": within["only_ft"], "within_std_bissl_ft": within["bissl_ft"],
        "replicate_diffs": d.tolist(), "diff": float(d.mean()), "diff_std": _std(d),
        "alpha": alpha, "degenerate": False, "note": "",
        "ci": None, "p_value": None, "wilcoxon_p": None, "bootstrap_ci": None,
        "d_z": None, "d_z_ci": None, "g_z": None,
    }
    scale = max(1.0, float(np.abs(d).max()))
    if out["diff_std"] <= 1e-12 * scale:
        out.update(degenerate=True, note=NO_VARIANCE)
    else:
        half = float(sps.t.ppf(1.0 - alpha / 2.0, reps - 1)) * out["diff_std"] / math.sqrt(reps)
        out["ci"] = [out["diff"] - half, out["diff"] + half]
        out["p_value"] = float(sps.ttest_rel(mb, ma).pvalue)
        if wilcoxon:
            with warnings.catch_warnings():  # scipy warns on ties and zeros; the p-value stands
                warnings.simplefilter("ignore", RuntimeWarning)
                out["wilcoxon_p"] = float(sps.wilcoxon(d).pvalue) if np.any(d != 0) else None
        dz, dz_ci, gz = cohens_dz(d, alpha)
        out.update(d_z=dz, d_z_ci=list(dz_ci) if math.isfinite(dz_ci[0]) else None,
                   g_z=gz if math.isfinite(gz) else None)
        if bootstrap:
            out["bootstrap_ci"] = list(hierarchical_bootstrap(x, y, bootstrap, alpha, seed))
    ratio, spread_p = pitman_morgan(x, y) if seeds > 1 else (math.nan, None)
    out.update(spread_ratio=ratio, spread_p=spread_p)
    return out


def adjust_study(targets: Mapping[str, Any], method: str, alpha: float) -> None:
    """Adjust the p-values of every cell (``targets[t]["rows"][i]["comparison"]``) in place, one
    family per test (t, Wilcoxon, spread): ``p_adjusted``, ``wilcoxon_p_adjusted``,
    ``spread_p_adjusted``; ``significant`` (adjusted t p < ``alpha``, never for a degenerate
    cell), ``spread_significant`` and ``correction``."""
    comps = [row["comparison"] for entry in targets.values() for row in entry["rows"]]
    for key in ("p_value", "wilcoxon_p", "spread_p"):
        adjusted = adjust([c.get(key) for c in comps], method)
        name = "p_adjusted" if key == "p_value" else key + "_adjusted"
        for c, p in zip(comps, adjusted, strict=True):
            c[name] = p
    for c in comps:
        c["correction"] = method
        c["significant"] = bool(not c["degenerate"] and c["p_adjusted"] is not None
                                and c["p_adjusted"] < alpha)
        c["spread_significant"] = bool(c["spread_p_adjusted"] is not None
                                       and c["spread_p_adjusted"] < alpha)
