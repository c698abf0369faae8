"""Paired statistics over seeds against scipy, the degenerate cases and the report's significance
lines (the replicated study: ``test_study_stats.py``, ``test_study_replicates.py``)."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from recipes.common.cli import parse_args
from recipes.common.report import format_comparisons
from recipes.common.stats import NO_VARIANCE, compare_methods, paired_comparison, paired_runs
from recipes.vision_bissl import DEFAULT_CONFIG

pytestmark = pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")

A = [0.712, 0.705, 0.731, 0.698, 0.720, 0.709, 0.715, 0.701]
B = [0.741, 0.729, 0.738, 0.722, 0.751, 0.725, 0.733, 0.730]


# -- statistics ----------------------------------------------------------------------------------


def test_paired_statistics_match_scipy():
    c = paired_comparison(A, B, wilcoxon=True)
    d = np.subtract(B, A)
    lo, hi = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
    assert c.n == 8 and c.diff == pytest.approx(d.mean(), rel=1e-12)
    assert c.ci == pytest.approx((lo, hi), rel=1e-10)
    assert c.p_value == pytest.approx(sps.ttest_rel(B, A).pvalue, rel=1e-10)
    assert c.wilcoxon_p == pytest.approx(sps.wilcoxon(d).pvalue, rel=1e-12)
    assert c.std_ratio == pytest.approx(np.std(B, ddof=1) / np.std(A, ddof=1), rel=1e-12)
    assert (c.mean_a, c.std_a) == pytest.approx((np.mean(A), np.std(A, ddof=1)), rel=1e-12)
    assert c.p_value < 1e-3 and c.significant
    # a 99% interval is wider and contains the 95% one; the p-value does not depend on alpha
    wide = paired_comparison(A, B, alpha=0.01)
    assert wide.ci[0] < c.ci[0] and wide.ci[1] > c.ci[1] and wide.p_value == c.p_value


def test_a_noisy_difference_is_not_significant_and_the_bootstrap_is_near_the_t_interval():
    rng = np.random.default_rng(3)
    a = rng.normal(0.8, 0.02, 10)
    b = a + rng.normal(0.002, 0.02, 10)
    c = paired_comparison(a, b, bootstrap=4000, seed=1)
    assert c.p_value == pytest.approx(sps.ttest_rel(b, a).pvalue, rel=1e-10)
    assert not c.significant and c.ci[0] < 0 < c.ci[1]
    lo, hi = c.bootstrap_ci
    assert lo < c.diff < hi
    # the percentile bootstrap of a mean is a bit narrower than t at n = 10, same centre
    assert (hi - lo) / (c.ci[1] - c.ci[0]) == pytest.approx(0.9, abs=0.15)


def test_degenerate_differences_and_too_few_pairs():
    same = paired_comparison([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], wilcoxon=True, bootstrap=100)
    assert math.isnan(same.p_value) and not same.significant and same.note == NO_VARIANCE
    assert math.isnan(same.wilcoxon_p) and same.std_ratio == pytest.approx(1.0)
    shifted = paired_comparison([0.5, 0.6, 0.7], [0.75, 0.85, 0.95])  # constant +0.25
    assert math.isnan(shifted.p_value) and not shifted.significant  # no longer p = 0
    assert shifted.diff == pytest.approx(0.25) and shifted.note == NO_VARIANCE
    one = paired_comparison([0.5], [0.7], wilcoxon=True)
    assert math.isnan(one.p_value) and math.isnan(one.ci[0]) and not one.significant
    assert "n < 2" in one.note and math.isnan(one.wilcoxon_p)
    flat = paired_comparison([0.5, 0.5], [0.4, 0.6])
    assert flat.std_ratio == math.inf  # the baseline did not vary
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        paired_comparison([0.1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="alpha"):
        paired_comparison(A, B, alpha=1.0)


def test_runs_pair_by_seed_or_not_at_all():
    only = [{"seed": 1, "test_top1": 0.5}, {"seed": 0, "test_top1": 0.4}]
    bissl = [{"seed": 0, "test_top1": 0.45}, {"seed": 1, "test_top1": 0.7}]
    assert paired_runs(only, bissl, "test_top1") == ([1, 0], [0.5, 0.4], [0.7, 0.45])
    with pytest.raises(ValueError, match="different seeds"):
        paired_runs(only, bissl[:1], "test_top1")
    assert compare_methods({"runs": only}, {"runs": bissl[:1]}, "test_top1") is None
    c = compare_methods({"runs": only}, {"runs": bissl}, "test_top1")
    assert c.diff == pytest.approx(0.125)
    lines = format_comparisons({"digits": c, "other": None})
    assert "digits: +12.50" in lines and "not significant" in lines
    assert "other: not run over the same seeds" in lines


def test_the_study_command_parses_and_runs_alone():
    assert parse_args(["study", "--set", "study.seeds=[0, 1]"], DEFAULT_CONFIG).stages == ["study"]
    with pytest.raises(SystemExit):
        parse_args(["study", "pretext"], DEFAULT_CONFIG)
