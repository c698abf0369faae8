"""Tests of :mod:`implicitbilevel.curvature.hessian` against dense Hessians
(``torch.autograd.functional``).

Every reference Hessian is built independently: the parameter dict is flattened by hand into one
float64 vector, the loss is written as a function of that vector, and
``torch.autograd.functional.hessian`` materialises the full matrix. Checked:

- ``hvp`` in ``"auto"``, ``"forward-over-reverse"`` and ``"reverse-over-reverse"`` and
  ``HessianOperator`` (``reuse=True``, the kept graph, and ``reuse=False`` in each mode) on a small
  tanh/softplus MLP in float64 (relative error < 1e-10), including the whole Hessian rebuilt column
  by column from the kept graph;
- a small conv net with train-mode BatchNorm through ``functional_module``: products equal the
  batch-statistics Hessian; the module's running statistics are untouched by products of every
  kind, while a plain ``functional_module`` call outside a product does update them (checked
  against the momentum formula);
- a subset of parameter names gives the matching block of the full Hessian; a row subset of an
  embedding matrix (``torch.cat([rows, frozen_rest])``) gives the matching rows/cols block;
- a legacy ``autograd.Function`` (no ``setup_context``, no ``jvp``): ``"auto"`` falls back with
  exactly one ``RuntimeWarning`` and matches the dense Hessian, ``"forward-over-reverse"`` raises
  ``HVPModeError`` suggesting ``'reverse-over-reverse'``;
- errors: non-scalar loss, tangent with missing/extra names or wrong shapes, invalid mode;
- ``HessianOperator(reuse=False)`` on a dropout model: one fixed symmetric operator (equal to the
  dense Hessian under the same dropout mask), identical products on repeated calls;
- ``scaled_dot_product_attention``: every mode and the kept graph agree with each other and with
  the dense Hessian under the MATH kernel;
- ``HessianOperator.calls``, ``.loss`` and ``.mode``, and ``in_hvp``.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import dense_hessian, flat, rel_err, unflat
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from implicitbilevel.curvature.hessian import (
    HessianOperator,
    HVPModeError,
    functional_module,
    hvp,
    in_hvp,
)

# The package re-exports the function ``hvp``, which shadows the submodule attribute.
hvp_module = importlib.import_module("implicitbilevel.curvature.hessian")

DT = torch.float64
MODES = ["auto", "forward-over-reverse", "reverse-over-reverse"]
REL = 1e-10


# ----------------------------------------------------------------------------- references


def random_tangent(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}


def assert_matches(product: dict, tangent: dict, hess: torch.Tensor, params: dict) -> None:
    assert list(product.keys()) == list(params.keys())
    for n, p in params.items():
        assert product[n].shape == p.shape and product[n].dtype == p.dtype
        assert not product[n].requires_grad
    assert rel_err(flat(product), hess @ flat(tangent)) < REL


# ----------------------------------------------------------------------------- small MLP


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


def mlp_data(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(7, 3, generator=gen, dtype=DT), torch.randn(7, 2, generator=gen, dtype=DT)


@pytest.fixture(scope="module")
def mlp():
    params = make_mlp_params()
    x, y = mlp_data()
    return params, (x, y), dense_hessian(mlp_loss, params, x, y)


def test_dense_reference_is_symmetric_and_nontrivial(mlp):
    params, _, hess = mlp
    n = sum(p.numel() for p in params.values())
    assert hess.shape == (n, n)
    torch.testing.assert_close(hess, hess.T, rtol=1e-12, atol=1e-14)
    # Not block diagonal: w1/w2 cross-curvature is present, so mixing names up would be detected.
    assert hess[:15, 20:30].abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hvp_matches_dense_mlp(mlp, mode, seed):
    params, args, hess = mlp
    t = random_tangent(params, seed)
    assert_matches(hvp(mlp_loss, params, t, *args, mode=mode), t, hess, params)


def test_hvp_ignores_requires_grad_and_graph_of_params(mlp):
    params, args, hess = mlp
    live = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    t = random_tangent(params, 7)
    for mode in MODES:
        assert_matches(hvp(mlp_loss, live, t, *args, mode=mode), t, hess, params)
    assert all(p.grad is None for p in live.values())


def test_kept_graph_operator_matches_dense_mlp(mlp):
    params, args, hess = mlp
    op = HessianOperator(mlp_loss, params, *args)
    assert op.mode == "kept-graph"
    torch.testing.assert_close(op.loss, mlp_loss(params, *args), rtol=1e-14, atol=0)
    # Rebuild the whole matrix column by column through the kept graph.
    n = hess.shape[0]
    columns = [flat(op(unflat(torch.eye(n, dtype=DT)[i], params))) for i in range(n)]
    assert rel_err(torch.stack(columns, dim=1), hess) < REL
    assert op.calls == n
    for seed in (3, 4):
        t = random_tangent(params, seed)
        assert_matches(op(t), t, hess, params)
    assert op.calls == n + 2


@pytest.mark.parametrize("mode", MODES)
def test_operator_without_reuse_matches_dense_mlp(mlp, mode):
    params, args, hess = mlp
    op = HessianOperator(mlp_loss, params, *args, mode=mode, reuse=False)
    assert op.loss is None
    for seed in (5, 6):
        t = random_tangent(params, seed)
        assert_matches(op(t), t, hess, params)
    assert op.calls == 2


def test_operator_calls_counter(mlp):
    params, args, _ = mlp
    for op in (HessianOperator(mlp_loss, params, *args),
               HessianOperator(mlp_loss, params, *args, reuse=False)):
        assert op.calls == 0
        t = random_tangent(params, 0)
        for i in range(1, 4):
            op(t)
            assert op.calls == i
        bad = dict(t)
        bad["w1"] = torch.zeros(3, 5, dtype=DT)
        with pytest.raises(ValueError):
            op(bad)
        assert op.calls == 3  # a rejected tangent evaluates no product


def test_in_hvp_flag(mlp):
    params, args, _ = mlp
    seen: list[bool] = []

    def loss(p, x, y):
        seen.append(in_hvp())
        return mlp_loss(p, x, y)

    assert not in_hvp()
    for mode in MODES:
        hvp(loss, params, random_tangent(params, 0), *args, mode=mode)
    HessianOperator(loss, params, *args)(random_tangent(params, 0))
    assert seen and all(seen)
    assert not in_hvp()


# ----------------------------------------------------------------------------- errors


def test_non_scalar_loss_raises(mlp):
    params, args, _ = mlp

    def vector_loss(p, x, y):
        return torch.tanh(x @ p["w1"].T + p["b1"]).sum(dim=0)

    t = random_tangent(params, 0)
    for mode in MODES:
        with pytest.raises(ValueError, match="scalar"):
            hvp(vector_loss, params, t, *args, mode=mode)
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(vector_loss, params, *args)
    for mode in MODES:
        op = HessianOperator(vector_loss, params, *args, mode=mode, reuse=False)
        with pytest.raises(ValueError, match="scalar"):
            op(t)


def test_tangent_errors(mlp):
    params, args, _ = mlp
    t = random_tangent(params, 0)
    missing = {k: v for k, v in t.items() if k != "b2"}
    extra = dict(t, other=torch.zeros(1, dtype=DT))
    wrong_shape = dict(t, w2=torch.zeros(5, 2, dtype=DT))
    op = HessianOperator(mlp_loss, params, *args)
    op_nr = HessianOperator(mlp_loss, params, *args, reuse=False)
    for mode in MODES:
        with pytest.raises(KeyError, match="b2"):
            hvp(mlp_loss, params, missing, *args, mode=mode)
        with pytest.raises(KeyError, match="other"):
            hvp(mlp_loss, params, extra, *args, mode=mode)
        with pytest.raises(ValueError, match="w2"):
            hvp(mlp_loss, params, wrong_shape, *args, mode=mode)
    for operator in (op, op_nr):
        with pytest.raises(KeyError):
            operator(missing)
        with pytest.raises(ValueError):
            operator(wrong_shape)


@pytest.mark.parametrize("mode", ["forward", "fwd-rev", "", "AUTO", None])
def test_invalid_mode_raises(mlp, mode):
    params, args, _ = mlp
    with pytest.raises(ValueError, match="mode"):
        hvp(mlp_loss, params, random_tangent(params, 0), *args, mode=mode)
    with pytest.raises(ValueError, match="mode"):
        HessianOperator(mlp_loss, params, *args, mode=mode, reuse=False)


# ----------------------------------------------------------------------------- BatchNorm


def make_bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 2, kernel_size=2),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 2),
    ).to(DT)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
        net[1].running_mean.uniform_(-1.0, 1.0)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].num_batches_tracked.fill_(7)
    return net.train()


def bn_data(seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 2, 4, 4, generator=gen, dtype=DT), torch.tensor([0, 1, 1, 0])


def bn_loss_factory(net: nn.Module):
    call = functional_module(net)

    def loss(p, x, target):
        return F.cross_entropy(call(p, x), target) + 0.05 * (call(p, x) ** 2).mean()

    return loss


def bn_reference_hessian(net: nn.Module, params: dict, x, target) -> torch.Tensor:
    # Reference on a deep copy whose BatchNorm has track_running_stats=False: in train mode it then
    # normalises with the batch statistics and never reads or writes running statistics, which is
    # exactly the function a Hessian-vector product in train mode must differentiate.
    ref_net = copy.deepcopy(net)
    for m in ref_net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False

    def loss(p, x, target):
        out = functional_call(ref_net, p, (x,))
        return F.cross_entropy(out, target) + 0.05 * (out**2).mean()

    return dense_hessian(loss, params, x, target)


def bn_buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in net.named_buffers()}


def assert_buffers_equal(net: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for n, b in net.named_buffers():
        assert torch.equal(b, before[n]), n


@pytest.fixture(scope="module")
def bn_setup():
    net = make_bn_net()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, target = bn_data()
    hess = bn_reference_hessian(net, params, x, target)
    return net, params, (x, target), hess


def test_bn_reference_uses_batch_statistics(bn_setup):
    net, params, args, hess = bn_setup
    # With running statistics (eval mode) the function, hence the Hessian, differs: the reference
    # (and every product compared with it) really is the batch-statistics one.
    eval_net = copy.deepcopy(net).eval()

    def eval_loss(p, x, target):
        out = functional_call(eval_net, p, (x,))
        return F.cross_entropy(out, target) + 0.05 * (out**2).mean()

    assert rel_err(dense_hessian(eval_loss, params, *args), hess) > 1e-2


def test_bn_hvps_match_dense_and_keep_running_stats(bn_setup):
    net, params, args, hess = bn_setup
    loss = bn_loss_factory(net)
    before = bn_buffers(net)
    t = random_tangent(params, 11)
    for mode in MODES:
        assert_matches(hvp(loss, params, t, *args, mode=mode), t, hess, params)
        assert_buffers_equal(net, before)
    op = HessianOperator(loss, params, *args)
    for seed in (12, 13):
        t = random_tangent(params, seed)
        assert_matches(op(t), t, hess, params)
    assert_buffers_equal(net, before)
    for mode in MODES:
        op = HessianOperator(loss, params, *args, mode=mode, reuse=False)
        assert_matches(op(t), t, hess, params)
        assert_buffers_equal(net, before)
    assert net.training


def test_functional_module_updates_running_stats_outside_hvp(bn_setup):
    net_template, params, args, _ = bn_setup
    net = copy.deepcopy(net_template)
    bn = net[1]
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    old_count = int(bn.num_batches_tracked)
    x, _ = args
    call = functional_module(net)
    call(params, x)
    # Independent expectation: PyTorch's momentum update with the unbiased batch variance.
    conv = F.conv2d(x, params["0.weight"], params["0.bias"])
    batch_mean = conv.mean(dim=(0, 2, 3))
    batch_var = conv.var(dim=(0, 2, 3), unbiased=True)
    m = bn.momentum
    torch.testing.assert_close(bn.running_mean, (1 - m) * old_mean + m * batch_mean,
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, (1 - m) * old_var + m * batch_var,
                               rtol=1e-12, atol=1e-14)
    assert int(bn.num_batches_tracked) == old_count + 1

    # freeze_buffers=True runs on copies: nothing changes.
    frozen_before = bn_buffers(net)
    functional_module(net, freeze_buffers=True)(params, x)
    assert_buffers_equal(net, frozen_before)


# ----------------------------------------------------------------------------- subsets


def make_module_mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Softplus(),
                         nn.Linear(3, 1)).to(DT)


@pytest.mark.parametrize("names", [["0.weight"], ["2.bias", "0.weight"], ["4.weight", "2.weight"]])
def test_subset_hvp_equals_hessian_block(names):
    net = make_module_mlp()
    call = functional_module(net)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, generator=gen, dtype=DT)
    y = torch.randn(6, 1, generator=gen, dtype=DT)

    def loss(p, x, y):
        return ((call(p, x) - y) ** 2).mean()

    full = {n: p.detach().clone() for n, p in net.named_parameters()}
    hess = dense_hessian(loss, full, x, y)
    offsets, offset = {}, 0
    for n, p in full.items():
        offsets[n] = torch.arange(offset, offset + p.numel())
        offset += p.numel()
    idx = torch.cat([offsets[n] for n in names])
    block = hess[idx][:, idx]

    sub = {n: full[n] for n in names}
    t = random_tangent(sub, 5)
    expected = block @ flat(t)
    for mode in MODES:
        assert rel_err(flat(hvp(loss, sub, t, x, y, mode=mode)), expected) < REL
    assert rel_err(flat(HessianOperator(loss, sub, x, y)(t)), expected) < REL
    op = HessianOperator(loss, sub, x, y, reuse=False)
    assert rel_err(flat(op(t)), expected) < REL
    # The unselected parameters were left alone.
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), full[n])


def test_embedding_row_subset_equals_rows_block():
    vocab, dim, rows = 7, 3, 3
    gen = torch.Generator().manual_seed(8)
    emb = 0.5 * torch.randn(vocab, dim, generator=gen, dtype=DT)
    w = torch.randn(dim, 2, generator=gen, dtype=DT)
    tokens = torch.tensor([[0, 2, 5, 1], [3, 1, 1, 6], [2, 0, 4, 2]])

    def full_loss(p, tokens):
        e = F.embedding(tokens, p["emb"])  # (B, L, D)
        return F.softplus(torch.tanh(e).sum(dim=1) @ w).mean() + (e.sum(dim=1) ** 4).mean()

    frozen_rest = emb[rows:].clone()

    def rows_loss(p, tokens):
        return full_loss({"emb": torch.cat([p["rows"], frozen_rest])}, tokens)

    hess = dense_hessian(full_loss, {"emb": emb}, tokens)
    block = hess[: rows * dim, : rows * dim]  # row-major flattening: the first rows*dim entries
    assert block.abs().max() > 1e-3
    params = {"rows": emb[:rows].clone()}
    t = random_tangent(params, 9)
    expected = block @ flat(t)
    for mode in MODES:
        assert rel_err(flat(hvp(rows_loss, params, t, tokens, mode=mode)), expected) < REL
    assert rel_err(flat(HessianOperator(rows_loss, params, tokens)(t)), expected) < REL


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


def legacy_loss(p, x):
    return F.softplus(LegacyTanh.apply(x @ p["w"]) @ p["v"]).mean()


def plain_loss(p, x):  # the same function with torch.tanh: the independent reference
    return F.softplus(torch.tanh(x @ p["w"]) @ p["v"]).mean()


def legacy_loss_cubed(p, x):
    return (LegacyTanh.apply(x @ p["w"]) @ p["v"]).pow(3).mean()


@pytest.fixture
def legacy_setup(monkeypatch):
    # The one-time warning is remembered per process; start every test from a clean memory.
    monkeypatch.setattr(hvp_module, "_FALLBACK_WARNED", set())
    gen = torch.Generator().manual_seed(21)
    params = {"w": torch.randn(3, 4, generator=gen, dtype=DT),
              "v": torch.randn(4, generator=gen, dtype=DT)}
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    return params, x, dense_hessian(plain_loss, params, x)


def test_legacy_function_auto_falls_back_once(legacy_setup):
    params, x, hess = legacy_setup
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in (0, 1, 2):
            t = random_tangent(params, seed)
            assert_matches(hvp(legacy_loss, params, t, x, mode="auto"), t, hess, params)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1
    assert "reverse-over-reverse" in str(runtime[0].message)


def test_legacy_function_operator_auto_falls_back(legacy_setup):
    params, x, hess = legacy_setup
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = HessianOperator(legacy_loss, params, x, mode="auto", reuse=False)
        for seed in (3, 4):
            t = random_tangent(params, seed)
            assert_matches(op(t), t, hess, params)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert op.mode == "reverse-over-reverse"
    t = random_tangent(params, 5)
    assert_matches(HessianOperator(legacy_loss, params, x)(t), t, hess, params)
    assert_matches(hvp(legacy_loss, params, t, x, mode="reverse-over-reverse"), t, hess, params)


def test_legacy_function_forward_mode_raises(legacy_setup):
    params, x, _ = legacy_setup
    t = random_tangent(params, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on this path either
        with pytest.raises(HVPModeError, match="reverse-over-reverse"):
            hvp(legacy_loss, params, t, x, mode="forward-over-reverse")
        op = HessianOperator(legacy_loss, params, x, mode="forward-over-reverse", reuse=False)
        with pytest.raises(HVPModeError, match="reverse-over-reverse"):
            op(t)
    assert issubclass(HVPModeError, RuntimeError)


def test_each_legacy_loss_warns_once_and_is_named(legacy_setup):
    params, x, _ = legacy_setup
    t = random_tangent(params, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hvp(legacy_loss, params, t, x)
        hvp(legacy_loss, params, t, x)
        hvp(legacy_loss_cubed, params, t, x)
        hvp(legacy_loss_cubed, params, t, x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2
    assert "legacy_loss" in messages[0] and "legacy_loss_cubed" in messages[1]


# ----------------------------------------------------------------------------- dropout


def make_dropout_net() -> nn.Module:
    torch.manual_seed(31)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1),
                         nn.Softplus()).to(DT).train()


@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse"])
def test_dropout_operator_is_fixed_and_symmetric(mode):
    net = make_dropout_net()
    call = functional_module(net)
    gen = torch.Generator().manual_seed(32)
    x = torch.randn(16, 4, generator=gen, dtype=DT)

    def loss(p, x):
        return (call(p, x) ** 2).mean()

    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.manual_seed(1234)
    op = HessianOperator(loss, params, x, mode=mode, reuse=False)
    torch.manual_seed(999)  # the global RNG moves on; the operator must not
    u, v = random_tangent(params, 1), random_tangent(params, 2)
    hu, hv = op(u), op(v)
    uhv, hu_v = float(flat(u) @ flat(hv)), float(flat(hu) @ flat(v))
    assert abs(uhv - hu_v) <= 1e-10 * max(1.0, abs(uhv))
    hv_again = op(v)
    for n in params:
        assert torch.equal(hv[n], hv_again[n])

    # The operator is the Hessian under the dropout mask drawn from the RNG state at construction.
    torch.manual_seed(1234)
    hess = dense_hessian(loss, params, x)
    assert rel_err(flat(hv), hess @ flat(v)) < REL
    # Dropout is really active: a different mask gives a different matrix.
    torch.manual_seed(4321)
    other = dense_hessian(loss, params, x)
    assert rel_err(other, hess) > 1e-3


# ----------------------------------------------------------------------------- attention


def attention_loss(p, x):
    b, length, d = x.shape
    heads = 2

    def split(z):
        return z.reshape(b, length, heads, d // heads).transpose(1, 2)

    q, k, v = split(x @ p["wq"]), split(x @ p["wk"]), split(x @ p["wv"])
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = out.transpose(1, 2).reshape(b, length, d)
    return F.softplus(out @ p["wo"]).mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_all_modes_agree(dtype):
    gen = torch.Generator().manual_seed(41)
    d = 4
    params = {n: 0.8 * torch.randn(d, d, generator=gen, dtype=dtype)
              for n in ("wq", "wk", "wv", "wo")}
    x = torch.randn(2, 5, d, generator=gen, dtype=dtype)
    t = random_tangent(params, 42)

    # Outside the library the default CPU kernel has no forward-mode AD: the check below is only
    # meaningful because the library selects a kernel that supports it.
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.func.jvp(lambda p: torch.func.grad(attention_loss)(p, x), (params,), (t,))

    products = {mode: flat(hvp(attention_loss, params, t, x, mode=mode)) for mode in MODES}
    products["kept-graph"] = flat(HessianOperator(attention_loss, params, x)(t))
    products["no-reuse"] = flat(HessianOperator(attention_loss, params, x, reuse=False)(t))
    tol = REL if dtype == torch.float64 else 1e-4
    ref = products["reverse-over-reverse"]
    assert ref.norm() > 0
    for name, product in products.items():
        assert rel_err(product, ref) < tol, name
    if dtype == torch.float64:
        with sdpa_kernel([SDPBackend.MATH]):
            hess = dense_hessian(attention_loss, params, x)
        assert rel_err(ref, hess @ flat(t)) < REL


def test_functional_module_keeps_non_batchnorm_buffers():
    """Integer buffers such as GPT's ``position_ids`` reach the model inside an HVP unchanged."""

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("position_ids", torch.arange(4))
            self.embed = nn.Embedding(4, 3)
            self.norm = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.norm(torch.tanh(x + self.embed(self.position_ids)))

    model = Positional().double()
    call = functional_module(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p):
        return (call(p, x) ** 2).sum() + (p["embed.weight"] ** 4).sum()

    tangent = {n: torch.randn_like(p) for n, p in params.items()}
    stats = model.norm.running_mean.clone()
    outputs = [hvp(loss, params, tangent, mode=m) for m in ("forward-over-reverse",
                                                            "reverse-over-reverse")]
    kept = HessianOperator(loss, params)(tangent)
    for name in params:
        assert torch.allclose(outputs[0][name], outputs[1][name], rtol=1e-10, atol=1e-12)
        assert torch.allclose(kept[name], outputs[1][name], rtol=1e-10, atol=1e-12)
    assert torch.equal(model.norm.running_mean, stats)


def test_auto_mode_falls_back_when_forward_mode_fails_without_saying_so():
    """torch 2.14's ``mse_loss`` fails under jvp(grad) with "ZeroTensors are immutable"."""
    w = {"w": torch.randn(3, 4, dtype=torch.float64)}
    y = torch.randn(3, dtype=torch.float64)
    t = {"w": torch.randn(3, 4, dtype=torch.float64)}

    def loss(p):
        return F.mse_loss(p["w"].sum(-1), y)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = hvp(loss, w, t)
    # ∇² of mean((Σ_j w_ij − y_i)²) is (2/n)·1·1ᵀ within each row i
    expected = (2.0 / 3) * t["w"].sum(-1, keepdim=True).expand(3, 4)
    assert torch.allclose(out["w"], expected, rtol=1e-12)
    assert any("falling back" in str(c.message) for c in caught)
