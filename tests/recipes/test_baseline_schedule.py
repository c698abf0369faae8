"""The Only-FT baseline of thesis Sec. 6.1.4 is pretrained on ONE schedule of
``pretext.epochs + pretext.baseline_extra_epochs`` (its own run, no restart of the cosine).

The learning rate of every optimiser step is recorded in a tiny run of the vision recipe's
``pretext`` stage and compared with the closed form of a linear warm-up followed by one cosine to
zero over the whole length (written out here, independently of ``recipes.common.schedules``).
"""

import math

import pytest
import torch

from implicitbilevel.bissl.checkpoint import load_checkpoint
from recipes.vision import train
from tests.recipes.tiny import TINY, run, sets

EPOCHS, EXTRA, WARMUP, LR = 2, 3, 1, 0.5


def closed_form(step: int, total: int, warmup: int) -> float:
    """lr of ``step``: ``(k+1)/(w+1)`` during the warm-up, then ``(1 + cos(pi t)) / 2`` with
    ``t`` the fraction of the remaining steps done."""
    if step < warmup:
        return LR * (step + 1) / (warmup + 1)
    return LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.fixture
def traces(tmp_path, monkeypatch):
    """The lr of every step of each pretraining run of the pretext stage, in order."""
    runs: list[list[float]] = []

    class Recording(train.LARS):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runs.append([])
            self._trace = runs[-1]

        def step(self, closure=None):
            self._trace.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(train, "LARS", Recording)
    run("pretext", *sets(*TINY, f"run.out_dir={tmp_path}", f"pretext.epochs={EPOCHS}",
                         f"pretext.baseline_extra_epochs={EXTRA}", f"pretext.lr={LR}",
                         f"pretext.warmup_epochs={WARMUP}"))
    return runs, tmp_path


def test_the_baseline_is_one_schedule_of_the_longer_length(traces):
    (pretext, baseline), out = traces
    steps = len(pretext) // EPOCHS  # batches per epoch
    assert steps >= 2 and len(pretext) == EPOCHS * steps
    assert len(baseline) == (EPOCHS + EXTRA) * steps
    for trace, epochs in ((pretext, EPOCHS), (baseline, EPOCHS + EXTRA)):
        want = [closed_form(k, epochs * steps, WARMUP * steps) for k in range(len(trace))]
        assert trace == pytest.approx(want, rel=1e-6, abs=1e-12)
    # no restart: after the warm-up the lr only falls, and never returns to the peak
    after = baseline[WARMUP * steps:]
    assert after[0] == pytest.approx(LR)
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert max(after[1:]) < LR
    # the baseline is its own run: one loss per epoch of the longer schedule
    assert len(load_checkpoint(out / "pretext_baseline.pt")["losses"]) == EPOCHS + EXTRA
    assert len(load_checkpoint(out / "pretext.pt")["losses"]) == EPOCHS


def test_the_baseline_starts_from_the_pretext_runs_initial_weights(tmp_path, monkeypatch):
    starts: list[dict[str, torch.Tensor]] = []
    simclr = train.pretrain_simclr

    def remember(model, loader, **kwargs):
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return simclr(model, loader, **kwargs)

    monkeypatch.setattr("recipes.vision_bissl.pretrain_simclr", remember)
    run("pretext", *sets(*TINY, f"run.out_dir={tmp_path}", "pretext.epochs=1",
                         "pretext.baseline_extra_epochs=1"))
    assert len(starts) == 2
    assert starts[0].keys() == starts[1].keys()
    for key in starts[0]:
        assert torch.equal(starts[0][key], starts[1][key]), key
