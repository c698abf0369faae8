"""Tests of :mod:`implicitbilevel.curvature.gauss_newton` against dense Gauss–Newton matrices.

Every reference is built independently of the library: the parameter dict is flattened by hand
into one float64 vector, ``J = ∂z/∂θ`` is materialised by ``torch.autograd.functional.jacobian``
and ``∇²_z L`` by ``torch.autograd.functional.hessian``, and ``G = Jᵀ ∇²_z L J`` is multiplied
out. Checked (relative error < 1e-10 throughout):

- products through the kept graph and with ``reuse=False``, each in every mode, for cross-entropy
  over logits and for squared error, on a tanh MLP and on conv nets with train-mode BatchNorm
  (whose running statistics no product touches);
- the kept graph's forward-mode ``J t`` and its double-vjp ``J t`` give the same products (float64,
  1e-12) on BatchNorm conv nets and under dropout; the forward-mode pass reproduces the kept
  outputs bit for bit, draws nothing from the caller's random stream, and is not run at all in
  ``"reverse-over-reverse"``;
- the dense ``G`` is positive semi-definite while the exact Hessian of the same loss has a negative
  eigenvalue; for a linear model under squared error ``G`` equals the Hessian, and the product
  equals ``HessianOperator``'s;
- batched products equal single products and the dense matrix (hypothesis over ``k`` and the
  tangents); the modes agree with each other; a subset of names gives the matching block;
- dropout: every product of one operator uses the mask drawn at construction;
- a legacy ``autograd.Function`` in the model: ``"auto"`` falls back once with a warning (kept
  graph and ``reuse=False``, single and batched products), ``"forward-over-reverse"`` raises
  ``HVPModeError``; a Function with a forward-mode rule but no batching rule keeps forward mode
  and computes batched products one at a time;
- the :class:`GaussNewton` spec, the attributes (``loss``, ``calls``, ``mode``, ``psd``, ``memo``)
  and the errors (outputs that are not one float tensor, a non-scalar output loss, bad tangents,
  an invalid mode); zero curvature where the output loss is linear or a parameter is unused.
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
from reference import dense_hessian, flat, rel_err, unflat
from torch import nn
from torch.func import functional_call

from implicitbilevel.curvature.gauss_newton import GaussNewton, GaussNewtonOperator
from implicitbilevel.curvature.hessian import HessianOperator, HVPModeError, functional_module

gn_module = importlib.import_module("implicitbilevel.curvature.gauss_newton")
products_module = importlib.import_module("implicitbilevel.curvature.base")

DT = torch.float64
MODES = ["auto", "forward-over-reverse", "reverse-over-reverse"]
REL = 1e-10


# ----------------------------------------------------------------------------- references


def dense_gn(outputs, output_loss, params: dict, *args) -> torch.Tensor:
    """``Jᵀ ∇²_z L J`` over the flattened ``params``, from dense autograd matrices."""
    like = {n: p.detach() for n, p in params.items()}
    theta = flat(like)
    state = torch.get_rng_state()  # both forward passes draw the same dropout mask
    z = outputs(like, *args).detach()
    torch.set_rng_state(state)
    jac = torch.autograd.functional.jacobian(
        lambda v: outputs(unflat(v, like), *args).reshape(-1), theta
    )
    hz = torch.autograd.functional.hessian(
        lambda u: output_loss(u.reshape(z.shape), *args), z.reshape(-1)
    )
    return jac.T @ hz @ jac


def random_tangent(params: dict, seed: int, k: int | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lead = () if k is None else (k,)
    return {n: torch.randn((*lead, *p.shape), generator=gen, dtype=p.dtype)
            for n, p in params.items()}


def row(tangents: dict, i: int) -> dict:
    return {n: t[i] for n, t in tangents.items()}


def assert_matches(product: dict, tangent: dict, matrix: torch.Tensor, params: dict) -> None:
    assert list(product.keys()) == list(params.keys())
    for n, p in params.items():
        assert product[n].shape == p.shape and product[n].dtype == p.dtype
        assert not product[n].requires_grad
    assert rel_err(flat(product), matrix @ flat(tangent)) < REL


def assert_batched_matches(op, tangents: dict, matrix: torch.Tensor, params: dict) -> None:
    k = next(iter(tangents.values())).shape[0]
    calls = op.calls
    out = op.batched(tangents)
    assert op.calls == calls + k
    for n, p in params.items():
        assert out[n].shape == (k, *p.shape) and not out[n].requires_grad
    for i in range(k):
        assert rel_err(flat(row(out, i)), matrix @ flat(row(tangents, i))) < REL
        assert rel_err(flat(row(out, i)), flat(op(row(tangents, i)))) < REL


def operators(outputs, output_loss, params, args):
    for reuse in (True, False):
        for mode in MODES:
            yield GaussNewtonOperator(outputs, output_loss, params, *args, mode=mode, reuse=reuse)


# ----------------------------------------------------------------------------- MLP


def make_mlp_params(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w1": 1.2 * torch.randn(5, 3, generator=gen, dtype=DT),
        "b1": 0.3 * torch.randn(5, generator=gen, dtype=DT),
        "w2": 1.2 * torch.randn(3, 5, generator=gen, dtype=DT),
        "b2": 0.3 * torch.randn(3, generator=gen, dtype=DT),
    }


def mlp_outputs(p, x, y):
    return F.softplus(torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T) + p["b2"]


def cross_entropy(z, x, y):
    return F.cross_entropy(z, y)


def squared_error(z, x, y):
    return 0.5 * ((z - F.one_hot(y, 3).to(z.dtype)) ** 2).sum(dim=1).mean()


def mlp_data(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen)


OUTPUT_LOSSES = {"cross-entropy": cross_entropy, "squared-error": squared_error}


@pytest.fixture(scope="module", params=list(OUTPUT_LOSSES))
def mlp(request):
    output_loss = OUTPUT_LOSSES[request.param]
    params = make_mlp_params()
    args = mlp_data()
    return output_loss, params, args, dense_gn(mlp_outputs, output_loss, params, *args)


def test_products_match_dense_gn_mlp(mlp):
    output_loss, params, args, gn = mlp
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no mode or batching fallback
        for op in operators(mlp_outputs, output_loss, params, args):
            mode = op.mode
            for seed in (0, 1):
                t = random_tangent(params, seed)
                assert_matches(op(t), t, gn, params)
            assert op.calls == 2 and op.mode == mode
            assert_batched_matches(op, random_tangent(params, 2, k=3), gn, params)


def test_modes_agree_with_each_other(mlp):
    output_loss, params, args, _ = mlp
    t = random_tangent(params, 5)
    products = [flat(op(t)) for op in operators(mlp_outputs, output_loss, params, args)]
    assert products[0].norm() > 1e-3
    for product in products[1:]:
        assert rel_err(product, products[0]) < REL


def test_gn_is_psd_while_the_hessian_is_indefinite(mlp):
    output_loss, params, args, gn = mlp
    eig = torch.linalg.eigvalsh(gn)
    assert eig.min() >= -1e-10 * eig.max()
    hess = dense_hessian(lambda p, *a: output_loss(mlp_outputs(p, *a), *a), params, *args)
    hess_eig = torch.linalg.eigvalsh(hess)
    assert hess_eig.min() < -1e-3 * hess_eig.max()
    assert rel_err(gn, hess) > 1e-2  # G drops the model's own curvature
    # The operator's quadratic form is non-negative on random directions, as G's is.
    op = GaussNewtonOperator(mlp_outputs, output_loss, params, *args)
    for seed in range(5):
        t = random_tangent(params, 10 + seed)
        assert float(flat(t) @ flat(op(t))) >= 0.0


@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), reuse=st.booleans())
def test_batched_equals_singles_property(mlp, k, seed, reuse):
    output_loss, params, args, gn = mlp
    op = GaussNewtonOperator(mlp_outputs, output_loss, params, *args, reuse=reuse)
    assert_batched_matches(op, random_tangent(params, seed, k=k), gn, params)


@pytest.mark.parametrize("names", [["w1"], ["b2", "w1"], ["w2", "b1"]])
def test_subset_gives_the_matching_block(names):
    params = make_mlp_params()
    args = mlp_data()
    gn = dense_gn(mlp_outputs, cross_entropy, params, *args)
    offsets, offset = {}, 0
    for n, p in params.items():
        offsets[n] = torch.arange(offset, offset + p.numel())
        offset += p.numel()
    idx = torch.cat([offsets[n] for n in names])
    block = gn[idx][:, idx]
    fixed = dict(params)

    def outputs_over(sub, x, y):
        return mlp_outputs({**fixed, **sub}, x, y)

    sub = {n: params[n] for n in names}
    for op in operators(outputs_over, cross_entropy, sub, args):
        assert op.names == names
        t = random_tangent(sub, 7)
        assert_matches(op(t), t, block, sub)
        assert_batched_matches(op, random_tangent(sub, 8, k=2), block, sub)


# ----------------------------------------------------------------------------- linear model


def test_linear_model_squared_error_gn_equals_hessian():
    gen = torch.Generator().manual_seed(11)
    params = {"w": torch.randn(3, 4, generator=gen, dtype=DT),
              "b": torch.randn(3, generator=gen, dtype=DT)}
    x, y = torch.randn(6, 4, generator=gen, dtype=DT), torch.randint(0, 3, (6,), generator=gen)

    def linear(p, x, y):
        return x @ p["w"].T + p["b"]

    spec = GaussNewton(linear, squared_error)
    hess = dense_hessian(spec, params, x, y)
    assert rel_err(dense_gn(linear, squared_error, params, x, y), hess) < REL
    exact = HessianOperator(spec, params, x, y)
    for op in operators(linear, squared_error, params, (x, y)):
        t = random_tangent(params, 12)
        assert_matches(op(t), t, hess, params)
        assert rel_err(flat(op(t)), flat(exact(t))) < REL


# ----------------------------------------------------------------------------- BatchNorm


def make_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 2, kernel_size=2), nn.BatchNorm2d(2), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(2, 3),
    ).to(DT)
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
        net[1].running_mean.uniform_(-1.0, 1.0)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.train()


@pytest.mark.parametrize("loss_name", list(OUTPUT_LOSSES))
def test_bn_products_match_dense_and_keep_running_stats(loss_name):
    output_loss = OUTPUT_LOSSES[loss_name]
    net = make_bn_net()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    args = (torch.randn(4, 2, 4, 4, generator=gen, dtype=DT), torch.tensor([0, 2, 1, 0]))
    call = functional_module(net)

    def outputs(p, x, y):
        return call(p, x)

    # Reference: a copy whose BatchNorm normalises with batch statistics and keeps none.
    ref = copy.deepcopy(net)
    ref[1].track_running_stats = False
    gn = dense_gn(lambda p, x, y: functional_call(ref, p, (x,)), output_loss, params, *args)
    assert gn.abs().max() > 1e-3
    before = {n: b.clone() for n, b in net.named_buffers()}
    for op in operators(outputs, output_loss, params, args):
        t = random_tangent(params, 3)
        assert_matches(op(t), t, gn, params)
        assert_batched_matches(op, random_tangent(params, 4, k=3), gn, params)
        for n, b in net.named_buffers():
            assert torch.equal(b, before[n]), n
    assert net.training


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_dropout_operator_uses_the_mask_drawn_at_construction(reuse, mode):
    torch.manual_seed(31)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DT)
    call = functional_module(net.train())
    gen = torch.Generator().manual_seed(32)
    args = (torch.randn(10, 4, generator=gen, dtype=DT), torch.randint(0, 3, (10,), generator=gen))

    def outputs(p, x, y):
        return call(p, x)

    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.manual_seed(1234)
    op = GaussNewtonOperator(outputs, cross_entropy, params, *args, mode=mode, reuse=reuse)
    torch.manual_seed(1234)
    gn = dense_gn(outputs, cross_entropy, params, *args)
    torch.manual_seed(4321)
    assert rel_err(dense_gn(outputs, cross_entropy, params, *args), gn) > 1e-3  # dropout is on
    u, v = random_tangent(params, 1), random_tangent(params, 2)
    assert_matches(op(u), u, gn, params)
    hv = op(v)
    assert torch.equal(flat(hv), flat(op(v)))
    assert_batched_matches(op, random_tangent(params, 3, k=3), gn, params)


# ----------------------------------------------------------------------------- kept graph: J t


TIGHT = 1e-12


class JvpSpy:
    """Stands in for ``torch.func.jvp``: counts the calls and keeps the primal outputs."""

    def __init__(self):
        self.jvp = torch.func.jvp
        self.calls = 0
        self.primals = []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        primal, tangent = self.jvp(*args, **kwargs)
        self.primals.append(primal)
        return primal, tangent


def make_two_conv_bn_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).to(DT).train()


def assert_same_products(op, ref_op, t: dict, tb: dict) -> None:
    single, ref = op(t), ref_op(t)
    assert flat(ref).norm() > 1e-3
    assert rel_err(flat(single), flat(ref)) < TIGHT
    batch, ref_batch = op.batched(tb), ref_op.batched(tb)
    for i in range(next(iter(tb.values())).shape[0]):
        assert rel_err(flat(row(batch, i)), flat(row(ref_batch, i))) < TIGHT


@pytest.mark.parametrize("make_net,shape", [(make_bn_net, (4, 2, 4, 4)),
                                            (make_two_conv_bn_net, (6, 3, 5, 5))])
def test_kept_forward_mode_equals_double_vjp_on_bn_nets(monkeypatch, make_net, shape):
    net = make_net()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(8)
    args = (torch.randn(*shape, generator=gen, dtype=DT),
            torch.randint(0, 3, (shape[0],), generator=gen))
    call = functional_module(net)

    def outputs(p, x, y):
        return call(p, x)

    ref = copy.deepcopy(net)
    for module in ref.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats = False
    gn = dense_gn(lambda p, x, y: functional_call(ref, p, (x,)), cross_entropy, params, *args)
    before = {n: b.clone() for n, b in net.named_buffers()}
    spy = JvpSpy()
    monkeypatch.setattr(torch.func, "jvp", spy)
    t, tb = random_tangent(params, 6), random_tangent(params, 7, k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no mode or batching fallback
        double_vjp = GaussNewtonOperator(outputs, cross_entropy, params, *args,
                                         mode="reverse-over-reverse")
        assert_matches(double_vjp(t), t, gn, params)
        assert spy.calls == 0
        for mode in ("auto", "forward-over-reverse"):
            op = GaussNewtonOperator(outputs, cross_entropy, params, *args, mode=mode)
            calls = spy.calls
            assert_same_products(op, double_vjp, t, tb)
            assert spy.calls == calls + 2  # one jvp per call, the batched one under vmap
            assert torch.equal(spy.primals[-2], op._graph.z.detach())  # the kept z, bit for bit
            assert op._graph.mode == mode and op._graph._jtw is None  # no double-vjp graph
            assert_matches(op(t), t, gn, params)
    for n, b in net.named_buffers():
        assert torch.equal(b, before[n]), n


def test_kept_forward_mode_equals_double_vjp_under_dropout(monkeypatch):
    torch.manual_seed(41)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DT)
    call = functional_module(net.train())
    gen = torch.Generator().manual_seed(42)
    args = (torch.randn(10, 4, generator=gen, dtype=DT), torch.randint(0, 3, (10,), generator=gen))

    def outputs(p, x, y):
        return call(p, x)

    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.manual_seed(99)
    gn = dense_gn(outputs, cross_entropy, params, *args)
    ops = {}
    for mode in ("forward-over-reverse", "reverse-over-reverse"):
        torch.manual_seed(99)  # the same mask as the dense reference
        ops[mode] = GaussNewtonOperator(outputs, cross_entropy, params, *args, mode=mode)
    spy = JvpSpy()
    monkeypatch.setattr(torch.func, "jvp", spy)
    stream = torch.get_rng_state()
    forward, double_vjp = ops["forward-over-reverse"], ops["reverse-over-reverse"]
    t, tb = random_tangent(params, 1), random_tangent(params, 2, k=3)
    assert_same_products(forward, double_vjp, t, tb)
    assert spy.calls == 2 and torch.equal(spy.primals[0], forward._graph.z.detach())
    for op in ops.values():
        assert_matches(op(t), t, gn, params)
        assert_batched_matches(op, tb, gn, params)
    assert torch.equal(torch.get_rng_state(), stream)  # the caller's stream did not move


@pytest.mark.parametrize("reuse", [True, False])
def test_reverse_over_reverse_never_runs_forward_mode(monkeypatch, reuse):
    def forbidden(*args, **kwargs):
        raise AssertionError("forward mode ran")

    monkeypatch.setattr(torch.func, "jvp", forbidden)
    net = make_bn_net()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(9)
    args = (torch.randn(4, 2, 4, 4, generator=gen, dtype=DT), torch.tensor([1, 0, 2, 0]))
    call = functional_module(net)
    ref = copy.deepcopy(net)
    ref[1].track_running_stats = False
    gn = dense_gn(lambda p, x, y: functional_call(ref, p, (x,)), squared_error, params, *args)
    op = GaussNewtonOperator(lambda p, x, y: call(p, x), squared_error, params, *args,
                             mode="reverse-over-reverse", reuse=reuse)
    t = random_tangent(params, 10)
    assert_matches(op(t), t, gn, params)
    assert_batched_matches(op, random_tangent(params, 11, k=2), gn, params)
    with pytest.raises(AssertionError, match="forward mode ran"):  # the patch is in place
        GaussNewtonOperator(lambda p, x, y: call(p, x), squared_error, params, *args)(t)


# ----------------------------------------------------------------------------- legacy Function


class LegacyTanh(torch.autograd.Function):
    """tanh as an old-style autograd.Function: no setup_context, no jvp (double backward works)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def legacy_outputs(p, x, y):
    return LegacyTanh.apply(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]


def plain_outputs(p, x, y):  # the same function with torch.tanh: the independent reference
    return torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]


def test_legacy_function_auto_falls_back_once_and_forward_mode_raises(monkeypatch):
    monkeypatch.setattr(gn_module, "_FALLBACK_WARNED", set())
    params = make_mlp_params(3)
    args = mlp_data(4)
    gn = dense_gn(plain_outputs, cross_entropy, params, *args)
    t = random_tangent(params, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            op = GaussNewtonOperator(legacy_outputs, cross_entropy, params, *args, reuse=False)
            assert_matches(op(t), t, gn, params)
            assert op.mode == "reverse-over-reverse"
            assert_batched_matches(op, random_tangent(params, 1, k=2), gn, params)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "legacy_outputs" in messages[0]
    assert "reverse-over-reverse" in messages[0]
    op = GaussNewtonOperator(legacy_outputs, cross_entropy, params, *args,
                             mode="forward-over-reverse", reuse=False)
    with pytest.raises(HVPModeError, match="reverse-over-reverse"):
        op(t)
    assert_matches(GaussNewtonOperator(legacy_outputs, cross_entropy, params, *args)(t), t, gn,
                   params)


@pytest.mark.parametrize("batched_first", [False, True])
def test_legacy_function_kept_graph_falls_back_once(monkeypatch, batched_first):
    monkeypatch.setattr(gn_module, "_FALLBACK_WARNED", set())
    monkeypatch.setattr(products_module, "_BATCHED_FALLBACK_WARNED", set())
    params = make_mlp_params(5)
    args = mlp_data(6)
    gn = dense_gn(plain_outputs, squared_error, params, *args)
    t, tb = random_tangent(params, 0), random_tangent(params, 1, k=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            op = GaussNewtonOperator(legacy_outputs, squared_error, params, *args)
            if batched_first:
                assert_batched_matches(op, tb, gn, params)
            assert_matches(op(t), t, gn, params)
            assert_batched_matches(op, tb, gn, params)
            assert op.mode == "kept-graph" and op._graph.mode == "reverse-over-reverse"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "legacy_outputs" in messages[0]
    assert "Gauss-Newton" in messages[0] and "reverse-over-reverse" in messages[0]
    op = GaussNewtonOperator(legacy_outputs, squared_error, params, *args,
                             mode="forward-over-reverse")
    with pytest.raises(HVPModeError, match="reverse-over-reverse"):
        op(t)
    with pytest.raises(HVPModeError, match="reverse-over-reverse"):
        op.batched(tb)


class TanhWithoutVmap(torch.autograd.Function):
    """tanh with a forward-mode rule but no batching rule: ``vmap`` over it raises.

    (Its name must not mention forward mode: the error message quotes it.)
    """

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)

    @staticmethod
    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return tangent * (1 - y * y)


def unvmappable_outputs(p, x, y):
    return TanhWithoutVmap.apply(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]


def test_missing_batching_rule_keeps_forward_mode_and_loops(monkeypatch):
    monkeypatch.setattr(gn_module, "_FALLBACK_WARNED", set())
    monkeypatch.setattr(products_module, "_BATCHED_FALLBACK_WARNED", set())
    params = make_mlp_params(7)
    args = mlp_data(8)
    gn = dense_gn(plain_outputs, cross_entropy, params, *args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = GaussNewtonOperator(unvmappable_outputs, cross_entropy, params, *args)
        assert_batched_matches(op, random_tangent(params, 2, k=3), gn, params)
        assert_batched_matches(op, random_tangent(params, 3, k=2), gn, params)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "one at a time" in messages[0]
    assert op._graph.mode == "auto" and op._graph._jtw is None


# ----------------------------------------------------------------------------- spec, attributes


def test_spec_loss_operator_and_attributes():
    params = make_mlp_params()
    x, y = mlp_data()
    spec = GaussNewton(mlp_outputs, cross_entropy)
    expected = F.cross_entropy(mlp_outputs(params, x, y), y)
    torch.testing.assert_close(spec.loss(params, x, y), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(spec(params, x, y), expected, rtol=1e-14, atol=0)
    gn = dense_gn(mlp_outputs, cross_entropy, params, x, y)
    op = spec.operator(params, x, y)
    assert isinstance(op, GaussNewtonOperator) and op.mode == "kept-graph"
    torch.testing.assert_close(op.loss, expected, rtol=1e-14, atol=0)
    assert op.names == list(params) and op.calls == 0
    assert all(torch.equal(op.params[n], params[n]) for n in params)
    assert GaussNewtonOperator.psd is True and op.psd is True
    other = spec.operator(params, x, y, mode="reverse-over-reverse", reuse=False)
    assert other.loss is None and other.mode == "reverse-over-reverse"
    assert op.memo == {} and other.memo == {} and op.memo is not other.memo
    t = random_tangent(params, 9)
    assert_matches(other(t), t, gn, params)


def test_zero_curvature_cases():
    params = make_mlp_params()
    args = mlp_data()
    params_unused = dict(params, unused=torch.ones(2, dtype=DT))

    def linear_in_z(z, x, y):
        return z.sum()

    for op in operators(mlp_outputs, linear_in_z, params, args):
        product = op(random_tangent(params, 0))
        assert all(torch.equal(v, torch.zeros_like(v)) for v in product.values())
        batch = op.batched(random_tangent(params, 1, k=2))
        assert all(torch.equal(v, torch.zeros_like(v)) for v in batch.values())
    gn = dense_gn(mlp_outputs, squared_error, params_unused, *args)
    assert gn[-2:].abs().max() == 0 and gn[:-2, :-2].abs().max() > 1e-3
    for op in operators(mlp_outputs, squared_error, params_unused, args):
        t = random_tangent(params_unused, 2)
        assert_matches(op(t), t, gn, params_unused)
        assert_batched_matches(op, random_tangent(params_unused, 3, k=2), gn, params_unused)


def test_errors():
    params = make_mlp_params()
    args = mlp_data()

    def tuple_outputs(p, x, y):
        return mlp_outputs(p, x, y), x

    def int_outputs(p, x, y):
        return y

    def vector_loss(z, x, y):
        return (z**2).sum(dim=1)

    for reuse in (True, False):
        for outputs in (tuple_outputs, int_outputs):
            with pytest.raises(TypeError, match="one floating-point Tensor"):
                GaussNewtonOperator(outputs, cross_entropy, params, *args, reuse=reuse)(
                    random_tangent(params, 0))
        with pytest.raises(ValueError, match="scalar"):
            GaussNewtonOperator(mlp_outputs, vector_loss, params, *args, reuse=reuse)(
                random_tangent(params, 0))
    for mode in ("forward", "", None):
        with pytest.raises(ValueError, match="mode"):
            GaussNewtonOperator(mlp_outputs, cross_entropy, params, *args, mode=mode)
    t = random_tangent(params, 0)
    tb = random_tangent(params, 0, k=2)
    for op in operators(mlp_outputs, cross_entropy, params, args):
        with pytest.raises(KeyError, match="b2"):
            op({n: v for n, v in t.items() if n != "b2"})
        with pytest.raises(ValueError, match="w2"):
            op(dict(t, w2=torch.zeros(5, 3, dtype=DT)))
        with pytest.raises(ValueError, match="leading dimension"):
            op.batched(t)
        with pytest.raises(ValueError, match="disagree"):
            op.batched(dict(tb, b1=torch.zeros(3, 5, dtype=DT)))
        with pytest.raises(KeyError, match="other"):
            op.batched(dict(tb, other=torch.zeros(2, 1, dtype=DT)))
        assert op.calls == 0
