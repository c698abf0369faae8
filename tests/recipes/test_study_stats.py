"""The replicated study's statistics: tests over replicates against scipy, the hierarchical
bootstrap against a slow reference, d_z's interval, Pitman-Morgan, Holm/BH by hand, the
degenerate cell."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from recipes.common.stats import (
    NO_VARIANCE,
    adjust,
    adjust_study,
    cohens_dz,
    hierarchical_bootstrap,
    pitman_morgan,
    replicate_comparison,
)

RNG = np.random.default_rng(7)
A = 0.80 + RNG.normal(0, 0.02, (5, 4)) + RNG.normal(0, 0.02, (5, 1))
B = A + 0.015 + RNG.normal(0, 0.01, (5, 4))


def test_tests_run_over_replicate_means_and_match_scipy():
    c = replicate_comparison(A, B, bootstrap=500)
    ma, mb = A.mean(axis=1), B.mean(axis=1)
    d = mb - ma
    assert (c["replicates"], c["seeds"]) == (5, 4)
    assert c["diff"] == pytest.approx(d.mean(), rel=1e-12)
    assert c["p_value"] == pytest.approx(sps.ttest_rel(mb, ma).pvalue, rel=1e-10)
    assert c["wilcoxon_p"] == pytest.approx(sps.wilcoxon(d).pvalue, rel=1e-12)
    lo, hi = sps.t.interval(0.95, 4, loc=d.mean(), scale=sps.sem(d))
    assert c["ci"] == pytest.approx([lo, hi], rel=1e-10)
    assert c["between_std_only_ft"] == pytest.approx(np.std(ma, ddof=1))
    assert c["within_std_bissl_ft"] == pytest.approx(
        math.sqrt(np.mean(np.var(B, axis=1, ddof=1))))
    assert c["d_z"] == pytest.approx(d.mean() / np.std(d, ddof=1))
    # seeds are not the unit: a test over all 20 pairs would give a different p-value
    assert c["p_value"] != pytest.approx(sps.ttest_rel(B.ravel(), A.ravel()).pvalue, rel=1e-3)
    assert not c["degenerate"] and c["note"] == ""


@pytest.mark.parametrize("d", [
    [0.3, 0.1, 0.5, 0.2, 0.4, -0.1],
    # five replicates of a study where scipy's noncentral t is nan at the upper end of a fixed
    # bracket t ± (10 + 2|t|): the interval must still be found
    [-0.0245, -0.0648, -0.0497, 0.0396, -0.1088],
])
def test_cohens_dz_interval_inverts_the_noncentral_t(d):
    d = np.array(d)
    dz, (lo, hi), gz = cohens_dz(d)
    n, t = len(d), dz * math.sqrt(len(d))
    assert sps.nct.cdf(t, n - 1, lo * math.sqrt(n)) == pytest.approx(0.975, abs=1e-8)
    assert sps.nct.cdf(t, n - 1, hi * math.sqrt(n)) == pytest.approx(0.025, abs=1e-8)
    assert lo < dz < hi and gz == pytest.approx(dz * (1 - 3 / (4 * (n - 1) - 1)))
    # the interval excludes 0 exactly when the t-test rejects at 5%
    p = sps.ttest_1samp(d, 0.0).pvalue
    assert (lo > 0) == (p < 0.05)


def test_hierarchical_bootstrap_matches_a_slow_reference():
    lo, hi = hierarchical_bootstrap(A, B, 300, seed=11)
    rng = np.random.default_rng(11)
    ri = rng.integers(0, 5, (300, 5))
    si = rng.integers(0, 4, (300, 5, 4))
    means = []
    for b in range(300):
        values = [B[ri[b, r], si[b, r, s]] - A[ri[b, r], si[b, r, s]]
                  for r in range(5) for s in range(4)]
        means.append(sum(values) / len(values))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), rel=1e-12)
    assert lo < (B - A).mean() < hi


def test_pitman_morgan_is_the_classic_test_for_one_replicate():
    x = RNG.normal(0, 1, 12)
    y = 0.5 * x + RNG.normal(0, 0.4, 12)
    ratio, p = pitman_morgan(x[None, :], y[None, :])
    xc, yc = x - x.mean(), y - y.mean()
    assert p == pytest.approx(sps.pearsonr(xc + yc, yc - xc).pvalue, rel=1e-9)
    assert ratio == pytest.approx(np.std(y) / np.std(x))
    # far smaller spread over many replicates is detected
    a = RNG.normal(0, 1.0, (6, 5))
    _, p_small = pitman_morgan(a, 0.2 * a + RNG.normal(0, 0.05, (6, 5)))
    assert p_small < 1e-3
    assert pitman_morgan(np.ones((3, 4)), a[:3, :4])[1] is None  # no spread: undefined


def test_holm_and_bh_against_hand_computed_values():
    p = [0.01, 0.04, 0.03, 0.005, None]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> monotone
    assert adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02, None])
    # BH: 0.005*4/1, 0.01*4/2, 0.03*4/3, 0.04*4/4 = 0.02, 0.02, 0.04, 0.04
    assert adjust(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02, None])
    assert adjust(p, "none") == p
    # the issue's five budgets: nothing survives Holm
    issue = [0.028, 0.038, 0.032, 0.020, 0.12]
    assert min(adjust(issue, "holm")) == pytest.approx(0.10)
    with pytest.raises(ValueError, match="correction"):
        adjust(p, "bonferroni-ish")


def test_a_degenerate_cell_says_so_and_is_never_marked():
    a = np.array([[0.5, 0.6], [0.4, 0.5], [0.7, 0.6]])
    c = replicate_comparison(a, a + 0.25)  # the same shift in every replicate
    assert c["degenerate"] and c["note"] == NO_VARIANCE == "no variance: test undefined"
    assert c["p_value"] is None and c["ci"] is None and c["d_z"] is None
    ok = replicate_comparison(A, B)
    targets = {"t": {"rows": [{"comparison": c}, {"comparison": ok}]}}
    adjust_study(targets, "holm", 0.05)
    assert c["p_adjusted"] is None and not c["significant"]
    assert ok["p_adjusted"] == pytest.approx(ok["p_value"])  # a family of one defined test
    assert ok["significant"] == (ok["p_value"] < 0.05)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="R >= 2"):
        replicate_comparison([[0.1, 0.2]], [[0.1, 0.3]])
    with pytest.raises(ValueError, match="NaN"):
        replicate_comparison([[0.1, np.nan], [0.2, 0.2]], [[0.1, 0.3], [0.2, 0.2]])
