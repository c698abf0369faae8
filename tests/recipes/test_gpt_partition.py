"""The special-token rows belong to the downstream head φ_D (thesis Sec. 5.4.1, 7.1.3).

Checked on a tiny GPT: the backbones of both sides have equal names and shapes and hold only the
V pretrained rows; lower-level steps and Hessian-vector products never involve the new rows; the
proximal coupling ignores them; substituting θ_P replaces only the pretrained rows.
"""

import copy

import pytest
import torch

from implicitbilevel import ProximalL2
from implicitbilevel.bissl import bissl_upper_loss
from recipes.nlp.bissl_stage import build_problem, make_losses
from recipes.nlp.config import BiSSLStageConfig
from recipes.nlp.model import (
    GPTDownstreamModel,
    GPTPretextModel,
    backbone_names,
    build_gpt,
    head_names,
    load_backbone,
)
from recipes.nlp.tasks import get_task

V, D = 40, 16


def _models(task="rte", dropout=0.0):
    torch.manual_seed(0)
    gpt = build_gpt(vocab_size=V, context=16, width=D, layers=1, heads=2, dropout=dropout)
    spec = get_task(task)
    down = GPTDownstreamModel(copy.deepcopy(gpt), spec.num_special_tokens, spec.num_outputs, 0.0)
    pre = GPTPretextModel(copy.deepcopy(gpt))
    return spec, down, pre


def _batches(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (4, spec.num_views, 10), generator=g)
    ids[..., 0] = V  # start
    if spec.kind != "classification":
        ids[..., 4] = V + 2  # delimiter
    lengths = torch.full((4, spec.num_views), 10)
    ids[..., 9] = V + 1  # end
    labels = torch.randint(0, 2, (4,), generator=g)
    chunks = torch.randint(0, V, (3, 12), generator=g)
    return (ids, lengths, labels), chunks


def test_backbones_share_names_and_shapes_and_hold_only_pretrained_rows():
    spec, down, pre = _models()
    dp, pp = dict(down.named_parameters()), dict(pre.named_parameters())
    assert backbone_names(down) == list(pp)  # φ_P is empty
    assert all(dp[n].shape == pp[n].shape for n in pp)
    assert dp["gpt.transformer.tokens_embed.weight"].shape == (V, D)
    assert head_names(down) == ["new_token_embeddings", "head.weight", "head.bias"]
    assert down.new_token_embeddings.shape == (3, D)
    assert down.embedding_matrix().shape == (V + 3, D)
    # input and output embeddings are tied in both models
    assert pre.gpt.lm_head.weight is pre.gpt.transformer.tokens_embed.weight
    assert down.gpt.lm_head.weight is down.gpt.transformer.tokens_embed.weight


def test_lower_steps_and_hvps_leave_the_new_rows_alone():
    spec, down, pre = _models()
    upper_batch, chunks = _batches(spec)
    problem = build_problem(down, pre, spec, 0.5, BiSSLStageConfig(lam=0.1, damping=100.0))
    new_rows = down.new_token_embeddings.detach().clone()
    upper, lower = dict(down.named_parameters()), dict(pre.named_parameters())
    before = {n: p.detach().clone() for n, p in lower.items()}
    opt = torch.optim.SGD(pre.parameters(), lr=0.1)
    for _ in range(3):
        out = problem.lower_grad(upper, lower, chunks)
        assert set(out.grads) == set(lower)  # only θ_P, no special rows anywhere
        for n, p in lower.items():
            p.grad = out.grads[n]
        opt.step()
    assert any(not torch.equal(before[n], p) for n, p in lower.items())
    hessian = problem.lower_hessian(upper, lower, chunks)
    assert hessian.names == backbone_names(down)
    tangent = {n: torch.randn_like(p) for n, p in lower.items()}
    product = hessian(tangent)
    assert product["gpt.transformer.tokens_embed.weight"].shape == (V, D)
    result = problem.upper_grad(upper, lower, upper_batch, lower_hessian=hessian)
    assert set(result.u) == set(lower)
    assert torch.equal(down.new_token_embeddings, new_rows)  # lower side never touched them
    # the upper level does train them (they are part of φ_D)
    assert result.grads["new_token_embeddings"].abs().sum() > 0


def test_coupling_distance_ignores_the_new_rows():
    spec, down, pre = _models()
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reg = ProximalL2(backbone_names(down))
    upper, lower = dict(down.named_parameters()), dict(pre.named_parameters())
    expected = 0.5 * sum(((upper[n] - lower[n]) ** 2).sum() for n in lower)
    assert torch.allclose(reg.value(upper, lower), expected)
    with torch.no_grad():
        down.new_token_embeddings.add_(5.0)
        down.head.weight.add_(5.0)
    assert torch.allclose(reg.value(upper, lower), expected)


@pytest.mark.parametrize("task", ["sst2", "rte", "stsb"])
def test_substitution_replaces_only_the_pretrained_rows(task):
    spec, down, pre = _models(task)
    upper_batch, _ = _batches(spec)
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.05 * torch.randn_like(p))
    down_loss, _, _ = make_losses(down, pre, spec, nu=0.5)
    upper, lower = dict(down.named_parameters()), dict(pre.named_parameters())
    f = bissl_upper_loss(down_loss, backbone_names(down))
    # reference: a copy of the downstream model whose backbone is overwritten with θ_P
    reference = copy.deepcopy(down)
    load_backbone(reference, pre)
    assert torch.equal(reference.embedding_matrix()[:V], pre.gpt.transformer.tokens_embed.weight)
    assert torch.equal(reference.embedding_matrix()[V:], down.new_token_embeddings)
    ref_loss, _, _ = make_losses(reference, pre, spec, nu=0.5)
    first_term = ref_loss(dict(reference.named_parameters()), upper_batch)
    second_term = down_loss(upper, upper_batch)
    assert not torch.allclose(first_term, second_term)
    assert torch.allclose(f(upper, lower, upper_batch), first_term + second_term, atol=1e-6)
