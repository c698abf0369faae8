"""Exact resume of a two-rank BiSSL run stopped after its data passes have wrapped.

Two gloo ranks train with shuffling ``DistributedSampler`` loaders small enough that passes end in
the middle of alternations (2 upper batches per pass for 3 upper steps; 3 lower batches per pass
for 3 lower steps and the Hessian's batch).
One run goes straight to the end; another stops after ``k`` alternations (its processes end and
everything in memory is lost) and fresh processes resume it from the checkpoint. The final
parameters, λ's ρ and the optimisers' momentum of both ranks must equal the uninterrupted run's
bit for bit: every sampler epoch, loader generator and random state is in the checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from ranks import run_ranks
from test_distributed import _models, _trainer

from implicitbilevel.bissl.checkpoint import load_checkpoint
from implicitbilevel.parallel.distributed import AllReduceMean

pytestmark = pytest.mark.slow  # whole runs in subprocesses; see the README

ALTERNATIONS = 6


class _Stop(Exception):
    """Ends a rank's run after a given alternation, as a kill between alternations would."""


def _worker(rank, world, out_dir, stop_after, resume):
    down, pre = _models()
    trainer = _trainer(down, pre, AllReduceMean(), out_dir, ALTERNATIONS, distributed=True)
    trainer.upper_optimizer.param_groups[0]["momentum"] = 0.9  # optimiser state to restore
    trainer.lower_optimizer.param_groups[0]["momentum"] = 0.9
    trainer.config.lower_steps = trainer.config.upper_steps = 3  # passes end mid-alternation

    def stop(trainer, t, record):
        if t + 1 == stop_after:
            trainer.history.append(record)  # alternation t is done; the checkpoint has t
            trainer.alternation += 1
            trainer.save()
            raise _Stop

    if stop_after is not None:
        trainer.callbacks.append(stop)
    try:
        trainer.run(resume=resume)
    except _Stop:
        return
    final = {
        "down": {n: p.detach().clone() for n, p in down.named_parameters()},
        "pre": {n: p.detach().clone() for n, p in pre.named_parameters()},
        "rho": trainer.problem.lam.rho.detach().clone(),
        "momentum": [s["momentum_buffer"] for s in trainer.upper_optimizer.state.values()],
    }
    torch.save(final, f"{out_dir}/final{rank}.pt")


@pytest.mark.parametrize("stop_after", [2, 4])
def test_two_rank_run_stopped_after_wrapped_passes_resumes_bit_identical(tmp_path, stop_after):
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    run_ranks(_worker, str(reference), None, False)
    run_ranks(_worker, str(victim), stop_after, False)
    state = load_checkpoint(victim / "checkpoint.pt")
    assert state["alternation"] == stop_after
    assert not (victim / "final0.pt").exists()
    run_ranks(_worker, str(victim), None, True)

    for rank in (0, 1):
        a = torch.load(reference / f"final{rank}.pt", weights_only=True)
        b = torch.load(victim / f"final{rank}.pt", weights_only=True)
        for level in ("down", "pre"):
            for name, tensor in a[level].items():
                assert torch.equal(tensor, b[level][name]), (stop_after, rank, level, name)
        assert torch.equal(a["rho"], b["rho"])
        assert all(torch.equal(x, y) for x, y in zip(a["momentum"], b["momentum"], strict=True))
    lines = (victim / "metrics.jsonl").read_text().strip().splitlines()
    assert len(lines) == ALTERNATIONS  # one record per alternation, none repeated
