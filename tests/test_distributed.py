"""Data-parallel BiSSL on two CPU ranks (gloo) against a single process on the whole batch.

- The upper-level hypergradient (with its CG solve, every HVP averaged across ranks) and the
  lower-level gradient on two ranks with batch B each equal the single-process values on the 2B
  batch, to float64 tolerance.
- A two-rank BiSSL trainer run with a learnable λ completes, every rank starting from rank 0's
  parameters and ρ; rank 0 alone writes the checkpoint, which loads and resumes in a single
  process.
- ``AllReduceMean`` packs tensors into buckets and is the identity without a process group.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from implicitbilevel import (
    CG,
    BilevelProblem,
    ImplicitJacobian,
    LearnableLambda,
    ProximalL2,
    functional_module,
)
from implicitbilevel.bissl import BiSSLConfig, BiSSLTrainer, bissl_upper_loss
from implicitbilevel.bissl.checkpoint import load_checkpoint
from implicitbilevel.parallel.distributed import AllReduceMean, _buckets

D = torch.float64


def _models():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Softplus())
    down = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(8, 3)}).to(D)
    pre = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "proj": nn.Linear(8, 6)}).to(D)
    return down, pre


def _problem(down, pre, reducer, lam=0.05):
    def downstream_loss(p, batch):
        x, y = batch
        return nn.functional.cross_entropy(_call(down, "head", p, x), y)

    def pretext_loss(p, batch):
        (x,) = batch
        return ((_call(pre, "proj", p, x) - x) ** 2).mean()

    names = [n for n, _ in down.named_parameters() if n.startswith("backbone.")]
    return BilevelProblem(bissl_upper_loss(downstream_loss, names), pretext_loss, lam=lam,
                          regularizer=ProximalL2(names),
                          ij=ImplicitJacobian(CG(max_iter=6), damping=1.0), reducer=reducer)


def _call(modules, head, params, x):
    feats = functional_module(modules["backbone"])(_strip(params, "backbone."), x)
    return functional_module(modules[head])(_strip(params, head + "."), feats)


def _strip(params, prefix):
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _data():
    g = torch.Generator().manual_seed(3)
    x_d = torch.randn(16, 6, generator=g, dtype=D)
    y_d = torch.randint(0, 3, (16,), generator=g)
    x_p = torch.randn(24, 6, generator=g, dtype=D)
    return x_d, y_d, x_p


def _perturbed(down, pre):
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dict(down.named_parameters()), dict(pre.named_parameters())


def _gradient_worker(rank, world, out_path):
    down, pre = _models()
    upper, lower = _perturbed(down, pre)
    x_d, y_d, x_p = _data()
    shard_d = slice(rank * 8, (rank + 1) * 8)
    shard_p = slice(rank * 12, (rank + 1) * 12)
    problem = _problem(down, pre, AllReduceMean(bucket_mb=0.001))  # several buckets
    up = problem.upper_grad(upper, lower, (x_d[shard_d], y_d[shard_d]), (x_p[shard_p],))
    low = problem.lower_grad(upper, lower, (x_p[shard_p],))
    if rank == 0:
        torch.save({"upper": up.grads, "lower": low.grads, "upper_loss": up.loss,
                    "lower_loss": low.loss, "ij": up.u}, out_path)


def test_two_rank_hypergradient_equals_single_process_full_batch(tmp_path):
    out = tmp_path / "grads.pt"
    run_ranks(_gradient_worker, str(out))
    distributed = torch.load(out, weights_only=True)

    down, pre = _models()
    upper, lower = _perturbed(down, pre)
    x_d, y_d, x_p = _data()
    problem = _problem(down, pre, None)
    up = problem.upper_grad(upper, lower, (x_d, y_d), (x_p,))
    low = problem.lower_grad(upper, lower, (x_p,))
    for name, g in up.grads.items():
        assert torch.allclose(distributed["upper"][name], g, rtol=1e-10, atol=1e-12), name
    for name, g in low.grads.items():
        assert torch.allclose(distributed["lower"][name], g, rtol=1e-10, atol=1e-12), name
    for name, g in up.u.items():
        assert torch.allclose(distributed["ij"][name], g, rtol=1e-10, atol=1e-12), name
    assert float(distributed["upper_loss"]) == pytest.approx(float(up.loss), rel=1e-12)
    assert float(distributed["lower_loss"]) == pytest.approx(float(low.loss), rel=1e-12)


def _trainer(down, pre, reducer, out_dir, alternations, distributed, rho_shift=0.0):
    upper, lower = dict(down.named_parameters()), dict(pre.named_parameters())
    lam = LearnableLambda(0.05, dtype=D)  # ρ: an upper parameter, broadcast and checkpointed
    with torch.no_grad():
        lam.rho.add_(rho_shift)
    x_d, y_d, x_p = _data()
    sets = TensorDataset(x_d, y_d), TensorDataset(x_p)
    loaders = [
        DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, seed=1) if distributed
                   else None, shuffle=not distributed)
        for ds in sets
    ]
    return BiSSLTrainer(
        _problem(down, pre, reducer, lam), upper, lower,
        torch.optim.SGD([*down.parameters(), lam.rho], lr=0.05),
        torch.optim.SGD(pre.parameters(), lr=0.05),
        loaders[0], loaders[1],
        BiSSLConfig(alternations=alternations, lower_steps=2, upper_steps=2, progress=False),
        out_dir=out_dir, modules={"down": down, "pre": pre},
    )


def _trainer_worker(rank, world, out_dir):
    down, pre = _models()
    if rank == 1:  # the trainer starts every rank from rank 0's parameters, λ's ρ included
        with torch.no_grad():
            for p in [*down.parameters(), *pre.parameters()]:
                p.add_(1.0)
    trainer = _trainer(down, pre, AllReduceMean(), out_dir, 3, distributed=True,
                       rho_shift=float(rank))
    trainer.run()
    rho = trainer.problem.lam.rho.detach().reshape(1)
    gathered = [torch.zeros_like(rho) for _ in range(world)]
    dist.all_gather(gathered, rho)
    assert torch.equal(gathered[0], gathered[1])
    assert float(rho) != float(LearnableLambda(0.05, dtype=D).rho)  # it was trained
    # Parameters stay replicated: every rank applies the same averaged update.
    flat = torch.cat([p.detach().reshape(-1) for p in pre.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])
    down_flat = torch.cat([p.detach().reshape(-1) for p in down.parameters()])
    gathered = [torch.zeros_like(down_flat) for _ in range(world)]
    dist.all_gather(gathered, down_flat)
    assert torch.equal(gathered[0], gathered[1])


def test_two_rank_trainer_run_checkpoint_loads_in_one_process(tmp_path):
    run_ranks(_trainer_worker, str(tmp_path))
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["alternation"] == 3 and len(state["ranks"]) == 2
    assert state["upper_params"]["lam.rho"].dtype == D
    assert len((tmp_path / "metrics.jsonl").read_text().strip().splitlines()) == 3

    down, pre = _models()
    trainer = _trainer(down, pre, None, tmp_path, 4, distributed=False)
    rho = trainer.problem.lam.rho
    trainer.load_state_dict(state)
    assert torch.equal(rho.detach(), state["upper_params"]["lam.rho"])
    history = trainer.run(resume=True, allow_changed_config=True)  # continued from T = 3 to 4
    assert len(history) == 4 and trainer.alternation == 4


def test_all_reduce_mean_is_identity_without_process_group():
    tree = {"a": torch.randn(3), "b": torch.randn(2, 2)}
    out = AllReduceMean()(tree)
    assert all(torch.equal(out[k], tree[k]) for k in tree)
    with pytest.raises(ValueError, match="bucket_mb"):
        AllReduceMean(bucket_mb=0)


def test_buckets_split_by_size_and_dtype():
    reducer = AllReduceMean(bucket_mb=32 / 2**20)  # 32 bytes per bucket
    tensors = [torch.zeros(2, dtype=D), torch.zeros(2, dtype=D), torch.zeros(4, dtype=D),
               torch.zeros(1, dtype=torch.float32)]
    assert _buckets(tensors, reducer.bucket_bytes) == [[0, 1], [2], [3]]
