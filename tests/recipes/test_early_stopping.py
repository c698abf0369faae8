"""Early stopping in fine-tuning (thesis Sec. 9.1, fifth item): the rule on scripted validation
scores, the loop's stopping step and restored weights, and a tiny run of each recipe with
``finetune.patience`` (and the transfer monitor) on."""

import json

import pytest
import torch
from torch import nn

from recipes.common.finetune import EarlyStopping, Objective, fit

pytestmark = pytest.mark.filterwarnings("ignore:implicit-Jacobian solve broke down")

SCORES = [0.1, 0.5, 0.4, 0.5, 0.3, 0.9, 0.2, 0.2, 0.2, 0.2]


def _stop_epoch(patience, min_epochs):
    rule = EarlyStopping(patience, min_epochs)
    for epoch, score in enumerate(SCORES, start=1):
        if rule.update(score, float(epoch)):
            return epoch
    return None


def test_rule_on_a_scripted_sequence():
    # best 0.5 at epoch 2; 0.4 and an equal 0.5 (not an improvement) make it 2 evaluations old
    assert _stop_epoch(2, 0.0) == 4
    assert _stop_epoch(2, 4.5) == 5  # at least min_epochs: 3 stale evaluations by epoch 5
    assert _stop_epoch(3, 0.0) == 5
    assert _stop_epoch(2, 6.0) == 8  # after the new best 0.9 at epoch 6
    assert _stop_epoch(1, 0.0) == 3
    assert _stop_epoch(None, 0.0) is None and _stop_epoch(0, 0.0) is None
    with pytest.raises(ValueError, match="finetune.patience"):
        EarlyStopping(-1)


def _scripted_fit(patience, min_epochs=0.0, epochs=10):
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    x = torch.linspace(-1, 1, 8).unsqueeze(1)
    batches = [(x[:4], 3 * x[:4]), (x[4:], 3 * x[4:])]  # 2 steps per epoch
    snapshots = []

    def predict(m, batch):
        snapshots.append(m.weight.detach().clone())
        return m(batch[0]), batch[1]

    def metrics(out, target):
        return {"loss": 0.0, "acc": SCORES[len(snapshots) - 1]}

    objective = Objective(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), predict, metrics, "acc")
    result = fit(model, objective, batches, [batches[0]],
                 lambda named: torch.optim.SGD([p for _, p in named], lr=0.1), epochs=epochs,
                 device=torch.device("cpu"), progress=False, patience=patience,
                 min_epochs=min_epochs)
    return model, result, snapshots


def test_fit_stops_at_the_rule_and_restores_the_best_weights():
    model, result, snapshots = _scripted_fit(patience=2)
    assert len(result.history) == 4 and result.history[-1]["step"] == 8
    assert result.steps == 8 and result.epochs == 4.0 and result.stopped_early
    assert result.best_val["acc"] == 0.5
    assert torch.equal(model.weight, snapshots[1])  # the weights of the best (2nd) validation
    assert not torch.equal(snapshots[1], snapshots[3])
    model, result, snapshots = _scripted_fit(patience=2, min_epochs=6.0)
    assert result.epochs == 8.0 and torch.equal(model.weight, snapshots[5])


def test_fit_without_patience_is_unchanged():
    model, result, snapshots = _scripted_fit(patience=None)
    assert result.steps == 20 and result.epochs == 10.0 and not result.stopped_early
    assert len(result.history) == 10 and torch.equal(model.weight, snapshots[5])


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


def _check(out, targets, asked):
    results = json.loads((out / "results.json").read_text())
    assert "Fine-tuning epochs used" in results["table"]
    for target in targets:
        entry = results["targets"][target]
        for method in ("only_ft", "bissl_ft"):
            runs = entry[method]["runs"]
            assert all(0 < r["epochs"] <= asked for r in runs)
            assert entry[method]["summary"]["epochs"]["n"] == len(runs)
        assert results["epochs"]["BiSSL+FT"][f"{target} epochs"]["mean"] > 0
        records = [json.loads(line) for line in
                   (out / target / "bissl" / "metrics.jsonl").read_text().splitlines()]
        monitored = [r["alternation"] for r in records if "rankme" in r]
        assert monitored == [0, 2]  # monitor_every=2 over 3 alternations (and the last)
        assert (out / "plots" / f"{target}_monitor.png").exists()
    return results, records


def test_vision_run_with_patience_and_monitor(tmp_path):
    from recipes import vision_bissl

    tiny = [
        "data.image_size=8", "data.test_resize=8", "data.digits_pretext=128",
        "data.digits_train=40", "data.digits_val=30", "model.width=4", "model.proj_dim=16",
        "pretext.epochs=2", "pretext.batch_size=64", "pretext.warmup_epochs=1",
        "finetune.epochs=6", "finetune.batch_size=20", "finetune.search=none",
        "finetune.seeds=[0, 1]", "finetune.patience=1", "finetune.min_epochs=2",
        "warmup.epochs=1", "bissl.alternations=3", "bissl.lower_steps=2", "bissl.upper_steps=2",
        "bissl.lower_batch_size=32", "bissl.upper_batch_size=20",
        "bissl.lower_warmup_alternations=1", "bissl.monitor_every=2", "bissl.monitor_knn_k=5",
        "run.threads=1", "run.progress=false", f"run.out_dir={tmp_path}",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        vision_bissl.main(["all", *sets(*tiny)])
    finally:
        torch.set_num_threads(threads)
    _, records = _check(tmp_path, ["digits"], 6)
    assert 0.0 <= records[0]["knn_accuracy"] <= 1.0


def test_gpt_run_with_patience_and_monitor(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "recipes" / "gpt_glue_bissl.py"
    spec = importlib.util.spec_from_file_location("gpt_glue_bissl_es", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny = [
        "data.tasks=[sst2]", "data.embedded_train=80", "data.embedded_test=40",
        "data.embedded_corpus_sentences=600", "model.context=48", "model.width=16",
        "model.layers=1", "model.heads=2", "model.bpe_vocab=200", "pretrain.steps=5",
        "finetune.epochs=4", "finetune.search=none", "finetune.seeds=[0]",
        "finetune.evals_per_epoch=2", "finetune.patience=1", "bissl.alternations=3",
        "bissl.lower_steps=2", "bissl.upper_steps=1", "bissl.lower_batch_size=4",
        "bissl.cg_iters=2", "bissl.damping=100.0", "bissl.monitor_every=2",
        "bissl.monitor_knn_k=3", "run.progress=false", f"run.out_dir={tmp_path}",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        module.main(["all", *sets(*tiny)])
    finally:
        torch.set_num_threads(threads)
    _, records = _check(tmp_path, ["sst2"], 4)
    assert 0.0 <= records[-1]["knn_accuracy"] <= 1.0
