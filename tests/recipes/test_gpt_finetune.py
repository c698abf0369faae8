"""Fine-tuning (the shared loop with the GPT objective): evaluation schedule, best-validation
restore, frozen backbone in the warm-up."""

import copy

import torch

from recipes.nlp.finetune import evaluate, finetune, warmup_cosine
from recipes.nlp.model import GPTDownstreamModel, build_gpt
from recipes.nlp.synthetic import synthetic_task
from recipes.nlp.tasks import SpecialTokens, encode_split, get_task
from recipes.nlp.tokenizer import train_bpe


def _setup():
    spec = get_task("sst2")
    train, test = synthetic_task("sst2", 96, 32, seed=0)
    encoder = train_bpe(train.texts_a, 120)
    tokens = SpecialTokens(encoder.vocab_size)
    enc = [encode_split(spec, s.texts_a, None, s.labels, encoder, tokens, 32)
           for s in (train, test)]
    torch.manual_seed(0)
    gpt = build_gpt(vocab_size=encoder.vocab_size, context=32, width=16, layers=1, heads=2)
    return spec, enc[0], enc[1], GPTDownstreamModel(gpt, 2, 2)


def test_schedule_warms_up_then_decays_to_zero():
    f = warmup_cosine(100, 10)
    assert f(0) < f(5) < f(9) <= 1.0
    assert abs(f(10) - 1.0) < 1e-12 and f(55) < f(20) and f(100) == 0.0


def test_best_validation_weights_are_restored():
    spec, train, val, model = _setup()
    result = finetune(model, spec, train, val, lr=3e-3, weight_decay=0.01, epochs=2,
                      batch_size=16, nu=0.5, seed=0, evals_per_epoch=3)
    curve = [h["accuracy"] for h in result.history]
    assert len(curve) == 6 and result.steps == 12
    assert [h["step"] for h in result.history] == [2, 4, 6, 8, 10, 12]
    assert result.best_val["accuracy"] == max(curve)
    assert evaluate(model, spec, val) == result.best_val["accuracy"]


def test_head_warm_up_freezes_the_backbone_only():
    spec, train, val, model = _setup()
    before = copy.deepcopy(model.state_dict())
    finetune(model, spec, train, val, lr=1e-2, weight_decay=0.0, epochs=0.5, batch_size=16,
             nu=0.5, seed=0, evals_per_epoch=2, freeze_backbone=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("gpt."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["new_token_embeddings"], after["new_token_embeddings"])
    assert all(p.requires_grad for p in model.parameters())
