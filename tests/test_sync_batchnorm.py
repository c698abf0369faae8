"""Synchronised batch normalisation against plain BatchNorm on the whole batch.

- Alone (no process group) :class:`SyncBatchNorm` is plain BatchNorm: outputs, gradients, running
  statistics and eval mode agree exactly.
- On two gloo ranks with B samples each, a BiSSL problem whose backbone holds BatchNorm layers gives
  the single-process hypergradient, lower gradient and running statistics of the 2B batch, to
  float64 tolerance, with every HVP mode (kept graph, forward-over-reverse, reverse-over-reverse).
- :func:`broadcast_from_main` overwrites every rank's tensors with rank 0's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from ranks import run_ranks
from torch import nn

from implicitbilevel import CG, BilevelProblem, ImplicitJacobian, ProximalL2, functional_module
from implicitbilevel.bissl import bissl_upper_loss
from implicitbilevel.parallel.distributed import AllReduceMean, broadcast_from_main
from implicitbilevel.parallel.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

D = torch.float64
MODES = ("kept-graph", "forward-over-reverse", "reverse-over-reverse")


def _models():
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.Softplus(),
    )
    down = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(6, 3)}).to(D)
    pre = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "proj": nn.Linear(6, 4)}).to(D)
    with torch.no_grad():  # θ_P ≠ θ_D, and BatchNorm affine terms away from (1, 0)
        for p in pre.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in [*down.modules(), *pre.modules()]:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    return down.train(), pre.train()


def _data():
    g = torch.Generator().manual_seed(5)
    x_d = torch.randn(12, 2, 5, 5, generator=g, dtype=D) * 2 + 0.5
    y_d = torch.randint(0, 3, (12,), generator=g)
    x_p = torch.randn(16, 2, 5, 5, generator=g, dtype=D)
    w_p = 0.1 * torch.randn(50, 4, generator=g, dtype=D)
    return x_d, y_d, x_p, x_p.flatten(1) @ w_p


def _call(modules, head, params, x):
    strip = lambda prefix: {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}  # noqa: E731
    feats = functional_module(modules["backbone"])(strip("backbone."), x)
    return functional_module(modules[head])(strip(head + "."), feats)


def _problem(down, pre, reducer, mode):
    def downstream_loss(p, batch):
        x, y = batch
        return nn.functional.cross_entropy(_call(down, "head", p, x), y)

    def pretext_loss(p, batch):
        x, target = batch
        return ((_call(pre, "proj", p, x) - target) ** 2).mean()

    names = [n for n, _ in down.named_parameters() if n.startswith("backbone.")]
    kept = mode == "kept-graph"
    return BilevelProblem(
        bissl_upper_loss(downstream_loss, names), pretext_loss, lam=0.05,
        regularizer=ProximalL2(names), reducer=reducer,
        ij=ImplicitJacobian(CG(max_iter=8), damping=10.0, reuse_graph=kept,
                            hvp_mode="auto" if kept else mode),
    )


def _running_stats(*modules):
    return {
        f"{i}.{n}": b.clone()
        for i, m in enumerate(modules)
        for n, b in m.named_buffers()
        if b.is_floating_point()
    }


def _evaluate(down, pre, reducer, shard_d=slice(None), shard_p=slice(None)):
    """Hypergradients in every HVP mode, the lower gradient, and the running statistics."""
    x_d, y_d, x_p, t_p = _data()
    upper, lower = dict(down.named_parameters()), dict(pre.named_parameters())
    out: dict = {}
    for mode in MODES:
        problem = _problem(down, pre, reducer, mode)
        up = problem.upper_grad(upper, lower, (x_d[shard_d], y_d[shard_d]),
                                (x_p[shard_p], t_p[shard_p]))
        out[mode] = {k: v.detach() for k, v in up.grads.items()}
    out["lower"] = problem.lower_grad(upper, lower, (x_p[shard_p], t_p[shard_p])).grads
    # every forward outside an HVP has updated the running statistics
    out["stats"] = _running_stats(down, pre)
    return out


def _worker(rank, world, out_path):
    shards = slice(rank * 6, rank * 6 + 6), slice(rank * 8, rank * 8 + 8)
    out = {"per-rank BatchNorm": _evaluate(*_models(), AllReduceMean(), *shards)}
    down, pre = _models()
    convert_sync_batchnorm(down)
    convert_sync_batchnorm(pre)
    out.update(_evaluate(down, pre, AllReduceMean(), *shards))

    # bf16 autocast: float32 statistics, the input's dtype out, close to float32
    layer = SyncBatchNorm(3).float().train()
    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x.bfloat16())
    out["bf16"] = (low.dtype == torch.bfloat16,
                   float((low.float() - layer(x).detach()).abs().max()))

    tensors = [torch.full((3,), float(rank)), torch.full((2, 2), 10.0 + rank, dtype=D)]
    broadcast_from_main(tensors, bucket_mb=1e-5)
    out["broadcast"] = tensors
    if rank == 1:
        torch.save(out, out_path)


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_two_ranks_with_sync_batchnorm_equal_one_process_on_the_whole_batch(tmp_path):
    path = tmp_path / "rank1.pt"
    run_ranks(_worker, str(path))
    distributed = torch.load(path, weights_only=True)

    down, pre = _models()
    reference = _evaluate(down, pre, None)
    for key in (*MODES, "lower", "stats"):
        for name, value in reference[key].items():
            assert _close(distributed[key][name], value), (key, name)
    # without synchronisation each rank's statistics give another hypergradient
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads.values()])  # noqa: E731
    unsynced = flat(distributed["per-rank BatchNorm"]["kept-graph"])
    exact = flat(reference["kept-graph"])
    assert (unsynced - exact).norm() > 1e-2 * exact.norm()

    is_bf16, error = distributed["bf16"]
    assert is_bf16 and error < 0.05
    assert torch.equal(distributed["broadcast"][0], torch.zeros(3))
    assert torch.equal(distributed["broadcast"][1], torch.full((2, 2), 10.0, dtype=D))


def test_alone_it_is_plain_batchnorm():
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).to(D)
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced[1], SyncBatchNorm)
    x = torch.randn(5, 3, 6, 6, dtype=D, requires_grad=True)
    y_plain, y_sync = plain(x), synced(x)
    assert torch.equal(y_plain, y_sync)
    g_plain = torch.autograd.grad(y_plain.square().sum(), [x, plain[1].weight])
    g_sync = torch.autograd.grad(y_sync.square().sum(), [x, synced[1].weight])
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_sync))
    assert torch.equal(plain[1].running_var, synced[1].running_var)
    plain.eval()
    synced.eval()
    assert torch.equal(plain(x), synced(x))


def test_conversion_keeps_parameters_buffers_and_mode():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None),
        nn.Sequential(nn.Unflatten(1, (4, 1, 1)), nn.SyncBatchNorm(4, eps=1e-3)),
    )
    model[1].running_mean.fill_(2.0)
    model.eval()
    weight, running = model[1].weight, model[1].running_mean
    out = convert_sync_batchnorm(model)
    assert out is model
    assert isinstance(model[1], SyncBatchNorm) and isinstance(model[2][1], SyncBatchNorm)
    assert model[1].weight is weight and model[1].running_mean is running
    assert model[1].momentum is None and model[2][1].eps == 1e-3
    assert not model[1].training
    assert isinstance(convert_sync_batchnorm(nn.BatchNorm3d(2)), SyncBatchNorm)


def test_wrong_input_is_refused_with_the_expected_shape():
    layer = SyncBatchNorm(4)
    with pytest.raises(ValueError, match="expected 4 channels"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"\(N, C, ...\)"):
        layer(torch.randn(4))
