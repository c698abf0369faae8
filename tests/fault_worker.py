"""A small BiSSL run used by the fault-tolerance tests:
``python fault_worker.py OUT [--resume] [--learnable]``.

It trains a BatchNorm model pair with shuffled loaders (the upper one ending on a partial batch,
which the batch stack skips) for ``ALTERNATIONS`` alternations, checkpointing after every one,
sleeping briefly per alternation so a test can kill it mid-run, and writes the final parameters,
buffers, λ's ρ and the upper optimiser's state to ``OUT/final.pt``. With ``--learnable`` λ is a
:class:`~implicitbilevel.LearnableLambda` trained by the upper optimiser.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from implicitbilevel import (
    CG,
    BilevelProblem,
    ImplicitJacobian,
    LearnableLambda,
    ProximalL2,
    functional_module,
)
from implicitbilevel.bissl import BiSSLConfig, BiSSLTrainer, bissl_upper_loss

ALTERNATIONS = 8


def main(out: Path, resume: bool, learnable: bool) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh())
    down = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(8, 3)})
    pre = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "proj": nn.Linear(8, 5)})

    def run(modules, head, params, x):
        feats = functional_module(modules["backbone"])(
            {k[9:]: v for k, v in params.items() if k.startswith("backbone.")}, x)
        prefix = head + "."
        return functional_module(modules[head])(
            {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}, feats)

    def downstream_loss(p, batch):
        x, y = batch
        return nn.functional.cross_entropy(run(down, "head", p, x), y)

    def pretext_loss(p, batch):
        (x,) = batch
        noisy = x + 0.1 * torch.randn_like(x)  # consumes the global RNG, like augmentations
        return ((run(pre, "proj", p, noisy) - x) ** 2).mean()

    names = [n for n, _ in down.named_parameters() if n.startswith("backbone.")]
    lam = LearnableLambda(0.1, damping=0.0) if learnable else 0.1
    problem = BilevelProblem(bissl_upper_loss(downstream_loss, names), pretext_loss, lam=lam,
                             regularizer=ProximalL2(names),
                             ij=ImplicitJacobian(CG(max_iter=3), damping=10.0))
    g = torch.Generator().manual_seed(1)
    upper_data = TensorDataset(torch.randn(44, 5, generator=g),
                               torch.randint(0, 3, (44,), generator=g))
    lower_data = TensorDataset(torch.randn(56, 5, generator=g))
    upper_opt = torch.optim.SGD([*down.parameters(), *problem.params.values()], lr=0.05,
                                momentum=0.9)
    lower_opt = torch.optim.SGD(pre.parameters(), lr=0.05, momentum=0.9)
    trainer = BiSSLTrainer(
        problem, dict(down.named_parameters()), dict(pre.named_parameters()), upper_opt, lower_opt,
        DataLoader(upper_data, batch_size=8, shuffle=True),
        DataLoader(lower_data, batch_size=8, shuffle=True),
        BiSSLConfig(alternations=ALTERNATIONS, lower_steps=3, upper_steps=2, progress=False),
        lower_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(lower_opt, 24),
        out_dir=out, modules={"down": down, "pre": pre},
    )
    original_save = trainer.save

    def slow_save():
        original_save()
        time.sleep(0.3)  # a window for the test's SIGKILL between alternations and inside saves

    trainer.save = slow_save
    trainer.run(resume=resume)
    torch.save({"down": down.state_dict(), "pre": pre.state_dict(),
                "problem": {n: p.detach() for n, p in problem.params.items()},
                "upper_opt": upper_opt.state_dict()["state"]}, out / "final.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--resume" in sys.argv[2:], "--learnable" in sys.argv[2:])
