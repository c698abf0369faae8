"""The shared stage layer's own rules: trial selection, the small-scale baseline's extra
pretraining, the λ wiring."""

import pytest
import torch
from tiny import TINY, run, sets

from implicitbilevel import BilevelProblem, LearnableLambda
from recipes.common import load_checkpoint
from recipes.common.bissl_stage import add_lambda, build_lambda
from recipes.common.pipeline import Recipe
from recipes.common.search import Trial, select_trial
from recipes.common.settings import BiSSLStageConfig


def _trial(lr, acc, loss):
    return Trial(lr, 0.0, acc, {"val_top1": acc, "val_loss": loss})


def test_select_by_metric_or_by_the_loss_accuracy_tradeoff():
    trials = [_trial(1, 0.80, 2.0), _trial(2, 0.79, 0.5), _trial(3, 0.60, 0.4)]  # best acc first
    assert select_trial(trials, "metric", "top1").lr == 1
    # ranks (accuracy + loss): 0 + 2, 1 + 1, 2 + 0 -> a tie of all three, to the best accuracy
    assert select_trial(trials, "loss-tradeoff", "top1").lr == 1
    trials = [_trial(1, 0.80, 2.0), _trial(2, 0.79, 0.5), _trial(3, 0.60, 0.6)]
    assert select_trial(trials, "loss-tradeoff", "top1").lr == 2  # 0 + 2 > 1 + 0


def test_lambda_variants_from_the_config():
    cfg = BiSSLStageConfig(lam=0.01, alternations=5)
    assert build_lambda(cfg) == 0.01
    cfg.lam_schedule, cfg.lam_damping = "learnable", 0.0
    lam = build_lambda(cfg)
    assert isinstance(lam, LearnableLambda) and lam() == pytest.approx(0.01) and lam.damping == 0
    cfg.lam_schedule, cfg.lam_max = "cosine-decay", 0.1
    sched = build_lambda(cfg)
    assert sched(0) == pytest.approx(0.1) and sched(4) == pytest.approx(1e-8)


def test_a_learnable_lambda_is_trained_like_the_upper_parameters_by_default():
    # Thesis: ρ is trained with "the same optimizer"; lam_lr gives it a group of its own.
    cfg = BiSSLStageConfig(lam=0.01, lam_schedule="learnable")
    for lam_lr, expected in ((None, (0.05, 1e-3, 0.9)), (0.2, (0.2, 0.0, 0.9))):
        cfg.lam_lr = lam_lr
        problem = BilevelProblem(lambda x, y, b: x["w"].sum(), lambda y, b: y["w"].sum(),
                                 lam=build_lambda(cfg))
        w = torch.zeros(2, requires_grad=True)
        optimizer = torch.optim.SGD([w], lr=0.05, weight_decay=1e-3, momentum=0.9)
        add_lambda(problem, {"w": w}, optimizer, cfg, torch.device("cpu"))
        group = optimizer.param_groups[-1]
        assert group["params"] == [problem.lam.rho]
        assert (group["lr"], group["weight_decay"], group["momentum"]) == expected


def test_the_only_ft_baseline_is_pretrained_longer(tmp_path, monkeypatch):
    sources = []
    monkeypatch.setattr(Recipe, "fine_tune", lambda self, target, source, name, *a, **k: (
        sources.append((name, source.name)), {"lr": 0.1, "weight_decay": 0.0})[1])
    args = sets(*TINY, f"run.out_dir={tmp_path}", "pretext.baseline_extra_epochs=1")
    run("pretext", "only-ft", *args)
    bissl_start = load_checkpoint(tmp_path / "pretext.pt")
    baseline = load_checkpoint(tmp_path / "pretext_baseline.pt")
    assert len(bissl_start["losses"]) == 2 and len(baseline["losses"]) == 3  # 2 + 1 epochs
    assert not torch.equal(bissl_start["pretext"]["backbone.stem.0.weight"],
                           baseline["pretext"]["backbone.stem.0.weight"])
    assert sources == [("Only-FT", "pretext_baseline.pt")]
