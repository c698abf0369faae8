"""Hessian-vector products through GPT blocks: both HVP modes agree (tiny config, float64)."""

import copy

import pytest
import torch

from implicitbilevel import HessianOperator, hvp
from recipes.nlp.bissl_stage import make_losses
from recipes.nlp.model import GPTDownstreamModel, GPTPretextModel, build_gpt
from recipes.nlp.tasks import get_task

V = 30


def _setup(task):
    torch.manual_seed(0)
    gpt = build_gpt(vocab_size=V, context=12, width=8, layers=2, heads=2, dropout=0.0).double()
    spec = get_task(task)
    down = GPTDownstreamModel(
        copy.deepcopy(gpt), spec.num_special_tokens, spec.num_outputs, 0.0
    ).double()
    pre = GPTPretextModel(gpt)
    return spec, down, pre


def _rel(a, b):
    num = sum(((a[n] - b[n]) ** 2).sum() for n in a).sqrt()
    return float(num / sum((b[n] ** 2).sum() for n in b).sqrt())


def test_pretext_hvp_modes_agree_and_are_symmetric():
    spec, down, pre = _setup("sst2")
    _, pretext_loss, _ = make_losses(down, pre, spec, nu=0.5)
    params = {n: p.detach() for n, p in pre.named_parameters()}
    chunks = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    w = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    fwd = hvp(pretext_loss, params, v, chunks, mode="forward-over-reverse")
    rev = hvp(pretext_loss, params, v, chunks, mode="reverse-over-reverse")
    assert _rel(fwd, rev) < 1e-10
    assert _rel(HessianOperator(pretext_loss, params, chunks)(v), rev) < 1e-10
    hw = hvp(pretext_loss, params, w, chunks, mode="forward-over-reverse")
    vhw = sum((v[n] * hw[n]).sum() for n in v)
    whv = sum((w[n] * fwd[n]).sum() for n in w)
    assert torch.allclose(vhw, whv, rtol=1e-9)
    assert float(sum((p**2).sum() for p in fwd.values())) > 0


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_downstream_hvp_modes_agree(task):
    spec, down, pre = _setup(task)
    down_loss, _, _ = make_losses(down, pre, spec, nu=0.5)
    params = {n: p.detach() for n, p in down.named_parameters()}
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V + 3, (3, spec.num_views, 9), generator=g)
    lengths = torch.tensor([[9] * spec.num_views, [7] * spec.num_views, [5] * spec.num_views])
    labels = (
        torch.rand(3, generator=g, dtype=torch.float64) * 5
        if spec.is_regression
        else torch.randint(0, 2, (3,), generator=g)
    )
    batch = (ids, lengths, labels)
    v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    fwd = hvp(down_loss, params, v, batch, mode="forward-over-reverse")
    rev = hvp(down_loss, params, v, batch, mode="reverse-over-reverse")
    assert _rel(fwd, rev) < 1e-10
    assert float(fwd["new_token_embeddings"].abs().sum()) > 0
