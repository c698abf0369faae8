"""Tests of ``HessianOperator.batched``: ``k`` stacked tangents answered at once.

Every batched product is checked against two independent references: the ``k`` single products of
the same operator, and the dense Hessian built by ``torch.autograd.functional.hessian`` over a
hand-flattened float64 parameter vector (relative error < 1e-10). Checked:

- a tanh/softplus MLP: the kept graph (``is_grads_batched``) and ``reuse=False`` in every mode
  (``torch.func.vmap``), for random ``k`` and tangents (hypothesis); ``calls`` grows by ``k``;
- a conv net with train-mode BatchNorm through ``functional_module``: batched products equal the
  batch-statistics Hessian and leave the running statistics untouched;
- dropout with ``reuse=False``: batched products use the single products' mask (the dense Hessian
  under the mask drawn at construction), in both modes;
- an operation whose double backward has no batching rule: the products are computed one at a time,
  equal to the dense Hessian, with exactly one ``RuntimeWarning`` naming the reason;
- bad batched tangents (missing names, no leading dimension, wrong trailing shape, disagreeing
  ``k``, not a tensor) raise clear errors and evaluate nothing; ``k = 0`` returns empty stacks;
- ``psd`` is ``False`` and ``memo`` is a fresh empty dict per operator.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import dense_hessian, flat, rel_err
from torch import nn
from torch.func import functional_call

from implicitbilevel.curvature.hessian import HessianOperator, functional_module

products_module = importlib.import_module("implicitbilevel.curvature.base")

DT = torch.float64
MODES = ["auto", "forward-over-reverse", "reverse-over-reverse"]
REL = 1e-10


# ----------------------------------------------------------------------------- references


def stacked_tangents(params: dict[str, torch.Tensor], k: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn((k, *p.shape), generator=gen, dtype=p.dtype) for n, p in params.items()}


def row(tangents: dict, i: int) -> dict:
    return {n: t[i] for n, t in tangents.items()}


def assert_batched_matches(op, tangents: dict, hess: torch.Tensor, params: dict) -> dict:
    """``op.batched`` equals ``k`` single products and the dense Hessian; returns the batch."""
    k = next(iter(tangents.values())).shape[0]
    calls = op.calls
    out = op.batched(tangents)
    assert op.calls == calls + k
    assert list(out.keys()) == list(params.keys())
    for n, p in params.items():
        assert out[n].shape == (k, *p.shape) and out[n].dtype == p.dtype
        assert not out[n].requires_grad
    for i in range(k):
        expected = hess @ flat(row(tangents, i))
        assert rel_err(flat(row(out, i)), expected) < REL
        assert rel_err(flat(row(out, i)), flat(op(row(tangents, i)))) < REL
    assert op.calls == calls + 2 * k
    return out


# ----------------------------------------------------------------------------- MLP


def make_mlp_params(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w1": 0.7 * torch.randn(5, 3, generator=gen, dtype=DT),
        "b1": 0.3 * torch.randn(5, generator=gen, dtype=DT),
        "w2": 0.7 * torch.randn(2, 5, generator=gen, dtype=DT),
        "b2": 0.3 * torch.randn(2, generator=gen, dtype=DT),
    }


def mlp_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ p["w1"].T + p["b1"])
    out = F.softplus(h @ p["w2"].T + p["b2"])
    return ((out - y) ** 2).mean() + 0.1 * F.softplus(p["w1"]).sum()


@pytest.fixture(scope="module")
def mlp():
    params = make_mlp_params()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 3, generator=gen, dtype=DT), torch.randn(7, 2, generator=gen, dtype=DT)
    return params, (x, y), dense_hessian(mlp_loss, params, x, y)


def operators(params, args, fn=mlp_loss):
    yield HessianOperator(fn, params, *args)
    for mode in MODES:
        yield HessianOperator(fn, params, *args, mode=mode, reuse=False)


def test_batched_kept_graph_and_every_mode_match_dense_mlp(mlp):
    params, args, hess = mlp
    tangents = stacked_tangents(params, 4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the vectorised path, no fallback
        for op in operators(params, args):
            mode = op.mode
            assert_batched_matches(op, tangents, hess, params)
            assert op.mode == mode


@settings(max_examples=12, deadline=None)
@given(k=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), reuse=st.booleans())
def test_batched_equals_singles_property(mlp, k, seed, reuse):
    params, args, hess = mlp
    op = HessianOperator(mlp_loss, params, *args, reuse=reuse)
    assert_batched_matches(op, stacked_tangents(params, k, seed), hess, params)


def test_batched_one_tangent_and_empty_batch(mlp):
    params, args, hess = mlp
    for op in operators(params, args):
        assert_batched_matches(op, stacked_tangents(params, 1, seed=3), hess, params)
        calls = op.calls
        empty = op.batched({n: torch.zeros((0, *p.shape), dtype=DT) for n, p in params.items()})
        assert {n: tuple(t.shape) for n, t in empty.items()} == {
            n: (0, *p.shape) for n, p in params.items()
        }
        assert op.calls == calls


def test_batched_unused_and_linear_parameters_give_zero_rows():
    gen = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(3, generator=gen, dtype=DT), "lin": torch.randn(2, generator=gen,
              dtype=DT), "unused": torch.randn(4, generator=gen, dtype=DT)}

    def loss(p):
        return torch.tanh(p["w"]).pow(2).sum() + p["lin"].sum()

    hess = dense_hessian(loss, params)
    assert hess[3:].abs().max() == 0 and hess[:3, :3].abs().max() > 1e-2
    for op in operators(params, (), fn=loss):
        assert_batched_matches(op, stacked_tangents(params, 3, seed=6), hess, params)


# ----------------------------------------------------------------------------- BatchNorm


def make_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 2, kernel_size=2), nn.BatchNorm2d(2), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(2, 2),
    ).to(DT)
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
        net[1].running_mean.uniform_(-1.0, 1.0)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.train()


def test_batched_bn_matches_batch_statistics_hessian_and_keeps_running_stats():
    net = make_bn_net()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    x, target = torch.randn(4, 2, 4, 4, generator=gen, dtype=DT), torch.tensor([0, 1, 1, 0])
    call = functional_module(net)

    def loss(p, x, target):
        out = call(p, x)
        return F.cross_entropy(out, target) + 0.05 * (out**2).mean()

    # Reference: a copy whose BatchNorm normalises with batch statistics and keeps none.
    ref = copy.deepcopy(net)
    ref[1].track_running_stats = False

    def ref_loss(p, x, target):
        out = functional_call(ref, p, (x,))
        return F.cross_entropy(out, target) + 0.05 * (out**2).mean()

    hess = dense_hessian(ref_loss, params, x, target)
    before = {n: b.clone() for n, b in net.named_buffers()}
    tangents = stacked_tangents(params, 3, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for op in operators(params, (x, target), fn=loss):
            assert_batched_matches(op, tangents, hess, params)
            for n, b in net.named_buffers():
                assert torch.equal(b, before[n]), n
    assert net.training


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("mode", MODES)
def test_batched_dropout_uses_the_pinned_mask(mode):
    torch.manual_seed(31)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1),
                        nn.Softplus()).to(DT).train()
    call = functional_module(net)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(32), dtype=DT)

    def loss(p, x):
        return (call(p, x) ** 2).mean()

    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.manual_seed(1234)
    op = HessianOperator(loss, params, x, mode=mode, reuse=False)
    torch.manual_seed(1234)
    hess = dense_hessian(loss, params, x)  # under the mask drawn from the construction state
    torch.manual_seed(4321)
    assert rel_err(dense_hessian(loss, params, x), hess) > 1e-3  # dropout is really active
    state = torch.get_rng_state()
    assert_batched_matches(op, stacked_tangents(params, 3, seed=33), hess, params)
    assert torch.equal(torch.get_rng_state(), state)  # products leave the global stream alone


# ----------------------------------------------------------------------------- fallback


class _CubeGrad(torch.autograd.Function):
    """``3 x² g``, whose own backward branches on data: it has no batching rule under vmap."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x, g)
        return 3 * x * x * g

    @staticmethod
    def backward(ctx, gg):
        x, g = ctx.saved_tensors
        if bool((gg != 0).any()):  # data-dependent: aten::is_nonzero has no batching rule
            return 6 * x * g * gg, 3 * x * x * gg
        return torch.zeros_like(x), torch.zeros_like(g)


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _CubeGrad.apply(x, g)


def cube_loss(p, x):
    return F.softplus(_Cube.apply(x @ p["w"]) @ p["v"]).mean()


def plain_cube_loss(p, x):  # the same function without the custom Functions: the reference
    return F.softplus((x @ p["w"]) ** 3 @ p["v"]).mean()


@pytest.fixture
def cube_setup(monkeypatch):
    monkeypatch.setattr(products_module, "_BATCHED_FALLBACK_WARNED", set())
    gen = torch.Generator().manual_seed(21)
    params = {"w": 0.5 * torch.randn(3, 4, generator=gen, dtype=DT),
              "v": torch.randn(4, generator=gen, dtype=DT)}
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    return params, x, dense_hessian(plain_cube_loss, params, x)


@pytest.mark.parametrize("reuse", [True, False])
def test_batched_falls_back_to_single_products_once(cube_setup, reuse):
    params, x, hess = cube_setup
    mode = "reverse-over-reverse"  # torch.func rejects the legacy Functions in forward mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            op = HessianOperator(cube_loss, params, x, mode=mode, reuse=reuse)
            assert_batched_matches(op, stacked_tangents(params, 3, seed=22), hess, params)
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1
    assert "cube_loss" in runtime[0] and "one at a time" in runtime[0]
    assert "Batching rule not implemented" in runtime[0]  # the reason, from torch


# ----------------------------------------------------------------------------- errors, attributes


def test_batched_tangent_errors_evaluate_nothing(mlp):
    params, args, _ = mlp
    good = stacked_tangents(params, 3, seed=0)
    single = {n: t[0] for n, t in good.items()}
    cases = [
        (KeyError, "b2", {n: t for n, t in good.items() if n != "b2"}),
        (KeyError, "other", dict(good, other=torch.zeros(3, 1, dtype=DT))),
        (ValueError, "leading dimension", single),
        (ValueError, "w2", dict(good, w2=torch.zeros(3, 5, 2, dtype=DT))),
        (ValueError, "disagree", dict(good, b1=torch.zeros(2, 5, dtype=DT))),
        (TypeError, "w1", dict(good, w1=[[0.0] * 3] * 5)),
    ]
    for op in operators(params, args):
        for error, match, tangents in cases:
            with pytest.raises(error, match=match):
                op.batched(tangents)
        assert op.calls == 0


def test_psd_flag_and_memo(mlp):
    params, args, _ = mlp
    assert HessianOperator.psd is False
    a, b = HessianOperator(mlp_loss, params, *args), HessianOperator(mlp_loss, params, *args,
                                                                     reuse=False)
    assert a.psd is False and b.psd is False
    assert a.memo == {} and b.memo == {} and a.memo is not b.memo
    for op in (a, b):
        assert list(op.params) == list(params) and op.names == list(params)
        assert all(torch.equal(op.params[n], params[n]) for n in params)
        assert not any(v.requires_grad for v in op.params.values())
    a.memo["low_rank"] = 1
    assert b.memo == {}
