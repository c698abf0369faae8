"""NT-Xent against a per-pair loop; 11-point mAP and top-k against hand-computed values."""

import math

import pytest
import torch

from recipes.vision.losses import nt_xent
from recipes.vision.metrics import average_precision_11, mean_average_precision_11, topk_accuracy


def _naive_nt_xent(z1, z2, tau):
    z = [v for v in z1] + [v for v in z2]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n

        def sim(a, b):
            return float(a @ b) / (float(a.norm()) * float(b.norm()))

        denom = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(z[i], z[j]) / tau) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_nt_xent_matches_per_pair_loop(tau):
    g = torch.Generator().manual_seed(0)
    z1, z2 = (
        torch.randn(5, 7, generator=g, dtype=torch.float64),
        torch.randn(5, 7, generator=g, dtype=torch.float64),
    )
    assert nt_xent(z1, z2, tau).item() == pytest.approx(_naive_nt_xent(z1, z2, tau), rel=1e-6)


def test_nt_xent_prefers_aligned_views():
    z = torch.randn(8, 4)
    assert nt_xent(z, z) < nt_xent(z, torch.randn(8, 4))
    with pytest.raises(ValueError):
        nt_xent(torch.randn(1, 4), torch.randn(1, 4))


def test_eleven_point_ap_hand_example():
    # ranks: +, -, +, -  -> precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1.
    # r in {0,...,0.5}: max precision 1 (6 points); r in {0.6,...,1}: 2/3 (5 points).
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    positives = torch.tensor([True, False, True, False])
    expected = (6 * 1.0 + 5 * (2 / 3)) / 11
    assert average_precision_11(scores, positives) == pytest.approx(expected)
    # Class 2: the single positive ranked first -> AP 1. Class 3 has no positive: skipped.
    all_scores = torch.stack([scores, torch.tensor([0.1, 0.4, 0.3, 0.2]), torch.rand(4)], dim=1)
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    assert mean_average_precision_11(all_scores, targets) == pytest.approx((expected + 1) / 2)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 5) == 1.0
