"""GLUE metrics against scikit-learn and scipy on random data."""

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from recipes.nlp.metrics import accuracy, compute_metric, f1, pearson
from recipes.nlp.metrics import matthews_corrcoef as mcc


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.7, y, rng.integers(0, 2, n))
    assert accuracy(y, p) == pytest.approx(accuracy_score(y, p), abs=1e-12)
    assert f1(y, p) == pytest.approx(f1_score(y, p), abs=1e-12)
    assert mcc(y, p) == pytest.approx(matthews_corrcoef(y, p), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_pearson_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    y = rng.uniform(0, 5, 200)
    p = y + rng.normal(0, 1.0 + seed, 200)
    assert pearson(y, p) == pytest.approx(pearsonr(y, p)[0], abs=1e-12)


def test_degenerate_inputs_give_zero_like_sklearn():
    y = np.array([0, 1, 1, 0])
    constant = np.zeros(4, dtype=int)
    assert mcc(y, constant) == matthews_corrcoef(y, constant) == 0.0
    assert f1(constant, constant) == 0.0
    assert pearson(np.ones(4), np.arange(4.0)) == 0.0


def test_dispatch_and_errors():
    assert compute_metric("accuracy", [1, 0], [1, 1]) == 0.5
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metric("auc", [1], [1])
    with pytest.raises(ValueError, match="labels but"):
        f1([1, 0], [1])
