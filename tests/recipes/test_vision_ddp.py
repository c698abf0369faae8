"""Data-parallel BiSSL stage of the vision recipe: two gloo ranks under ``torchrun`` on CPU.

The earlier stages run in one process; the BiSSL stage runs on two ranks; rank 0 alone writes
``bissl.pt`` and the trainer checkpoint, which load in a single process, and a single process can
resume the two-rank run from that checkpoint. The Only-FT stage on two ranks (trials and seeds
spread over the ranks) writes exactly the single-process ``only_ft.json``, and the head warm-up
(run by rank 0 while the other waits) exactly the single-process ``warmup.pt``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TINY

from recipes import vision_bissl
from recipes.common import load_checkpoint

pytestmark = pytest.mark.slow  # whole runs in subprocesses; see the README

SCRIPT = Path(vision_bissl.__file__)


def _sets(out):
    return [a for o in [*TINY, f"run.out_dir={out}", "run.device=cpu"] for a in ("--set", o)]


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX")
def test_two_rank_bissl_stage_and_single_process_resume(tmp_path):
    threads = torch.get_num_threads()
    try:
        for stage in ("pretext", "only-ft", "head-warmup"):
            vision_bissl.main([stage, *_sets(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    ranks_dir = tmp_path / "two_ranks"
    ranks_dir.mkdir()
    # pretext_baseline.pt: Only-FT's longer pretext; the run record vouches for both files
    for name in ("pretext.pt", "pretext_baseline.pt", "pretext.pt.config.json"):
        if (tmp_path / name).exists():
            shutil.copy(tmp_path / name, ranks_dir / name)
    digits = tmp_path / "digits"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(SCRIPT.parents[1])
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), "bissl", *_sets(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = load_checkpoint(digits / "bissl.pt")
    state = load_checkpoint(digits / "bissl" / "checkpoint.pt")
    assert state["alternation"] == 3 and len(state["ranks"]) == 2
    for name, tensor in result["pretext"].items():  # the saved θ_P is the trainer's final one
        if name in state["lower_params"]:
            assert torch.equal(state["lower_params"][name], tensor)

    # The fine-tuning trials and seed runs spread over two ranks give one process's results;
    # the head warm-up runs on rank 0 alone and gives one process's weights.
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), "only-ft", "head-warmup", *_sets(tmp_path), "--set",
         "run.out_dir=" + str(ranks_dir)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Only-FT: lr=") == 1  # rank 0 alone reports
    assert done.stdout.count("head warm-up: lr=") == 1
    single = json.loads((digits / "only_ft.json").read_text())
    assert json.loads((ranks_dir / "digits" / "only_ft.json").read_text()) == single
    warm = load_checkpoint(ranks_dir / "digits" / "warmup.pt")["downstream"]
    for name, tensor in load_checkpoint(digits / "warmup.pt")["downstream"].items():
        assert torch.equal(warm[name], tensor), name

    try:  # one process continues the two-rank run for two more alternations
        vision_bissl.main(["bissl", "--resume", "--overwrite", "--allow-changed-config",
                          *_sets(tmp_path), "--set", "bissl.alternations=5"])
    finally:
        torch.set_num_threads(threads)
    assert load_checkpoint(digits / "bissl" / "checkpoint.pt")["alternation"] == 5
